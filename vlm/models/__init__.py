"""Pure-torch model code (no DeepSpeed, no torch.distributed): import from the submodules, e.g. vlm.models.registry."""
