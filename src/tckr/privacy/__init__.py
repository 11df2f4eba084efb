"""Measuring what leaks: LiRA, its shadow models and the attack on trained targets."""
