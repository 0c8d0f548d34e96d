"""`fa-sd compare`: train several methods on one concept with the same seed and steps, score them, write a report.

The report folder holds report.md (a table like the paper's Table 2: fidelity, diversity, alignment,
trainable parameters, adapter size, training time), alignment-vs-fidelity.png, grids/<run>.png
(one image grid per method), results.json, and runs/<run>/ with each run's adapter and metrics.
A run is reused when its adapter and metrics exist and were made with the same settings, so an
interrupted comparison continues where it stopped and a finished one re-renders without training.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from ..errors import ConfigError, UserInputError
from ..images import make_grid, save_image
from ..methods.registry import method_class
from ..models import load_pipeline
from ..training.data import load_concept_images
from ..training.loop import train
from ..training.settings import TrainingSettings, resolve_settings
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_IMAGE_ENCODER
from .records import content_key, read_record
from .prompt_sets import PromptSet, load_prompt_set
from .report import BASE_LABEL, GRID_COLUMNS, GRID_SEEDS, RunRecord, write_json, write_report
from .runs import build_metric_set, default_metric_set, sample_with_adapter, score_samples

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("filter-atoms:C1,filter-atoms:C2,filter-atoms:C3,filter-atoms:C4,liera,lora,loha,lokr,oft,"
                   "bitfit,difffit,full")
OPTION_ALIASES = {"r": "rank"}
GRID_THUMBNAIL = 128  # px, larger images are shrunk in grids


@dataclass
class MethodSpec:
    """One entry of --methods: a method, its preset or options, an optional learning rate."""

    text: str
    method: str
    preset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    @property
    def slug(self) -> str:
        """The run's folder name ("filter-atoms:C1" -> "filter-atoms-c1")."""
        return re.sub(r"[^a-z0-9.]+", "-", self.text.lower()).strip("-")

    def training_values(self) -> dict[str, Any]:
        """The training settings this spec sets."""
        values: dict[str, Any] = {"method": self.method, "method_options": dict(self.options)}
        if self.preset is not None:
            values["preset"] = self.preset
        if self.lr is not None:
            values["lr"] = self.lr
        return values


