"""Concept training: settings, images and prompts, prior preservation, pre-flight checks, cached
latents, the accelerate loop, checkpoints, resume and the run folder's lock, and the model card."""
