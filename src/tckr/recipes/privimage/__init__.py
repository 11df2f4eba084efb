"""PrivImage (USENIX Security 2024, arXiv 2311.12850): DP semantic query -> public-subset pretraining ->
DP-SGD diffusion fine-tuning -> FID and downstream accuracy under one end-to-end (epsilon, delta).

Its place in the house: a configuration (:mod:`.config`) and a stage registry (:mod:`.stages`) that the
CLI, the pipelines and the tracking already address by recipe; the stages themselves are not built yet.
"""
