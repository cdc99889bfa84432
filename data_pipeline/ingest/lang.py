"""Offline caption language identification with py3langid.

py3langid (a maintained fork of langid.py) ships its naive-Bayes model inside the wheel,
so nothing is downloaded at run time; it knows the languages `known_languages()` lists
(ISO 639 codes) and classifies a caption in tens of microseconds. The model loads once
per process (about a second), on first use.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_identifier = None


def _get():
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def detect(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability in [0, 1]) of the most likely language of ``text``."""
    code, prob = _get().classify(text)
    return code, float(prob)


def known_languages() -> list[str]:
    return sorted(_get().nb_classes)
