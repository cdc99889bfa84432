"""Captions -> token ids, with the tokenizer a run chooses (config `tokenizer.kind`):

- "bpe": a byte-level BPE trained on the run's own captions with the `tokenizers` library
  (special tokens <pad>/<sot>/<eot>);
- "clip": CLIP's 49,408-token BPE, giving exactly the ids OpenCLIP's tokenizer gives, so that
  weights trained with OpenCLIP read the same ids here. It is built with `tokenizers` from the
  vocabulary file the open_clip_torch package ships (nothing is downloaded).

Either is kept as a `tokenizers` JSON string (run_dir/tokenizer.json, and state["tokenizer"]
in checkpoints); TextEncoder tells the two apart by their special tokens."""
from __future__ import annotations

import gzip
import html
import importlib.util
from pathlib import Path
from typing import Iterable

import ftfy
import torch
from tokenizers import Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlm import rundir

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
TOKENIZER_FILE = "tokenizer.json"  # in the run directory

CLIP_SOT, CLIP_EOT = "<start_of_text>", "<end_of_text>"
CLIP_VOCAB_SIZE = 49408  # 256 bytes, the same 256 ending a word, 48,894 merges, SOT and EOT
CLIP_CONTEXT_LENGTH = 77  # what CLIP's text towers are trained with
CLIP_PAD_ID = 0  # OpenCLIP pads with id 0 (the token "!"), not with a special token
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # inside the open_clip package
# OpenCLIP splits the cleaned caption with the Python `regex` pattern below (IGNORECASE) and
# BPE-encodes each piece; whitespace belongs to no piece. This is that split for Oniguruma:
# on lower-cased text IGNORECASE adds only the long s (ſ) as a match of s, and it leaves
# U+0345 (a combining mark that case-folds to the letter ι) matching no branch: it is dropped.
#   <start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
CLIP_SPLIT = (r"<[sſ]tart_of_text>|<end_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d"
              r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD, SOT, EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def clip_vocab_file() -> Path:
    """CLIP's merges file from the installed open_clip_torch, found without importing the
    package (its __init__ imports torchvision, which this environment must not have)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(d) / CLIP_VOCAB_FILE for d in dirs if (Path(d) / CLIP_VOCAB_FILE).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"the clip tokenizer needs {CLIP_VOCAB_FILE} from open_clip_torch, which is not installed: "
            "pip install --no-deps open_clip_torch (without its dependencies: they would bring torchvision)")
    return path


def clip_tokenizer(vocab_file: Path | None = None) -> Tokenizer:
    """CLIP's BPE as a `tokenizers` Tokenizer. It expects captions cleaned by `clip_clean`
    (TextEncoder does that); SOT and EOT are plain vocabulary entries (ids 49406, 49407),
    not added tokens, so that a caption holding their text is split as OpenCLIP splits it."""
    path = vocab_file or clip_vocab_file()
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1: 1 + n_merges]]  # line 0: a version header
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: {len(vocab)} distinct tokens, not CLIP's {CLIP_VOCAB_SIZE}")
    tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # keep the matches
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    return tok


def _byte_chars() -> list[str]:
    """The 256 byte symbols in OpenCLIP's order (that of GPT-2's bytes_to_unicode): the
    printable Latin-1 bytes stand for themselves, the other bytes, in order, for U+0100...;
    the same table the ByteLevel pre-tokenizer uses."""
    printable = [b for b in range(256) if ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬")
                 or ord("®") <= b <= ord("ÿ")]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_clean(text: str) -> str:
    """OpenCLIP's caption cleaning: ftfy's fixes (mojibake, NFC, curly quotes), HTML entities
    undone twice, whitespace runs to one space, lower case. Done in Python: Python's
    str.split and str.lower (e.g. a final Σ to ς) differ from the `tokenizers` normalizers."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """The kind, "clip" or "bpe" (run-trained), from the special tokens the vocabulary holds."""
    if tokenizer.token_to_id(CLIP_SOT) is not None and tokenizer.token_to_id(CLIP_EOT) is not None:
        return "clip"
    if None not in (tokenizer.token_to_id(t) for t in (PAD, SOT, EOT)):
        return "bpe"
    raise ValueError(f"tokenizer lacks the special tokens of either kind: {PAD}/{SOT}/{EOT} or {CLIP_SOT}/{CLIP_EOT}")


class TextEncoder:
    """Caption strings -> fixed-length id tensors: SOT, the caption's ids, EOT, padding; a
    caption too long is cut, EOT kept last. For a clip tokenizer the ids are OpenCLIP's
    (cleaning, SOT 49406, EOT 49407, padding 0); for a run-trained one <sot>/<eot>/<pad>."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.kind = tokenizer_kind(tokenizer)
        if self.kind == "clip":
            self.pad_id = CLIP_PAD_ID
            self.sot_id, self.eot_id = tokenizer.token_to_id(CLIP_SOT), tokenizer.token_to_id(CLIP_EOT)
        else:
            self.pad_id, self.sot_id, self.eot_id = (tokenizer.token_to_id(t) for t in (PAD, SOT, EOT))

    @classmethod
    def from_json(cls, text: str, context_length: int) -> "TextEncoder":
        return cls(Tokenizer.from_str(text), context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each caption's ids, without SOT/EOT and not cut."""
        if self.kind == "bpe":
            return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        cleaned = [clip_clean(t) for t in texts]
        encs = self.tokenizer.encode_batch(cleaned, add_special_tokens=False)
        return [self._clip_specials(t, e) if "_of_text>" in t else e.ids for t, e in zip(cleaned, encs)]

    def _clip_specials(self, text: str, enc: Encoding) -> list[int]:
        """OpenCLIP reads a piece of the split that is exactly "<start_of_text>" or
        "<end_of_text>" as that special token (where a caption holds one outside a run of
        punctuation): those pieces' BPE ids become the one special id."""
        special = {CLIP_SOT: self.sot_id, CLIP_EOT: self.eot_id}
        pieces: dict[int, list[int]] = {}
        for i, word in enumerate(enc.word_ids):
            pieces.setdefault(word, []).append(i)
        ids = []
        for idx in pieces.values():
            piece = text[enc.offsets[idx[0]][0]: enc.offsets[idx[-1]][1]]
            ids += [special[piece]] if piece in special else [enc.ids[i] for i in idx]
        return ids

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B, L] (long), eot_index [B]; long captions are cut, keeping EOT. For a
        clip tokenizer eot_index is the first EOT, where OpenCLIP pools (its argmax of the
        ids): earlier than the last only for a caption that holds "<end_of_text>" itself."""
        n = self.context_length
        tokens = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        eot = torch.empty(len(texts), dtype=torch.long)
        for i, caption in enumerate(self.encode(texts)):
            ids = [self.sot_id] + caption[: n - 2] + [self.eot_id]
            tokens[i, : len(ids)] = torch.tensor(ids)
            eot[i] = ids.index(self.eot_id) if self.kind == "clip" else len(ids) - 1
        return tokens, eot


def ensure_tokenizer(shards_dir: str, out_path, *, vocab_size: int, min_frequency: int,
                     extra_words: Iterable[str] = ()) -> bool:
    """Trains the run's tokenizer on the captions of `shards_dir` unless `out_path` (a path
    or a URL: vlm.rundir) exists. `extra_words` are words training will write into
    captions that the shards may lack (the colour augmentation's names): each is shown
    often enough to become one token. Returns True when it trained one."""
    import itertools

    from data_pipeline.shards.samples import iter_tar_samples, list_shards

    if rundir.exists(out_path):
        return False
    captions = (s.get("txt", "") for shard in list_shards(shards_dir) for s in iter_tar_samples(shard))
    extra = [f"a {w}" for w in extra_words] * max(100, min_frequency)
    captions = itertools.chain(captions, extra)
    _write(out_path, train_tokenizer(captions, vocab_size=vocab_size, min_frequency=min_frequency))
    return True


def _write(path: str | Path, tok: Tokenizer) -> None:
    rundir.write_text(path, tok.to_str())


def prepare_tokenizer(cfg) -> None:
    """The run's tokenizer in its run directory, unless one of the configured kind is there
    already (one of the other kind is refused): for "bpe" trained on the training captions
    (plus the colour augmentation's words), for "clip" CLIP's; says so when it makes one.
    A clip run whose model.text.context_length is not 77 gets OpenCLIP's ids at that length
    (its tokenizer takes a context length too): said here, as pretrained CLIP weights need 77."""
    path = rundir.join(cfg.run_dir, TOKENIZER_FILE)  # the run directory may be a URL
    kind = cfg.tokenizer.kind
    if not rundir.exists(path) and (cfg.model.init_from or "").startswith("vlm:"):
        source = init_tokenizer(cfg.model.init_from[len("vlm:"):])
        if (have := tokenizer_kind(source)) != kind:
            raise ValueError(f"model.init_from {cfg.model.init_from} was trained with a {have} tokenizer: "
                             f"set tokenizer.kind: {have}")
        _write(path, source)
        print(f"copied the tokenizer of model.init_from {cfg.model.init_from}: {path}")
    if rundir.exists(path) and (have := tokenizer_kind(Tokenizer.from_str(rundir.read_text(path)))) != kind:
        raise ValueError(f"{path} is a {have} tokenizer but tokenizer.kind is {kind}: "
                         "set tokenizer.kind to match, or use another run directory")
    if kind == "clip":
        _prepare_clip(cfg, path)
        return
    colour = cfg.data.colour_augment
    if ensure_tokenizer(cfg.path(cfg.data.train_shards), path, vocab_size=cfg.tokenizer.vocab_size,
                        min_frequency=cfg.tokenizer.min_frequency,
                        extra_words=[colour.grey_word] if colour.enabled else []):
        print(f"trained a BPE tokenizer on the training captions: {path}")


def init_tokenizer(source: str) -> Tokenizer:
    """The tokenizer of a vlm model that a run starts from (model.init_from vlm:PATH): an
    export's (in its metadata), or a run's or checkpoint's run directory's; its ids are the
    ones the weights were trained on, so a run-trained BPE must not be trained anew."""
    p = Path(source)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            text = (f.metadata() or {}).get("vlm_tokenizer")
        if text is None:
            raise ValueError(f"model.init_from {source}: not a vlm export (no tokenizer in its metadata)")
        return Tokenizer.from_str(text)
    for run in (p, p.parent.parent):  # a run directory, or RUN/checkpoints/TAG
        if (run / TOKENIZER_FILE).is_file():
            return Tokenizer.from_file(str(run / TOKENIZER_FILE))
    raise FileNotFoundError(f"model.init_from {source}: no {TOKENIZER_FILE} in the run directory")


def _prepare_clip(cfg, path: str) -> None:
    text = cfg.model.text
    if text.vocab_size not in (None, CLIP_VOCAB_SIZE):
        raise ValueError(f"tokenizer.kind clip has {CLIP_VOCAB_SIZE} tokens but model.text.vocab_size is "
                         f"{text.vocab_size}: leave it unset (null) or set it to {CLIP_VOCAB_SIZE}")
    if not rundir.exists(path):
        _write(path, clip_tokenizer())
        print(f"wrote CLIP's tokenizer (open_clip_torch's {CLIP_VOCAB_FILE}): {path}")
    if text.context_length != CLIP_CONTEXT_LENGTH:
        print(f"note: model.text.context_length is {text.context_length}: captions get OpenCLIP's ids cut to "
              f"that length; pretrained CLIP weights need {CLIP_CONTEXT_LENGTH}")


def load_run_tokenizer(run_dir: str | Path, context_length: int) -> tuple[str, TextEncoder]:
    """A run directory's (a path or a URL) tokenizer: its JSON (saved in every checkpoint) and encoder."""
    path = rundir.join(run_dir, TOKENIZER_FILE)
    try:
        text = rundir.read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{path} not found: `vlm train` and `vlm demo` make it "
                                "(either tokenizer.kind)") from None
    return text, TextEncoder.from_json(text, context_length)
