"""The shard format: paths, atomic commit, committed-shard detection, writing and reading."""
