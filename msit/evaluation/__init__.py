"""Evaluation: metrics, ranking over a scene's catalogue, the transfer report."""
