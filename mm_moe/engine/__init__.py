"""Training engine: optimizer and schedule, checkpoints with exact resume, the trainer, distributed set-up."""
