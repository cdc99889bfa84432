"""The `clip` tokenizer kind gives exactly OpenCLIP's token ids: checked against OpenCLIP's
own tokenizer module (loaded from the installed open_clip_torch, see support/openclip.py)
on generated captions of every kind a web caption holds, and on every assigned code point;
a clip run's tokenizer.json gives the same ids after its JSON round trip, and the run-trained
BPE kind keeps its ids."""
from __future__ import annotations

import random
import sys
import unicodedata

import pytest
import torch

from support.openclip import load
from vlm.config import load_config
from vlm.data.tokenizer import (CLIP_VOCAB_SIZE, TOKENIZER_FILE, TextEncoder, clip_tokenizer, prepare_tokenizer,
                                train_tokenizer)

WORDS = ("a photo of the cat dog sitting on red blue green small large old man woman child car tree house "
         "beach sunset mountain river city street night with and in near two three painting drawing").split()
EDGE_CASES = [
    "", " ", "\t\n\r\n  ", "!!!", "...", "a", "A", "I", "'s", "it's", "IT'S", "we're they've I'm you'll he'd",
    "it’s a “quoted” word", "l'ſ 'ſ ſtraße", "ΟΔΟΣ ΣΑΣ σοφός", "İstanbul IĞDIR", "aͅb !ͅ! ᾳ",
    "<start_of_text>", "<end_of_text>", "x<start_of_text>y<end_of_text>z", "!<start_of_text> ?<end_of_text>",
    "'s<end_of_text><end_of_text>", "<START_OF_TEXT> <ſtart_of_text>", "a </w> b",
    "Tom &amp; Jerry", "&quot;hi&quot; &lt;b&gt;bold&lt;/b&gt;", "&amp;amp; &amp;lt;", "&#39;&#x27;&nbsp;x",
    "cafÃ© naÃ¯ve Ã¼ber", "â€œsmartâ€\x9d quotes", "SchÃ¶ne GrÃ¼ÃŸe",
    "Café crème brûlée", "Ångström Øresund Dvořák Łódź", "ﬁne ﬂow ﬀ", "e\u0301 vs é", "Ⅻ ① ² ½ ٣ ५",
    "北京的秋天很美", "東京タワーの夜景", "서울의 밤", "مرحبا بالعالم", "שלום עולם", "Привет, мир! ЁЖИК",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "😀😃😄", "👍🏽👍🏿", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 🇫🇷🇯🇵", "1️⃣ ❤️ ✔︎",
    "tab\there", "many     spaces", "line\nbreak", "nbsp\u00a0ideo\u3000space", "zero\u200bwidth\u200djoin\ufeffbom",
    "\x00\x01\x1c\x1f\x7f\x85 controls", "3.14159 1,000,000 2024-05-01 42nd 0x1F",
    "x" * 1000, "😀" * 200, " ".join(["word"] * 300), "supercalifragilisticexpialidocious " * 20,
]
FRAGMENTS = {
    "accented": ["café", "über", "niño", "façade", "smörgåsbord", "Żółć", "résumé", "Straße", "coração"],
    "cjk": ["猫", "日本語のテキスト", "中文字幕", "한국어", "漢字かな交じり", "ｆｕｌｌｗｉｄｔｈ"],
    "rtl": ["كتاب", "السلام عليكم", "עברית", "فارسی"],
    "cyrillic": ["кошка", "Москва", "україна", "България", "ΑΘΗΝΑ", "ελληνικά"],
    "emoji": ["🐱", "🚗💨", "👩🏻‍💻", "🧑🏾‍🤝‍🧑🏼", "👋🏼", "🎉🎊", "⭐️", "☕", "🇬🇧", "🫠"],
    "html": ["&amp;", "&quot;", "&lt;", "&gt;", "&#8217;", "&eacute;", "&amp;quot;", "&hellip;"],
    "punct": ["!", "?!", "...", "--", "(", ")", "[x]", "#tag", "@user", "http://example.com/a?b=1&c=2", "$5", "50%"],
    "number": ["0", "7", "42", "1999", "3.5", "1/2", "10,000", "4k", "2nd", "٣٤", "१२"],
    "space": [" ", "  ", "\t", "\n", "\u00a0", "\u2003", " \r\n "],
}


def mojibake(word: str) -> str:
    """UTF-8 read as Windows-1252 (Latin-1 where 1252 has no character): what ftfy repairs."""
    raw = word.encode("utf-8")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def generated_captions(n: int, seed: int = 0) -> list[str]:
    """n captions mixing English words with every fragment kind, in random case."""
    rng = random.Random(seed)
    kinds = list(FRAGMENTS)
    out = []
    for _ in range(n):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 4)):
            kind = rng.choice(kinds + ["mojibake"])
            frag = mojibake(rng.choice(FRAGMENTS["accented"])) if kind == "mojibake" else rng.choice(FRAGMENTS[kind])
            parts.insert(rng.randint(0, len(parts)), frag)
        text = rng.choice(["", " ", "", "\t"]).join(parts) if rng.random() < 0.1 else " ".join(parts)
        case = rng.choice([str, str.upper, str.title, str.capitalize])
        if rng.random() < 0.05:  # far beyond 77 tokens
            text = " ".join([text] * rng.randint(10, 40))
        out.append(case(text))
    return out


CAPTIONS = EDGE_CASES + generated_captions(1200)


