"""How the drift monitor scores its probe images, and its default probe prompts.

On the bundled tiny model the colour-and-silhouette checker scores everything offline. On other
models DINOv2 (fidelity) and CLIP (alignment) are used when their weights are already on this
machine; otherwise fidelity falls back to the monitor's concept fit and alignment is not measured.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Contexts for models other than the bundled one, after DreamBooth's evaluation prompts.
_CONTEXTS = ("a {} in the jungle", "a {} on the beach", "a {} in the snow", "a red {}")
_UNRELATED = ("a photo of a dog", "a city street at night", "a bowl of fruit on a table", "a mountain lake at sunrise")


class ProbeScorer(ABC):
    """Scores of probe images; None where this scorer cannot measure a quantity."""

    fidelity_metric: str = "none"
    alignment_metric: str = "none"

    @abstractmethod
    def fidelity(self, images: list[Image.Image], references: list[Image.Image]) -> float | None:
        """How much token-prompt images look like the training images (higher: closer)."""

    @abstractmethod
    def alignment(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        """How well token prompts that name a new context are followed (higher: better)."""

    def prior_accuracy(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        """How well prompts without the token are followed (higher: better)."""
        return None

    def describe(self) -> dict[str, str]:
        """Which metric each score is, for monitor.json and the model card."""
        return {"fidelity": self.fidelity_metric, "alignment": self.alignment_metric}


class TinyProbeScorer(ProbeScorer):
    """The tiny domain's checker: silhouettes for fidelity, background colours for alignment."""

    fidelity_metric = "silhouette IoU with the training images' shapes (tiny checker)"
    alignment_metric = "background colour asked for in new-context prompts (tiny checker)"

    def __init__(self) -> None:
        self._reference_masks: tuple[list[Image.Image], list[np.ndarray | None]] | None = None

    def _masks(self, references: list[Image.Image]) -> list[np.ndarray | None]:
        from ..tiny.checker import analyse, normalise_mask

        if self._reference_masks is None or self._reference_masks[0] is not references:
            self._reference_masks = (references, [normalise_mask(analyse(im).mask) for im in references])
        return self._reference_masks[1]

    def fidelity(self, images: list[Image.Image], references: list[Image.Image]) -> float | None:
        from ..tiny.checker import analyse, normalise_mask, normalised_similarity

        masks = self._masks(references)
        # each mask is normalised once, not once per reference: the monitor scores a dozen images every time
        return float(np.mean([max(normalised_similarity(own, ref) for ref in masks)
                              for own in (normalise_mask(analyse(im).mask) for im in images)]))

    def alignment(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        from ..tiny.checker import score_images

        return score_images(images, prompts)["background_accuracy"]

    def prior_accuracy(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        """Mean of the checker's background, shape-colour and shape accuracies."""
        from ..tiny.checker import score_images

        scores = score_images(images, prompts)
        measured = [scores[k] for k in ("background_accuracy", "colour_accuracy", "shape_accuracy") if scores[k] is not None]
        return float(np.mean(measured))


def _available_locally(model_id: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


class EmbeddingProbeScorer(ProbeScorer):
    """DINOv2 and CLIP where their weights are on this machine (never downloaded during training)."""

    def __init__(self, concept_word: str, token: str, image_encoder: str, clip_model: str, device: Any = "cpu") -> None:
        from .metrics import EmbeddingMetrics

        self.concept_word, self.token = concept_word, token
        self.has_encoder = _available_locally(image_encoder)
        self.has_clip = _available_locally(clip_model)
        self.metrics = EmbeddingMetrics(image_encoder, clip_model, device=device)
        self.fidelity_metric = f"DINOv2 cosine with the training images ({image_encoder})" if self.has_encoder \
            else "concept fit (no DINOv2 weights on this machine)"
        self.alignment_metric = f"CLIP image-prompt cosine, token read as {concept_word!r} ({clip_model})" \
            if self.has_clip else "not measured (no CLIP weights on this machine)"
        if not (self.has_encoder and self.has_clip):
            logger.info("drift monitor: fidelity by %s; alignment %s", self.fidelity_metric, self.alignment_metric)

    def fidelity(self, images: list[Image.Image], references: list[Image.Image]) -> float | None:
        return self.metrics.fidelity(images, references) if self.has_encoder else None

    def alignment(self, images: list[Image.Image], prompts: list[str]) -> float | None:
        if not self.has_clip:
            return None
        return self.metrics.alignment(images, [p.replace(self.token, self.concept_word) for p in prompts])


def tiny_probe_prompts(token: str, class_prompts: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(concept, context, prior) prompts for the bundled model: every palette background; two class prompts and
    unrelated shapes, eight prompts without the token in all."""
    from ..tiny.checker import evaluation_prompts
    from ..tiny.domain import PALETTE

    context = [f"a {token} on a {colour} background" for colour in PALETTE]
    classes = list(dict.fromkeys(class_prompts))[:2]
    prior = classes + evaluation_prompts(8)[: 8 - len(classes)]
    return [f"a {token}"] * 4, context, prior


def general_probe_prompts(token: str, template: str, class_prompts: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(concept, context, prior) prompts for any other base model."""
    prior = list(dict.fromkeys(class_prompts))[:2] + list(_UNRELATED)
    return [template.format(token)] * 2, [c.format(token) for c in _CONTEXTS], prior
