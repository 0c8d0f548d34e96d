"""Concept training: settings, images and prompts, prior preservation, pre-flight checks, cached
latents, the accelerate loop, checkpoints and the model card."""