@pytest.fixture(scope="module")
def openclip():
    return load("tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def clip_json() -> str:
    return clip_tokenizer().to_str()


def assert_same_ids(ours: torch.Tensor, theirs: torch.Tensor, captions: list[str]) -> None:
    same = (ours == theirs).all(dim=1)
    bad = (~same).nonzero()[:, 0].tolist()
    first = f"; first: {captions[bad[0]]!r}: {ours[bad[0]].tolist()} vs {theirs[bad[0]].tolist()}" if bad else ""
    assert not bad, f"{len(bad)} of {len(captions)} captions differ from OpenCLIP's ids{first}"


def test_ids_equal_openclip_on_generated_captions(openclip, clip_json):
    assert len(CAPTIONS) >= 1000
    assert sum(len(openclip.encode(c)) > 75 for c in CAPTIONS) >= 50  # many are cut
    tokens, eot = TextEncoder.from_json(clip_json, 77)(CAPTIONS)
    theirs = openclip(CAPTIONS)
    assert tokens.shape == theirs.shape == (len(CAPTIONS), 77)
    assert_same_ids(tokens, theirs, CAPTIONS)
    assert (tokens[:, 0] == 49406).all() and (eot == theirs.argmax(dim=1)).all()  # where OpenCLIP pools
    assert (tokens[torch.arange(len(CAPTIONS)), eot] == 49407).all()


def test_ids_equal_openclip_at_another_context_length(openclip, clip_json):
    tokens, _ = TextEncoder.from_json(clip_json, 16)(CAPTIONS)
    assert_same_ids(tokens, openclip(CAPTIONS, context_length=16), CAPTIONS)


def test_ids_equal_openclip_on_every_assigned_code_point(openclip, clip_json):
    """Every code point Python's Unicode tables assign (private use too), in runs of 24 and
    one by one between letters, digits and an apostrophe; long enough a context that none is cut."""
    points = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")
              and not 0xF0000 <= c]  # planes 15-16 are private use only: the BMP's stands for them
    runs = ["".join(points[i:i + 24]) for i in range(0, len(points), 24)]
    single = [" ".join(f"a{c}1'{c}" for c in points[i:i + 8]) for i in range(0, len(points), 8)]
    for captions in (runs, single):
        tokens, eot = TextEncoder.from_json(clip_json, 160)(captions)
        assert (eot < 159).all()
        assert_same_ids(tokens, openclip(captions, context_length=160), captions)


def test_clip_run_tokenizer_round_trip(tmp_path, openclip, capsys):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "tokenizer.kind=clip", "model.text.context_length=77"])
    prepare_tokenizer(cfg)
    assert "wrote CLIP's tokenizer" in capsys.readouterr().out
    path = tmp_path / "run" / TOKENIZER_FILE
    text = TextEncoder.from_json(path.read_text(), cfg.model.text.context_length)
    assert (text.kind, text.vocab_size, text.pad_id, text.sot_id, text.eot_id) == ("clip", CLIP_VOCAB_SIZE, 0, 49406, 49407)
    again = TextEncoder.from_json(text.tokenizer.to_str(), 77)  # as a checkpoint stores and reads it
    assert_same_ids(again(CAPTIONS)[0], openclip(CAPTIONS), CAPTIONS)
    assert "open_clip" not in sys.modules  # found by its spec, never imported (torchvision)
    prepare_tokenizer(cfg)  # kept
    assert "wrote" not in capsys.readouterr().out
    short = load_config(None, [f"run_dir={tmp_path / 'run'}", "tokenizer.kind=clip", "model.text.context_length=24"])
    prepare_tokenizer(short)
    assert "pretrained CLIP weights need 77" in capsys.readouterr().out


def test_a_run_directory_keeps_its_tokenizer_kind(tmp_path):
    run = tmp_path / "run"
    prepare_tokenizer(load_config(None, [f"run_dir={run}", "tokenizer.kind=clip"]))
    with pytest.raises(ValueError, match="is a clip tokenizer but tokenizer.kind is bpe"):
        prepare_tokenizer(load_config(None, [f"run_dir={run}"]))
    other = load_config(None, [f"run_dir={tmp_path / 'other'}", "tokenizer.kind=clip", "model.text.vocab_size=1000"])
    with pytest.raises(ValueError, match="model.text.vocab_size is 1000"):
        prepare_tokenizer(other)


def test_run_trained_bpe_keeps_its_ids():
    """<sot>, the caption's ids cut to fit, <eot> at eot_index, then <pad>: as before the clip kind."""
    tok = train_tokenizer(["a red cat", "A BLUE DOG on a mat", "two green cars"] * 20, vocab_size=300, min_frequency=1)
    text = TextEncoder.from_json(tok.to_str(), 8)
    assert text.kind == "bpe"
    pad, sot, eot_id = (tok.token_to_id(t) for t in ("<pad>", "<sot>", "<eot>"))
    captions = ["a red cat", "two green cars two green cars two green cars", ""]
    tokens, eot = text(captions)
    for row, end, caption in zip(tokens.tolist(), eot.tolist(), captions):
        ids = [sot] + tok.encode(caption, add_special_tokens=False).ids[:6] + [eot_id]
        assert row == ids + [pad] * (8 - len(ids)) and end == len(ids) - 1


def test_generation_bans_padding_only_where_it_is_not_a_word():
    """A clip tokenizer pads with id 0, the ordinary token "!": captioning may emit it."""
    from vlm.eval.generate import _banned

    clip = TextEncoder(clip_tokenizer(), 77)
    assert _banned(clip) == [clip.sot_id] and clip.tokenizer.id_to_token(clip.pad_id) == "!"
    bpe = TextEncoder(train_tokenizer(["a red square", "a blue circle"] * 20, vocab_size=300), 16)
    assert _banned(bpe) == [bpe.pad_id, bpe.sot_id]
