"""Training: the trainer, the experiment runner, checkpoints, warm start and the model-zoo evaluation."""