def _scalar(text: str) -> Any:
    """A YAML scalar; numbers such as 1e-2 (a string to YAML 1.1) become floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_method_specs(text: str) -> list[MethodSpec]:
    """Parse "filter-atoms:C1,lora:r=4,alpha=4,bitfit" into specs.

    Entries are comma-separated; "method:X" starts a spec whose X is a preset or key=value; a later
    key=value without a colon adds an option to the spec before it. `r` means `rank`; `lr` sets the
    learning rate of that run. Each spec is checked against its method before anything trains.
    """
    specs: list[MethodSpec] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if ":" in item or "=" not in item:
            method, _, rest = item.partition(":")
            method = method.strip()
            if not method:
                raise UserInputError(f"--methods entry {item!r} names no method.")
            specs.append(MethodSpec(text=item, method=method))
            if not rest.strip():
                continue
            item = rest.strip()
        elif not specs:
            raise UserInputError(f"--methods starts with an option {item!r}; name a method first (lora:r=4).")
        else:
            specs[-1].text += f",{item}"
        spec = specs[-1]
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            if spec.method != "filter-atoms":
                raise UserInputError(f"--methods entry {spec.text!r}: only filter-atoms takes a preset; "
                                     "give other methods key=value options.")
            spec.preset = key
        elif key == "lr":
            lr = _scalar(value)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise UserInputError(f"--methods entry {spec.text!r}: lr must be a positive number, got {value!r}.")
            spec.lr = float(lr)
        elif key == "preset" and spec.method == "filter-atoms":
            spec.preset = str(_scalar(value))
        elif not key:
            raise UserInputError(f"--methods entry {spec.text!r} has an option without a name.")
        else:
            spec.options[OPTION_ALIASES.get(key, key)] = _scalar(value)
    if not specs:
        raise UserInputError("--methods lists no method.")
    seen: set[str] = set()
    for spec in specs:
        if spec.slug in seen or spec.slug == BASE_LABEL:
            raise UserInputError(f"--methods lists {spec.text!r} twice (or under a reserved name).")
        seen.add(spec.slug)
        options = dict(spec.options)
        if spec.preset is not None:
            options["preset"] = spec.preset
        try:
            method_class(spec.method).from_config_dict(options)
        except ConfigError as exc:
            raise UserInputError(f"--methods entry {spec.text!r}: {exc}") from None
    return specs


@dataclass
class CompareRequest:
    """What `fa-sd compare` was asked for."""

    concept: str
    images: str
    specs: list[MethodSpec]
    out: Path
    model: str | None = None
    token: str | None = None
    steps: int | None = None
    seed: int | None = None
    config_file: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # further training settings, same for every run
    prompts_file: str | None = None
    metrics: str | None = None
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    clip_model: str = DEFAULT_CLIP_MODEL
    include_base: bool = True
    progress: bool = False
    command: str | None = None  # recorded in the report


# Comparison runs are scored at the steps asked for: the final adapter is the last step (not the drift
# monitor's pick), and the monitor, which would only add sampling time, stays off.
SCORED_AT_FIXED_STEPS: dict[str, Any] = {"monitor": False, "keep": "last"}


def _training_key(settings: TrainingSettings, lr: float) -> str:
    """What the trained adapter depends on: every setting but the output folder, with the effective lr."""
    values = settings.to_dict()
    values.pop("output_dir")
    values.pop("lr_by_method")
    values["lr"] = lr
    return content_key(values)


def _save_grid(samples: list, prompt_set: PromptSet, path: Path) -> None:
    """The first GRID_COLUMNS prompts (columns) for the first GRID_SEEDS seeds (rows)."""
    columns = min(GRID_COLUMNS, len(prompt_set.prompts))
    seeds = prompt_set.seeds[:GRID_SEEDS]
    chosen = [s.image for s in samples if s.seed in seeds and s.index < columns]
    thumbs = [im if max(im.size) <= GRID_THUMBNAIL else im.resize((GRID_THUMBNAIL, GRID_THUMBNAIL), Image.Resampling.LANCZOS)
              for im in chosen]
    # 256 colours: a third of the bytes, so report folders with a dozen grids stay small enough to commit.
    save_image(make_grid(thumbs, columns).quantize(colors=256, dither=Image.Dither.NONE), path)


class _Evaluator:
    """One base pipeline and metric set shared by every run's evaluation."""

    def __init__(self, request: CompareRequest, token: str, prompt_set: PromptSet, references: list[Image.Image]) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.metrics_name = request.metrics or default_metric_set(request.model)
        self.metrics = build_metric_set(self.metrics_name, token, request.image_encoder, request.clip_model, self.device)
        self.request, self.token, self.prompt_set, self.references = request, token, prompt_set, references
        self._pipe = None
        self.key = content_key({"prompt_set": prompt_set.to_dict(), "metrics": self.metrics_name, "token": token,
                         "model": request.model, "references": len(references),
                         "encoders": [request.image_encoder, request.clip_model] if self.metrics_name == "embedding" else None})

    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = load_pipeline(self.request.model).to(self.device)
        return self._pipe

    def evaluate(self, adapter: Path | None, grid: Path) -> Any:
        samples = sample_with_adapter(self.pipe(), adapter, self.prompt_set, self.token)
        _save_grid(samples, self.prompt_set, grid)
        return score_samples(self.metrics, samples, self.references)


def _settings(request: CompareRequest, spec: MethodSpec, run_dir: Path) -> TrainingSettings:
    values: dict[str, Any] = {**request.training, "concept": request.concept, "images": request.images,
                              "model": request.model, "token": request.token, "steps": request.steps,
                              "seed": request.seed, "output_dir": str(run_dir), **spec.training_values(),
                              **SCORED_AT_FIXED_STEPS}
    return resolve_settings(values, request.config_file)


