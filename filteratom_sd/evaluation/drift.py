"""The drift monitor's probes and scores: is the concept learnt, and does the rest of the model stay as it was?

A fixed, seeded probe set is sampled and scored with the UNet as it is at a given step:

- fidelity: images of every token prompt, the plain ones and those naming a new context, against the
  training images (`ProbeScorer`), as DreamBooth scores subject fidelity over all its prompts;
- alignment: token prompts that name a new context (another background, scene or colour);
- prior drift: for prompts without the token, the relative noise-prediction MSE of the UNet against the
  base UNet on fixed noisy latents and timesteps. The base predictions are taken once, before the first
  training step, when the adapter is still zero; the prior images' own scores are reported beside it;
- concept fit: the relative drop of the noise-prediction error on the training images with their captions
  (fixed noise and timesteps), which needs no extra model and stands in for fidelity where none is available.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..generation import SEED_MODULUS, generate_images

from .probes import ProbeScorer

_DRIFT_TIMESTEPS = (100, 300, 500, 700, 900)  # spread over the schedule: layout and detail both count
_UNET_BATCH = 16


@dataclass(frozen=True)
class ProbeSet:
    """The prompts the monitor samples, with the seed and sampler settings that make them repeatable."""

    concept: tuple[str, ...]
    context: tuple[str, ...]
    prior: tuple[str, ...]
    seed: int = 0
    sample_steps: int = 20
    guidance_scale: float = 5.0
    drift_timesteps: tuple[int, ...] = _DRIFT_TIMESTEPS

    @property
    def prompts(self) -> list[str]:
        """Every probe prompt, grouped concept, context, prior (the order of the probe grid)."""
        return [*self.concept, *self.context, *self.prior]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for monitor.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class MonitorRecord:
    """The scores of one monitored step (None: not measurable with the models available)."""

    step: int
    fidelity: float | None
    alignment: float | None
    prior_drift: float
    prior_accuracy: float | None
    concept_fit: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for monitor.json."""
        return asdict(self)


@dataclass
class MonitorReference:
    """What step 0 fixes for every later step: noisy latents, timesteps and the base UNet's predictions."""

    prior_latents: Tensor
    prior_timesteps: Tensor
    prior_prediction: Tensor
    concept_latents: Tensor
    concept_timesteps: Tensor
    concept_noise: Tensor
    concept_error: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The tensors, for caching in a safetensors file."""
        return {k: v.detach().cpu().contiguous() for k, v in self.__dict__.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "MonitorReference":
        """Rebuild from `tensors()` (a resumed run reuses the first run's reference)."""
        return cls(**{name: tensors[name] for name in cls.__dataclass_fields__})


@dataclass
class ProbeResult:
    """A monitored step's scores and the probe images (concept, context, prior)."""

    record: MonitorRecord
    images: list[Image.Image] = field(default_factory=list)


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % SEED_MODULUS)


@contextlib.contextmanager
def _eval_mode(unet: nn.Module) -> Iterator[None]:
    was_training = unet.training
    unet.eval()
    try:
        yield
    finally:
        unet.train(was_training)


