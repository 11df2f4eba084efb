"""Classifiers: architectures, the one resumable training loop, and the classifier recipe (teacher, student,
shadows)."""
