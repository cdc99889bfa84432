"""Evaluation protocols: zero-shot, retrieval, linear probe, dense, generative."""
