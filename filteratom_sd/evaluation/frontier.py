"""`fa-sd frontier`: each method over a learning-rate grid and seeds, scored at checkpoints along training.

A single run per method catches it at one point of its fidelity/alignment trade-off; here every run
(method x lr x seed) keeps a checkpoint every `score_every` steps, each checkpoint is sampled and
scored, and the points over lr x step give the method's Pareto fronts (pareto.py). Folder layout:

    OUT/runs/<method>/lr-<lr>/seed-<seed>/   the training run, its checkpoints, train.json, scores.json
    OUT/runs/base/scores.json                the base model (step 0 of every run)
    OUT/frontier.json                        every scored point

A run is trained once: its train.json records the settings' key, and every scored step is kept in
scores.json with the evaluation's key, so an interrupted sweep resumes (an interrupted training
continues from its last checkpoint) and a finished one re-renders without training or sampling.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import SCORED_AT_FIXED_STEPS, MethodSpec
from .records import content_key, read_record
from .report import write_json
from ..errors import UserInputError
from ..training.settings import TrainingSettings, resolve_settings

logger = logging.getLogger(__name__)

# Three learning rates across each family's usable range on the bundled model (the comparison's
# defaults and the tiny config's filter-atom rate in the middle).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "filter-atoms": (1e-3, 3e-3, 1e-2),
    "liera": (3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3),
    "loha": (3e-4, 1e-3, 3e-3),
    "lokr": (3e-4, 1e-3, 3e-3),
    "oft": (3e-4, 1e-3, 3e-3),
    "bitfit": (1e-3, 3e-3, 1e-2),
    "difffit": (1e-3, 3e-3, 1e-2),
    "full": (1e-5, 3e-5, 1e-4),
}
DEFAULT_STEPS = 1000
DEFAULT_SCORE_EVERY = 100
BASE = "base"


@dataclass
class FrontierRequest:
    """What `fa-sd frontier` was asked for."""

    concept: str
    images: str
    specs: list[MethodSpec]
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = DEFAULT_STEPS
    score_every: int = DEFAULT_SCORE_EVERY
    model: str | None = None
    token: str | None = None
    config_file: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # further training settings, same for every run
    prompts_file: str | None = None
    progress: bool = False

    def validate(self) -> None:
        """UserInputError for the first unusable value (before anything trains)."""
        if not self.specs:
            raise UserInputError("--methods lists no method.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise UserInputError("--seeds must list distinct non-negative integers.")
        if self.score_every <= 0 or self.steps <= 0 or self.steps % self.score_every:
            raise UserInputError(f"--steps ({self.steps}) must be a positive multiple of --score-every "
                                 f"({self.score_every}).")
        for spec in self.specs:
            if spec.lr is None and spec.method not in LR_GRIDS:
                raise UserInputError(f"No learning-rate grid for {spec.method!r}; give it one with lr=.")


@dataclass
class ScoredPoint:
    """One checkpoint's scores (step 0 is the base model)."""

    spec: str
    lr: float
    seed: int
    step: int
    fidelity: float
    diversity: float
    alignment: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dict(self.__dict__)


@dataclass
class RunCosts:
    """What a run cost and holds: trainable parameters, final adapter bytes, training seconds."""

    trainable_parameters: int
    adapter_bytes: int
    train_seconds: float


def learning_rates(spec: MethodSpec) -> tuple[float, ...]:
    """The spec's own lr, else its method's grid."""
    return (spec.lr,) if spec.lr is not None else LR_GRIDS[spec.method]


def run_dir(out: Path, spec: MethodSpec, lr: float, seed: int) -> Path:
    """OUT/runs/<method>/lr-<lr>/seed-<seed>."""
    return out / "runs" / spec.slug / f"lr-{lr:g}" / f"seed-{seed}"


def run_settings(request: FrontierRequest, spec: MethodSpec, lr: float, seed: int) -> TrainingSettings:
    """The run's training settings: a checkpoint at every scored step, all kept, no intermediate validation."""
    count = request.steps // request.score_every
    values: dict[str, Any] = {**request.training, "concept": request.concept, "images": request.images, "model": request.model,
                              "token": request.token, "steps": request.steps, "seed": seed,
                              "output_dir": str(run_dir(request.out, spec, lr, seed)), **spec.training_values(),
                              "lr": lr, "checkpoint_every": request.score_every, "checkpoints_total_limit": count,
                              "validation_prompts": [], **SCORED_AT_FIXED_STEPS}
    return resolve_settings(values, request.config_file)


def training_key(settings: TrainingSettings) -> str:
    """What a run's checkpoints depend on: every setting but the output folder."""
    values = settings.to_dict()
    values.pop("output_dir")
    values.pop("lr_by_method")
    return content_key(values)


