"""Curation of written shards: scoring, filtering, inspection."""
