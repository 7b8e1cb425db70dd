"""Training: the pure train step, EMA, checkpoints, and the Ray Train edges."""
