"""Data: URL+caption tables to webdataset shards (ingest), the shard format, curation."""
