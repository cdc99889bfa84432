"""The `vlm` command line: one module per command group; each parses, checks and calls."""
