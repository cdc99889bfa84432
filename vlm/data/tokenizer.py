"""A byte-level BPE tokenizer trained on the ingested captions with the `tokenizers` library."""
from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
TOKENIZER_FILE = "tokenizer.json"  # in the run directory


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


class TextEncoder:
    """Caption strings -> fixed-length id tensors with <sot> ... <eot> and padding."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.sot_id = tokenizer.token_to_id(SOT)
        self.eot_id = tokenizer.token_to_id(EOT)
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise ValueError("tokenizer lacks the <pad>/<sot>/<eot> special tokens")

    @classmethod
    def from_json(cls, text: str, context_length: int) -> "TextEncoder":
        return cls(Tokenizer.from_str(text), context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B, L] (long), eot_index [B]; long captions are cut, keeping <eot>."""
        n = self.context_length
        tokens = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        eot = torch.empty(len(texts), dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [self.sot_id] + enc.ids[: n - 2] + [self.eot_id]
            tokens[i, : len(ids)] = torch.tensor(ids)
            eot[i] = len(ids) - 1
        return tokens, eot


def ensure_tokenizer(shards_dir: str, out_path, *, vocab_size: int, min_frequency: int,
                     extra_words: Iterable[str] = ()) -> bool:
    """Trains the run's tokenizer on the captions of `shards_dir` unless `out_path` exists.
    `extra_words` are words training will write into captions that the shards may lack (the
    colour augmentation's names): each is shown often enough to become one token.
    Returns True when it trained one."""
    import itertools
    from pathlib import Path

    from data_pipeline.shards.samples import iter_tar_samples, list_shards

    out_path = Path(out_path)
    if out_path.is_file():
        return False
    captions = (s.get("txt", "") for shard in list_shards(shards_dir) for s in iter_tar_samples(shard))
    extra = [f"a {w}" for w in extra_words] * max(100, min_frequency)
    captions = itertools.chain(captions, extra)
    tok = train_tokenizer(captions, vocab_size=vocab_size, min_frequency=min_frequency)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(tok.to_str())
    tmp.replace(out_path)
    return True


def prepare_tokenizer(cfg) -> None:
    """The run's tokenizer in its run directory: trained on the training captions (plus the
    colour augmentation's words) unless one is there already; says so when it trains one."""
    from pathlib import Path

    path = Path(cfg.run_dir) / TOKENIZER_FILE
    colour = cfg.data.colour_augment
    if ensure_tokenizer(cfg.path(cfg.data.train_shards), path, vocab_size=cfg.tokenizer.vocab_size,
                        min_frequency=cfg.tokenizer.min_frequency,
                        extra_words=[colour.grey_word] if colour.enabled else []):
        print(f"trained a BPE tokenizer on the training captions: {path}")