class DriftMonitor:
    """Scores a UNet on a probe set; the pipeline supplies text encoder, VAE and scheduler (never changed)."""

    def __init__(self, pipe: Any, probes: ProbeSet, scorer: ProbeScorer, references: list[Image.Image]) -> None:
        self.pipe, self.probes, self.scorer, self.references = pipe, probes, scorer, references
        self.reference: MonitorReference | None = None
        self._concept_prompts: list[str] = []

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.pipe.device)
        return self.pipe.text_encoder(ids)[0]

    @torch.no_grad()
    def _predict(self, unet: nn.Module, latents: Tensor, timesteps: Tensor, embeddings: Tensor) -> Tensor:
        dtype, device = next(unet.parameters()).dtype, self.pipe.device
        out = []
        for start in range(0, len(latents), _UNET_BATCH):
            part = slice(start, start + _UNET_BATCH)
            out.append(unet(latents[part].to(device, dtype), timesteps[part].to(device),
                            embeddings[part].to(device, dtype)).sample.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _sample(self, unet: nn.Module) -> list[Image.Image]:
        original, self.pipe.unet = self.pipe.unet, unet
        try:
            return generate_images(self.pipe, self.probes.prompts, self.probes.seed, self.probes.sample_steps,
                            self.probes.guidance_scale, batch_size=len(self.probes.prompts))
        finally:
            self.pipe.unet = original

    @torch.no_grad()
    def _encode(self, images: list[Image.Image]) -> Tensor:
        import numpy as np

        pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]))
        pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).to(self.pipe.device, self.pipe.vae.dtype)
        return self.pipe.vae.encode(pixels).latent_dist.mean.float().cpu() * self.pipe.vae.config.scaling_factor

    def _noisy(self, clean: Tensor, timesteps: Tensor, salt: int) -> tuple[Tensor, Tensor]:
        noise = torch.randn(clean.shape, generator=_generator(self.probes.seed, salt))
        return self.pipe.scheduler.add_noise(clean, noise, timesteps), noise

    def _prior_inputs(self, prior_images: list[Image.Image]) -> tuple[Tensor, Tensor, Tensor]:
        """Every prior image's latent at every drift timestep, with its prompt's embedding."""
        steps = torch.tensor(self.probes.drift_timesteps, dtype=torch.long)
        clean = self._encode(prior_images)
        latents = clean.repeat_interleave(len(steps), dim=0)
        timesteps = steps.repeat(len(clean))
        noisy, _ = self._noisy(latents, timesteps, salt=1)
        return noisy, timesteps, self._embed(list(self.probes.prior)).repeat_interleave(len(steps), dim=0)

    def prepare(self, base_unet: nn.Module, concept_latents: Tensor, concept_prompts: list[str],
                cached: MonitorReference | None = None) -> ProbeResult | None:
        """Fix the reference (from `cached`, or from `base_unet`, which must still equal the base model).

        Without a cache this also scores step 0 and returns it (the base images are needed for the
        drift latents anyway); with one it returns None.
        """
        self._concept_prompts = concept_prompts
        if cached is not None:
            self.reference = cached
            return None
        started = time.perf_counter()
        with _eval_mode(base_unet):
            images = self._sample(base_unet)
            prior_images = images[len(self.probes.concept) + len(self.probes.context):]
            prior_latents, prior_timesteps, prior_embeddings = self._prior_inputs(prior_images)
            count = len(concept_latents)
            concept_timesteps = torch.tensor(self.probes.drift_timesteps, dtype=torch.long).repeat(count)[:count]
            concept_noisy, concept_noise = self._noisy(concept_latents.cpu().float(), concept_timesteps, salt=2)
            concept_prediction = self._predict(base_unet, concept_noisy, concept_timesteps, self._embed(concept_prompts))
            prior_prediction = self._predict(base_unet, prior_latents, prior_timesteps, prior_embeddings)
        self.reference = MonitorReference(
            prior_latents, prior_timesteps, prior_prediction,
            concept_noisy, concept_timesteps, concept_noise,
            ((concept_prediction - concept_noise) ** 2).mean(dim=(1, 2, 3)))
        return ProbeResult(self._record(0, images, self.reference.prior_prediction, self.reference.concept_error,
                                        started), images)

    @torch.no_grad()
    def score(self, unet: nn.Module, step: int) -> ProbeResult:
        """Sample and score the probes with `unet` as it is now (left in the mode it was in)."""
        if self.reference is None:
            raise RuntimeError("DriftMonitor.prepare must run before score.")
        started, ref = time.perf_counter(), self.reference
        prior_embeddings = self._embed(list(self.probes.prior)).repeat_interleave(len(self.probes.drift_timesteps), dim=0)
        with _eval_mode(unet):
            images = self._sample(unet)
            prior = self._predict(unet, ref.prior_latents, ref.prior_timesteps, prior_embeddings)
            concept = self._predict(unet, ref.concept_latents, ref.concept_timesteps, self._embed(self._concept_prompts))
        return ProbeResult(self._record(step, images, prior, ((concept - ref.concept_noise) ** 2).mean(dim=(1, 2, 3)),
                                        started), images)

    def _record(self, step: int, images: list[Image.Image], prior_prediction: Tensor, concept_error: Tensor,
                started: float) -> MonitorRecord:
        ref = self.reference
        n_concept, n_context = len(self.probes.concept), len(self.probes.context)
        concept_images, context_images = images[:n_concept], images[n_concept:n_concept + n_context]
        prior_images = images[n_concept + n_context:]
        return MonitorRecord(
            step=step,
            # the concept in new contexts counts too, not only on its training images' background
            fidelity=self.scorer.fidelity(concept_images + context_images, self.references),
            alignment=self.scorer.alignment(context_images, list(self.probes.context)),
            prior_drift=relative_mse(prior_prediction, ref.prior_prediction),
            prior_accuracy=self.scorer.prior_accuracy(prior_images, list(self.probes.prior)),
            concept_fit=1.0 - float(concept_error.mean() / ref.concept_error.mean().clamp_min(1e-12)),
            seconds=time.perf_counter() - started,
        )


def relative_mse(prediction: Tensor, base: Tensor) -> float:
    """||prediction - base||^2 / ||base||^2: how far predictions moved, as a fraction of their own size."""
    prediction, base = prediction.double(), base.double()
    return float(((prediction - base) ** 2).sum() / (base ** 2).sum().clamp_min(1e-12))
