"""Ingestion: URL+caption tables to webdataset shards."""