def train_run(settings: TrainingSettings, progress: bool) -> RunCosts:
    """Train one run unless train.json says it finished with these settings; resume an interrupted one."""
    from ..training.loop import train

    folder = settings.output_path
    key = training_key(settings)
    adapter = folder / f"{settings.concept}.safetensors"
    done = read_record(folder / "train.json")
    if done and done.get("train_key") == key and adapter.is_file():
        return RunCosts(done["trainable_parameters"], adapter.stat().st_size, done["train_seconds"])
    started = read_record(folder / "started.json")
    resume = bool(started and started.get("train_key") == key and (folder / "checkpoints").is_dir())
    if not resume and folder.exists():
        shutil.rmtree(folder)  # another run's settings: its checkpoints must not be resumed
    write_json(folder / "started.json", {"train_key": key})
    result = train(settings, resume=resume, overwrite=not resume, progress=progress)
    costs = RunCosts(result.trainable_parameters, adapter.stat().st_size, round(result.seconds, 2))
    write_json(folder / "train.json", {"train_key": key, **costs.__dict__})
    return costs


def checkpoint_steps(settings: TrainingSettings, score_every: int) -> list[int]:
    """The scored steps of a run: every `score_every` up to the last (the final adapter)."""
    return list(range(score_every, settings.steps + 1, score_every))


def checkpoint_adapters(settings: TrainingSettings, steps: list[int]) -> dict[int, Path]:
    """The adapter file of each scored step: the final adapter, else the one its checkpoint holds."""
    folder = settings.output_path
    name = f"{settings.concept}.safetensors"
    return {s: folder / name if s == settings.steps else folder / "checkpoints" / f"step-{s:06d}" / name for s in steps}


class _Scorer:
    """The base pipeline, prompt set and metrics shared by every checkpoint's evaluation."""

    def __init__(self, request: FrontierRequest, token: str) -> None:
        from ..training.data import load_concept_images
        from .prompt_sets import load_prompt_set
        from .runs import build_metric_set, default_metric_set

        self.prompt_set = load_prompt_set(request.prompts_file, bundled=request.model is None)
        self.metrics_name = default_metric_set(request.model)
        self.metrics = build_metric_set(self.metrics_name, token)
        self.references = [i.image for i in load_concept_images(request.images)]
        self.request, self.token, self._pipe = request, token, None
        self.key = content_key({"prompt_set": self.prompt_set.to_dict(), "metrics": self.metrics_name, "token": token,
                         "model": request.model, "references": len(self.references)})

    def score(self, adapter: Path | None) -> dict[str, float]:
        from ..models import load_pipeline
        from .runs import sample_with_adapter, score_samples

        if self._pipe is None:
            self._pipe = load_pipeline(self.request.model)
        samples = sample_with_adapter(self._pipe, adapter, self.prompt_set, self.token)
        scores = score_samples(self.metrics, samples, self.references)
        return {"fidelity": scores.fidelity, "diversity": scores.diversity, "alignment": scores.alignment}


def _scored(path: Path, scorer: _Scorer, jobs: dict[int, Path | None]) -> dict[int, dict[str, float]]:
    """Scores of each step in `jobs` (step -> adapter), reusing scores.json entries with this evaluation."""
    saved = read_record(path) or {}
    known = saved.get("steps", {}) if saved.get("eval_key") == scorer.key else {}
    for step, adapter in jobs.items():
        if str(step) not in known:
            known[str(step)] = scorer.score(adapter)
            write_json(path, {"eval_key": scorer.key, "steps": known})
    return {int(s): v for s, v in known.items() if int(s) in jobs}


def run_frontier(request: FrontierRequest) -> tuple[list[ScoredPoint], dict[str, RunCosts]]:
    """Train and score every run (reusing what is finished); returns the points and each spec's mean costs."""
    request.validate()
    runs = [(spec, lr, seed) for spec in request.specs for lr in learning_rates(spec) for seed in request.seeds]
    settings = [run_settings(request, *run) for run in runs]  # every run's settings are valid before training
    scorer = _Scorer(request, settings[0].trigger)
    base = _scored(request.out / "runs" / BASE / "scores.json", scorer, {0: None})[0]
    points: list[ScoredPoint] = []
    costs: dict[str, list[RunCosts]] = {}
    for (spec, lr, seed), run in zip(runs, settings):
        logger.info("%s lr %g seed %d: %d steps", spec.text, lr, seed, run.steps)
        costs.setdefault(spec.text, []).append(train_run(run, request.progress))
        steps = checkpoint_steps(run, request.score_every)
        scores = _scored(run.output_path / "scores.json", scorer, checkpoint_adapters(run, steps))
        points.append(ScoredPoint(spec.text, lr, seed, 0, **base))
        points += [ScoredPoint(spec.text, lr, seed, step, **scores[step]) for step in steps]
        write_json(request.out / "frontier.json", {"points": [p.to_dict() for p in points]})
    mean = {text: RunCosts(c[0].trainable_parameters, c[0].adapter_bytes,
                           round(sum(r.train_seconds for r in c) / len(c), 1)) for text, c in costs.items()}
    return points, mean
