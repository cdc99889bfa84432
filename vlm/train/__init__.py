"""Training: the Trainer (and its optimizer, DeepSpeed config, step log, stop), the wrapped module, the gradient cache."""
