"""The caption rules of ingest: which captions a row is dropped for, before any download."""

from __future__ import annotations

from typing import Any

from data_pipeline.config import IngestConfig


def caption_reason(caption: Any, cfg: IngestConfig) -> tuple[str | None, str | None, str | None]:
    """(reason, detail, detected language) for a caption; reason None = keep.

    Cheap rules run before the download, so a row they drop costs no request."""
    if caption is None or not str(caption).strip():
        return "no_caption", None, None
    text = str(caption)
    words = len(text.split())
    if words < cfg.min_caption_words:
        return "caption_too_short", f"{words} words < {cfg.min_caption_words}", None
    if cfg.max_caption_words and words > cfg.max_caption_words:
        return "caption_too_long", f"{words} words > {cfg.max_caption_words}", None
    if len(text) < cfg.min_caption_length:
        return "caption_too_short", f"{len(text)} characters < {cfg.min_caption_length}", None
    if cfg.max_caption_length and len(text) > cfg.max_caption_length:
        return "caption_too_long", f"{len(text)} characters > {cfg.max_caption_length}", None
    if not cfg.languages:
        return None, None, None
    from data_pipeline.ingest.lang import detect

    language, score = detect(text)
    if language not in cfg.languages or score < cfg.min_language_score:
        return "wrong_language", f"{language} ({score:.2f})", language
    return None, None, language
