"""The demo: a synthetic corpus, its image server, the demo command's recipe."""
