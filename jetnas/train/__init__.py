"""Training: token data, the trainer, checkpoints, torchrun data parallelism."""
