"""The engine: solver, data, metrics, checkpoints, the train/test loop."""
