"""Evaluation runs (`fa-sd eval`): sample a prompt set with each adapter (or none) and score the images.

Each prompt is sampled once per seed of its `PromptSet`, with the seeded generators of
`generation`, so batching never changes an image. Scores come from a `MetricSet` (metrics.py):
"tiny" for the bundled model, "embedding" (the paper's) otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..atomic import atomic_write_text
from ..core.adapter_file import read_adapter
from ..core.api import load_adapter, unload_adapter
from ..errors import UserInputError
from ..generation import generate_images
from ..models import load_pipeline
from ..output_paths import check_output_path
from ..tiny.checker import TOKEN_SHAPES
from ..tiny.domain import SHAPES
from ..training.data import load_concept_images
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_IMAGE_ENCODER, MetricSet, Scores, metric_set
from .prompt_sets import PromptSet, load_prompt_set

logger = logging.getLogger(__name__)


def default_metric_set(model: str | None) -> str:
    """"tiny" for the bundled model (model None), the paper's "embedding" metrics otherwise."""
    return "tiny" if model is None else "embedding"


def tiny_concept_shape(token: str) -> str:
    """The tiny checker's reference silhouette for a trigger token such as <castle>."""
    shape = TOKEN_SHAPES.get(token, token.strip("<>"))
    if shape not in (*SHAPES, "castle"):
        raise UserInputError(f"The tiny metrics know the castle and the eight pretraining shapes, not {token!r}; "
                             "use --metrics embedding.")
    return shape


def build_metric_set(name: str, token: str, image_encoder: str = DEFAULT_IMAGE_ENCODER,
                     clip_model: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu") -> MetricSet:
    """The named metric set, set up for the concept behind `token`."""
    if name == "tiny":
        return metric_set("tiny", concept_shape=tiny_concept_shape(token))
    if name == "embedding":
        return metric_set("embedding", image_encoder=image_encoder, clip_model=clip_model, device=device)
    return metric_set(name)  # raises the one-sentence error for unknown names


@dataclass
class Sample:
    """One generated image with its prompt and seed."""

    prompt: str
    seed: int
    index: int
    image: Image.Image


def generate_samples(pipe: Any, prompt_set: PromptSet, token: str) -> list[Sample]:
    """Every prompt once per seed, seed-major; image i of seed s uses `generation.image_generator(s, i)`."""
    prompts = prompt_set.for_token(token)
    samples: list[Sample] = []
    for seed in prompt_set.seeds:
        images = generate_images(pipe, prompts, seed, prompt_set.steps, prompt_set.guidance_scale, prompt_set.batch_size)
        samples += [Sample(p, seed, i, im) for i, (p, im) in enumerate(zip(prompts, images))]
    return samples


def score_samples(metrics: MetricSet, samples: list[Sample], references: list[Image.Image]) -> Scores:
    """Fidelity, diversity and alignment of generated samples against the concept's training images."""
    return metrics.score([s.image for s in samples], [s.prompt for s in samples], references)


def sample_with_adapter(pipe: Any, adapter: str | os.PathLike | None, prompt_set: PromptSet, token: str) -> list[Sample]:
    """Samples with one adapter loaded (None: the base model); the pipeline is left as it was."""
    if adapter is None:
        return generate_samples(pipe, prompt_set, token)
    name = load_adapter(pipe, adapter, adapter_name="evaluated")
    try:
        return generate_samples(pipe, prompt_set, token)
    finally:
        unload_adapter(pipe, name)


@dataclass
class EvalRequest:
    """What `fa-sd eval` was asked for."""

    adapters: list[str]
    images: str
    model: str | None = None
    include_base: bool = False
    token: str | None = None
    prompts_file: str | None = None
    metrics: str | None = None
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    clip_model: str = DEFAULT_CLIP_MODEL
    out: Path = Path("eval.json")

    def validate(self) -> None:
        """One-sentence errors before any model is loaded."""
        if not self.adapters and not self.include_base:
            raise UserInputError("Give at least one --adapter (or --base to score the base model).")
        for adapter in self.adapters:
            if not Path(adapter).exists():
                raise UserInputError(f"No adapter file or folder at {adapter}.")
        if self.include_base and not self.token and not self.adapters:
            raise UserInputError("Scoring only the base model needs --token (the concept's trigger token).")
        check_output_path(self.out, "--out", folder=False)


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Score each adapter (and the base model with --base) and write the results as JSON; returns them."""
    request.validate()
    prompt_set = load_prompt_set(request.prompts_file, bundled=request.model is None)
    references = [i.image for i in load_concept_images(request.images)]
    files = [read_adapter(Path(a)) for a in request.adapters]
    tokens = [request.token or f.token or "" for f in files]
    if any(not t for t in tokens):
        raise UserInputError("An adapter names no trigger token; pass --token.")
    base_token = request.token or (tokens[0] if tokens else "")
    metrics_name = request.metrics or default_metric_set(request.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metric_sets: dict[str, MetricSet] = {}

    def metrics_for(token: str) -> MetricSet:
        if token not in metric_sets:
            metric_sets[token] = build_metric_set(metrics_name, token, request.image_encoder, request.clip_model, device)
        return metric_sets[token]

    for token in {*tokens, *([base_token] if request.include_base else [])}:
        metrics_for(token)  # unknown metric sets and concepts fail before any image is drawn
    pipe = load_pipeline(request.model)
    pipe.to(device)
    rows: list[tuple[str, str | None, str | None, str]] = [("base", None, None, base_token)] if request.include_base else []
    rows += [(f.path.stem, str(f.path), f.method, t) for f, t in zip(files, tokens)]
    results = []
    for label, adapter, method, token in rows:
        samples = sample_with_adapter(pipe, adapter, prompt_set, token)
        scores = score_samples(metrics_for(token), samples, references)
        logger.info("%s: fidelity %.4f, diversity %.3f, alignment %.4f", label, scores.fidelity, scores.diversity,
                    scores.alignment)
        results.append({"label": label, "adapter": adapter, "method": method, "token": token, **scores.to_dict()})
    report = {"metric_set": metrics_name, "model": request.model or "bundled tiny model",
              "references": len(references), "prompt_set": prompt_set.to_dict(), "results": results}
    if metrics_name == "embedding":
        report.update(image_encoder=request.image_encoder, clip_model=request.clip_model)
    atomic_write_text(request.out, json.dumps(report, indent=2) + "\n")
    return report
