"""Fidelity, diversity and text-image alignment of generated images (the paper's section 4.3).

Two metric sets share one interface (`MetricSet.score`):

- "embedding" (the paper's): fidelity = mean cosine similarity of DINOv2 embeddings between every
  generated and every training image; diversity = Vendi score of the generated images' DINOv2
  embeddings; alignment = mean CLIP cosine similarity between each image and its prompt.
  Defaults follow the evaluation the paper adopts (Yeh et al. 2023): DINOv2 ViT-L/14 and
  OpenAI CLIP ViT-L/14; any hub id or local folder can replace them.
- "tiny" (offline, for the bundled tiny domain, via `tiny.checker`): fidelity = silhouette similarity
  of each image's shape to the concept's silhouette; alignment = fraction of the colours a prompt
  names (background, shape) that the image shows; diversity = Vendi score of downsampled pixels.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import UserInputError
from ..tiny.checker import analyse, parse_prompt, silhouette_similarity
from .vendi import vendi_score

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_ENCODER = "facebook/dinov2-large"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass
class Scores:
    """The three numbers of Table 2 for one set of generated images."""

    metric_set: str
    images: int
    fidelity: float
    diversity: float
    alignment: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def _normalised(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1)


def mean_cross_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j)."""
    return float((_normalised(a) @ _normalised(b).T).mean())


def mean_paired_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of the pairs (a_i, b_i)."""
    return float((_normalised(a) * _normalised(b)).sum(-1).mean())


class MetricSet(ABC):
    """A way to measure fidelity, diversity and alignment of generated images."""

    name: ClassVar[str]

    @abstractmethod
    def fidelity(self, generated: list[Image.Image], references: list[Image.Image]) -> float:
        """How much the generated images look like the concept (higher: closer)."""

    @abstractmethod
    def diversity(self, generated: list[Image.Image]) -> float:
        """Effective number of distinct generated images (Vendi score)."""

    @abstractmethod
    def alignment(self, generated: list[Image.Image], prompts: list[str]) -> float:
        """How well each image follows its prompt (higher: better)."""

    def score(self, generated: list[Image.Image], prompts: list[str], references: list[Image.Image]) -> Scores:
        """All three metrics; `prompts[i]` is the prompt of `generated[i]`."""
        check_inputs(generated, prompts, references, self.name)
        return Scores(self.name, len(generated), self.fidelity(generated, references), self.diversity(generated),
                      self.alignment(generated, prompts))


def check_inputs(generated: list[Image.Image], prompts: list[str], references: list[Image.Image], metrics: str) -> None:
    """UserInputError unless there are images, one prompt per image and some references."""
    if not generated:
        raise UserInputError("There are no generated images to evaluate.")
    if len(prompts) != len(generated):
        raise UserInputError(f"Got {len(generated)} generated images but {len(prompts)} prompts; give one prompt per image.")
    if not references:
        raise UserInputError("Fidelity needs the concept's training images; none were given.")
    logger.info("evaluating %d images with the %s metrics", len(generated), metrics)


def _load(what: str, model_id: str, loader: Callable[[], Any]) -> Any:
    try:
        return loader()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"Cannot load the {what} {model_id!r} (a hub id or a local folder): {first}") from None


class EmbeddingMetrics(MetricSet):
    """The paper's metrics: DINOv2 embeddings for fidelity and diversity, CLIP for alignment."""

    name = "embedding"

    def __init__(self, image_encoder: str = DEFAULT_IMAGE_ENCODER, clip_model: str = DEFAULT_CLIP_MODEL,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        self.image_encoder_id = image_encoder
        self.clip_model_id = clip_model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._encoder: tuple[Any, Any] | None = None
        self._clip: tuple[Any, Any] | None = None

    def _processor_and_model(self, what: str, model_id: str, processor_class: Any, model_class: Any) -> tuple[Any, Any]:
        # The PIL backend: the same preprocessing everywhere, and torchvision is not needed.
        processor = _load(what, model_id, lambda: processor_class.from_pretrained(model_id, backend="pil"))
        model = _load(what, model_id, lambda: model_class.from_pretrained(model_id))
        return processor, model.eval().to(self.device)

    def _image_encoder(self) -> tuple[Any, Any]:
        if self._encoder is None:
            from transformers import AutoImageProcessor, AutoModel  # heavy: only when these metrics run

            self._encoder = self._processor_and_model("image encoder", self.image_encoder_id, AutoImageProcessor,
                                                      AutoModel)
        return self._encoder

    def _clip_model(self) -> tuple[Any, Any]:
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            self._clip = self._processor_and_model("CLIP model", self.clip_model_id, CLIPProcessor, CLIPModel)
        return self._clip

    @torch.inference_mode()
    def image_embeddings(self, images: list[Image.Image]) -> Tensor:
        """One embedding per image: the image encoder's pooled output (DINOv2: the normalised CLS token)."""
        processor, model = self._image_encoder()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start: start + self.batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, model.dtype)
            out.append(model(pixel_values=pixels).pooler_output.float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def clip_similarities(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        """Cosine similarity in CLIP space of each image with its own prompt."""
        processor, model = self._clip_model()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start: start + self.batch_size]]
            inputs = processor(text=prompts[start: start + self.batch_size], images=batch, return_tensors="pt",
                               padding=True, truncation=True).to(self.device)
            result = model(**inputs)
            out.append((_normalised(result.image_embeds) * _normalised(result.text_embeds)).sum(-1).float().cpu())
        return torch.cat(out)

    def fidelity(self, generated: list[Image.Image], references: list[Image.Image]) -> float:
        return mean_cross_cosine(self.image_embeddings(generated), self.image_embeddings(references))

    def diversity(self, generated: list[Image.Image]) -> float:
        return vendi_score(self.image_embeddings(generated))

    def alignment(self, generated: list[Image.Image], prompts: list[str]) -> float:
        return float(self.clip_similarities(generated, prompts).mean())

    def score(self, generated: list[Image.Image], prompts: list[str], references: list[Image.Image]) -> Scores:
        check_inputs(generated, prompts, references, self.name)
        embedded = self.image_embeddings(generated)  # once, for both fidelity and diversity
        return Scores(self.name, len(generated), mean_cross_cosine(embedded, self.image_embeddings(references)),
                      vendi_score(embedded), self.alignment(generated, prompts))


