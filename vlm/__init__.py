"""Models, objectives, the DeepSpeed training engine, checkpoints, evaluation and metrics.

Runs under plain torch.distributed; never imports Ray (that is cluster/'s job).
"""
