"""Training stack: arguments, LR schedule, the loop, logging, checkpoints."""