def _run_method(request: CompareRequest, spec: MethodSpec, evaluator: _Evaluator) -> RunRecord:
    run_dir = request.out / "runs" / spec.slug
    settings = _settings(request, spec, run_dir)
    lr, lr_source = settings.learning_rate()
    train_key = _training_key(settings, lr)
    adapter = run_dir / f"{settings.concept}.safetensors"
    metrics_file, train_file, grid = run_dir / "metrics.json", run_dir / "train.json", run_dir / "grid.png"

    finished = read_record(metrics_file)
    if adapter.is_file() and grid.is_file() and finished and finished.get("train_key") == train_key \
            and finished.get("eval_key") == evaluator.key:
        logger.info("%s: reusing the finished run in %s", spec.text, run_dir)
        return RunRecord.from_dict({**finished, "reused": True})

    trained = read_record(train_file)
    if not (adapter.is_file() and trained and trained.get("train_key") == train_key):
        logger.info("%s: training %d steps at lr %g", spec.text, settings.steps, lr)
        result = train(settings, overwrite=True, progress=request.progress)
        trained = {"train_key": train_key, "trainable_parameters": result.trainable_parameters,
                   "train_seconds": round(result.seconds, 2), "final_loss": result.losses[-1] if result.losses else None}
        write_json(train_file, trained)
    logger.info("%s: sampling %d images", spec.text, len(evaluator.prompt_set.prompts) * len(evaluator.prompt_set.seeds))
    scores = evaluator.evaluate(adapter, grid)
    record = RunRecord(label=spec.text, slug=spec.slug, method=spec.method, fidelity=scores.fidelity,
                       diversity=scores.diversity, alignment=scores.alignment, images=scores.images,
                       trainable_parameters=trained["trainable_parameters"], adapter_bytes=adapter.stat().st_size,
                       train_seconds=trained["train_seconds"], final_loss=trained["final_loss"], lr=lr,
                       lr_source=lr_source, train_key=train_key, eval_key=evaluator.key)
    write_json(metrics_file, record.to_dict())
    return record


def _run_base(request: CompareRequest, evaluator: _Evaluator) -> RunRecord:
    run_dir = request.out / "runs" / BASE_LABEL
    metrics_file, grid = run_dir / "metrics.json", run_dir / "grid.png"
    finished = read_record(metrics_file)
    if grid.is_file() and finished and finished.get("eval_key") == evaluator.key:
        return RunRecord.from_dict({**finished, "reused": True})
    scores = evaluator.evaluate(None, grid)
    record = RunRecord(label=BASE_LABEL, slug=BASE_LABEL, method=None, fidelity=scores.fidelity,
                       diversity=scores.diversity, alignment=scores.alignment, images=scores.images,
                       eval_key=evaluator.key)
    write_json(metrics_file, record.to_dict())
    return record


def run_comparison(request: CompareRequest) -> list[RunRecord]:
    """Train and score every spec (reusing finished runs), then write the report; returns the rows, base first."""
    if not request.specs:
        raise UserInputError("--methods lists no method.")
    first = _settings(request, request.specs[0], request.out / "runs" / request.specs[0].slug)
    for spec in request.specs[1:]:
        _settings(request, spec, request.out / "runs" / spec.slug)  # every spec's settings are valid before training
    prompt_set = load_prompt_set(request.prompts_file, bundled=request.model is None)
    references = [i.image for i in load_concept_images(request.images)]
    evaluator = _Evaluator(request, first.trigger, prompt_set, references)
    records = [_run_base(request, evaluator)] if request.include_base else []
    for spec in request.specs:
        records.append(_run_method(request, spec, evaluator))
    write_report(request, records, first, prompt_set, evaluator.metrics_name, len(references))
    return records
