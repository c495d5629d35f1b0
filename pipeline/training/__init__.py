"""Training: the batch stream, the loop and its rooms (rows, collectives, optimisers, checkpoints, compute)."""
