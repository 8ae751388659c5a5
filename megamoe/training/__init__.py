"""Training stack: the run's config dataclasses and flags, LR schedule, the loop, logging, checkpoints."""
