"""Checkpoints: store, discover, verify, inspect and export."""
