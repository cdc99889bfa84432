"""Training: the Trainer, the module DeepSpeed wraps, the gradient cache and rendezvous."""
