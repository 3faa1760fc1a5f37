"""The classifier, its checkpoints and its ImageNet weights."""
