"""The training set as cached latents: each view's VAE latent distribution, loss weights and prompt embedding.

The VAE and the text encoder run once per run, before the first step; the loop samples from the cache.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..generation import truncate_prompt
from .data import training_views


@torch.no_grad()
def encode_latents(vae, views: torch.Tensor, device, dtype, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(views), batch):
        dist = vae.encode(views[start:start + batch].to(device, dtype)).latent_dist
        means.append(dist.mean.float()), stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def prompt_ids(pipe, prompts: list[str], device) -> torch.Tensor:
    """Token ids of the prompts, padded to the tokenizer's length."""
    tokenizer = pipe.tokenizer
    prompts = [truncate_prompt(tokenizer, p) for p in prompts]  # warns, instead of cutting silently
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    return pipe.text_encoder(prompt_ids(pipe, prompts, device))[0].float()


class LatentSet:
    """Cached latents of a set of views, each view's loss weights and prompt embedding."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weights: torch.Tensor, embeddings: torch.Tensor,
                 prompt_of_view: list[int], scaling: float, view_prompts: list[str],
                 prompts: list[str] | None = None) -> None:
        self.prompts = prompts or []  # the prompt of each row of `embeddings`
        self.mean, self.std, self.weights, self.embeddings, self.scaling = mean, std, weights, embeddings, scaling
        self.prompt_of_view = torch.tensor(prompt_of_view)
        self.view_prompts = view_prompts
        self.caption_dropout, self.empty_embedding = 0.0, None
        self.encode: Callable[[], torch.Tensor] | None = None

    def encode_each_step(self, encode: Callable[[], torch.Tensor]) -> None:
        """Embed the prompts anew at every sample with `encode` (its rows: the cached embeddings' prompts).

        A trained token embedding changes every step, and its gradient flows through this call.
        """
        self.encode = encode

    def drop_captions(self, probability: float, empty_embedding: torch.Tensor) -> None:
        """Train each sampled view with the empty prompt with this probability (caption dropout)."""
        self.caption_dropout, self.empty_embedding = probability, empty_embedding

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.mean), (count,), generator=generator)
        eps = torch.randn(self.std[idx].shape, generator=generator).to(self.std.device)
        latents = (self.mean[idx] + self.std[idx] * eps) * self.scaling
        table = self.embeddings if self.encode is None else self.encode()
        embeddings = table[self.prompt_of_view[idx].to(table.device)]
        if self.caption_dropout > 0:
            dropped = (torch.rand(count, generator=generator) < self.caption_dropout).to(embeddings.device)
            embeddings = torch.where(dropped[:, None, None], self.empty_embedding, embeddings)
        return latents, embeddings, self.weights[idx]


def loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights from image masks (N x 1 x H x W in [0, 1]): 1 inside, unmasked_weight outside."""
    coverage = F.interpolate(masks, size=latent_size, mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * coverage


def latent_set(pipe, images, prompts, settings, device, dtype, seed_offset: int, masks=None) -> LatentSet:
    views, view_masks, owners = training_views(images, settings.resolution, settings.center_crop, settings.flip,
                                               settings.seed + seed_offset, masks=masks)
    mean, std = encode_latents(pipe.vae, views, device, dtype)
    weights = loss_weights(view_masks, tuple(mean.shape[-2:]), settings.unmasked_weight if settings.masked_loss else 1.0)
    distinct = sorted(set(prompts))
    embeddings = encode_prompts(pipe, distinct, device)
    prompt_of_view = [distinct.index(prompts[o]) for o in owners]
    return LatentSet(mean, std, weights.to(device), embeddings, prompt_of_view, pipe.vae.config.scaling_factor,
                     [prompts[o] for o in owners], distinct)
