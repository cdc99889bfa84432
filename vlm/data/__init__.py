"""Training batches: shard samples to tensors, augmentation, the tokenizer."""
