"""Training: state, optimizer, the sharded step, checkpoints, metrics, the loop."""
