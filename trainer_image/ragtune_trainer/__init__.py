"""The ragtune trainer: data, QLoRA/LoRA training, checkpoints and the pod entry point."""