def pixel_features(images: list[Image.Image], size: int = 16) -> Tensor:
    """Each image downsampled to size x size RGB in [-1, 1], flattened (a simple embedding for Vendi)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).reshape(len(images), -1) / 127.5 - 1.0


class TinyMetrics(MetricSet):
    """Offline counterparts for the tiny domain, from the colour and silhouette checker.

    Fidelity compares each image's shape with the concept's known silhouette (`concept_shape`),
    so the references are only checked to be present.
    """

    name = "tiny"

    def __init__(self, concept_shape: str = "castle", feature_size: int = 16) -> None:
        self.concept_shape = concept_shape
        self.feature_size = feature_size

    def fidelity(self, generated: list[Image.Image], references: list[Image.Image]) -> float:
        return float(np.mean([silhouette_similarity(analyse(im).mask, self.concept_shape) for im in generated]))

    def diversity(self, generated: list[Image.Image]) -> float:
        return vendi_score(pixel_features(generated, self.feature_size))

    def alignment(self, generated: list[Image.Image], prompts: list[str]) -> float:
        per_image = []
        for image, prompt in zip(generated, prompts):
            spec, seen = parse_prompt(prompt), analyse(image)
            checks = [seen.background == spec.background] if spec.background else []
            checks += [seen.colour == spec.colour] if spec.colour else []
            if checks:
                per_image.append(sum(checks) / len(checks))
        if not per_image:
            raise UserInputError("No prompt names a colour the tiny checker can verify (e.g. 'on a red background').")
        return float(np.mean(per_image))


METRIC_SETS: dict[str, type[MetricSet]] = {"embedding": EmbeddingMetrics, "tiny": TinyMetrics}


def metric_set(name: str, **options: Any) -> MetricSet:
    """A metric set by name ("embedding" or "tiny") with its options."""
    if name not in METRIC_SETS:
        raise UserInputError(f"Unknown metric set {name!r}; choose one of: {', '.join(METRIC_SETS)}.")
    try:
        return METRIC_SETS[name](**options)
    except TypeError:
        raise UserInputError(f"The {name} metrics do not take the options {', '.join(sorted(options))}.") from None
