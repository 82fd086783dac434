"""Training: the single-process trainer, the one epoch loop, the Ray Train edge, fine-tuning."""
