"""Everything about a Ray cluster: launching the trainer on Ray Train, the CLI composition root."""
