"""Image generators: captioning, the offline pixel-space UNet, Stable Diffusion, LoRA, generation in shards."""
