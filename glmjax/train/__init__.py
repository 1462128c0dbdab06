"""Training: losses (more to come: data, optimizer, checkpoints, the loop)."""
