"""Training settings: the shipped defaults of the base model, then a user YAML file, then CLI flags."""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..checks import MAX_GUIDANCE, MAX_SEED, check_field_types
from ..core.fast_paths import TRAIN_PATHS
from ..errors import ConfigError
from ..methods.registry import method_class
from ..resources import config_file as find_config_file
from ..resources import config_path, shipped_config
from ..user_files import read_yaml_file

MIXED_PRECISION = ("no", "fp16", "bf16")
KEEP = ("best", "last")
REPORT_TO = ("tensorboard", "wandb", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# The concept names the adapter file and its temporary twin ".<name>.<random>.tmp": well inside 255 bytes.
MAX_CONCEPT_BYTES = 100
# Bounds of the optimiser's numbers: beyond them a run diverges or trains uphill (issue: max_grad_norm -1).
MAX_LR = 1.0


@dataclass
class TrainingSettings:
    """Everything a training run depends on (written to training_config.yaml)."""

    concept: str
    images: str
    token: str | None = None
    model: str | None = None
    method: str = "filter-atoms"
    preset: str | None = "C2"
    method_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    lr: float | None = None
    # Learning rate per method where the base model's defaults differ from the method's own default_lr.
    lr_by_method: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    resolution: int = 512
    center_crop: bool = True
    flip: bool = False
    seed: int = 0
    output_dir: str | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    prior_preservation: bool = False
    class_prompt: str | list[str] | None = None
    class_images: str | None = None
    num_class_images: int = 100
    # Class images generated per pipeline call (diffusers' DreamBooth --sample_batch_size): speed, not which image.
    sample_batch_size: int = 4
    prior_loss_weight: float = 1.0
    min_snr_gamma: float | None = None
    # Weight the loss by the images' alpha channel (transparent = background), as kohya's masked loss.
    masked_loss: bool = False
    unmasked_weight: float = 0.0
    checkpoint_every: int = 250
    checkpoints_total_limit: int = 3
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 250
    validation_steps: int = 30
    guidance_scale: float = 7.5
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0
    lr_scheduler: str = "constant_with_warmup"
    prompt_templates: list[str] = field(default_factory=list)
    # A caption for every concept image without its own (DreamBooth's instance prompt); it names the token.
    instance_prompt: str | None = None
    caption_dropout: float = 0.0
    # Pivotal tuning: learn the token's own text embedding beside the adapter, starting from token_init's.
    train_token: bool = False
    token_init: str | None = None
    token_lr: float = 1.0e-2
    noise_offset: float = 0.0
    on_nan: str = "skip"
    # The drift monitor, the kept step and its margins (see evaluation.best_step.BestStepRule).
    monitor: bool = True
    monitor_every: int = 100
    keep: str = "best"
    max_drift: float | None = None
    alignment_margin: float = 0.10
    prior_margin: float = 0.05
    drift_margin: float = 0.10
    report_to: str = "tensorboard"
    # torch.compile of the prepared UNet: an inductor mode ("reduce-overhead": CUDA graphs), None for eager.
    compile: str | None = None
    compile_backend: str = "inductor"
    # How filter-atom layers train: through the activations, through the effective weight, or whichever "auto"
    # estimates cheaper (core.fast_paths.activation_op); the same gradients either way, rounded differently.
    train_path: str = "auto"

    @property
    def trigger(self) -> str:
        """The token that names the concept in prompts (default: <concept>)."""
        return self.token or f"<{self.concept}>"

    def learning_rate(self) -> tuple[float, str]:
        """(rate, where it comes from): --lr if given, else the base model's rate for this method
        (lr_by_method), else the method's own `default_lr`."""
        if self.lr is not None:
            return self.lr, "given"
        if self.method in self.lr_by_method:
            return float(self.lr_by_method[self.method]), "lr_by_method"
        return float(method_class(self.method).default_lr), "method default"

    @property
    def class_prompts(self) -> list[str]:
        """The class prompt(s) as a list (one prompt, or several that class images cycle through)."""
        if self.class_prompt is None:
            return []
        return [self.class_prompt] if isinstance(self.class_prompt, str) else list(self.class_prompt)

    @property
    def output_path(self) -> Path:
        """Where the run writes (default: outputs/<concept>)."""
        return Path(self.output_dir) if self.output_dir else Path("outputs") / self.concept

    def validate(self) -> None:
        """Raise ConfigError with one sentence for the first invalid setting."""
        check_field_types(self)
        self._validate_names()
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "resolution", "checkpoint_every",
                     "checkpoints_total_limit", "validation_every", "validation_steps", "monitor_every",
                     "sample_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        if self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}.")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"--lr must be positive and at most {MAX_LR:g}, got {self.lr}.")
        if not all(0 < v <= MAX_LR for v in self.lr_by_method.values()):
            raise ConfigError(f"lr_by_method must map method names to learning rates in (0, {MAX_LR:g}].")
        self._validate_numbers()
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}.")
        if self.num_class_images < 0:
            raise ConfigError("--num-class-images must not be negative.")
        if self.class_prompt is not None and (not self.class_prompts or not all(
                isinstance(p, str) and p.strip() for p in self.class_prompts)):
            raise ConfigError("--class-prompt must be a non-empty prompt (or a list of them).")
        if self.prior_preservation and not self.class_prompts:
            raise ConfigError("--prior-preservation needs --class-prompt (for example 'a photo of a castle').")
        if self.min_snr_gamma is not None and not 0 < self.min_snr_gamma < math.inf:
            raise ConfigError(f"--min-snr-gamma must be a positive finite number, got {self.min_snr_gamma}.")
        if isinstance(self.unmasked_weight, bool) or not isinstance(self.unmasked_weight, (int, float)) or \
                not 0.0 <= self.unmasked_weight <= 1.0:
            raise ConfigError(f"--unmasked-weight must be between 0 and 1, got {self.unmasked_weight!r}.")
        if self.keep not in KEEP:
            raise ConfigError(f"--keep must be 'best' or 'last', got {self.keep!r}.")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}.")
        for name in ("max_drift", "alignment_margin", "prior_margin", "drift_margin"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}.")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}.")
        if self.train_path not in TRAIN_PATHS:
            raise ConfigError(f"--train-path must be one of {', '.join(TRAIN_PATHS)}, got {self.train_path!r}.")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                              f"got {self.compile_backend!r}.")
        if self.compile not in (None, "default") and self.compile_backend != "inductor":
            raise ConfigError(f"--compile {self.compile} is an inductor mode; compile_backend is "
                              f"{self.compile_backend!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        if isinstance(self.caption_dropout, bool) or not isinstance(self.caption_dropout, (int, float)) or \
                not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"--caption-dropout must be at least 0 and below 1, got {self.caption_dropout!r}.")
        if self.instance_prompt is not None and self.trigger not in self.instance_prompt:
            raise ConfigError(f"--instance-prompt must contain the trigger token {self.trigger}.")
        if self.train_token and not (self.token_init or "").strip():
            raise ConfigError("--train-token needs --token-init, a word close to the concept (its class, such as "
                              "'dog' or 'castle') whose embedding the token starts from.")
        if self.train_token and any(self.trigger in p for p in self.class_prompts):
            raise ConfigError(f"The class prompts must not contain the trained token {self.trigger}: the prior "
                              "images stand for everything that is not the concept.")
        if not 0 < self.token_lr <= MAX_LR:
            raise ConfigError(f"--token-lr must be positive and at most {MAX_LR:g}, got {self.token_lr!r}.")
        if self.on_nan not in ("skip", "stop"):
            raise ConfigError(f"--on-nan must be 'skip' or 'stop', got {self.on_nan!r}.")
        if not self.prompt_templates:
            raise ConfigError("prompt_templates must hold at least one template with '{}' for the token.")
        for template in self.prompt_templates:
            check_template(template)

    def _validate_names(self) -> None:
        concept = self.concept
        if not concept or any(c in concept for c in "/\\") or concept.startswith(".") or \
                any(ord(c) < 32 or ord(c) == 127 for c in concept):
            raise ConfigError(f"The concept name {concept!r} must be a plain name (no slashes or control characters).")
        if len(concept.encode()) > MAX_CONCEPT_BYTES:
            raise ConfigError(f"The concept name must be at most {MAX_CONCEPT_BYTES} characters (it names the "
                              f"adapter file), got {len(concept)}.")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token must not be empty; leave it out for the default <concept>.")
        for name in ("images", "output_dir", "class_images"):
            if getattr(self, name) == "":
                raise ConfigError(f"{name} must not be an empty path.")
        if not all(p.strip() for p in self.validation_prompts):
            raise ConfigError("validation_prompts must not hold empty prompts.")

    def _validate_numbers(self) -> None:
        # types are checked already (check_field_types): only ranges here, NaN and infinity failing each
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}.")
        bounds = {"adam_weight_decay": (0, 1, "between 0 and 1"),
                  "max_grad_norm": (math.ulp(0), math.inf, "a positive finite number"),
                  "guidance_scale": (0, MAX_GUIDANCE, f"between 0 and {MAX_GUIDANCE:g}"),
                  "prior_loss_weight": (0, math.inf, "a finite number of at least 0"),
                  "noise_offset": (0, math.inf, "a finite number of at least 0"),
                  "lr_warmup_steps": (0, math.inf, "an integer of at least 0")}
        for name, (low, high, words) in bounds.items():
            value = getattr(self, name)
            if not (low <= value <= high and math.isfinite(value)):
                flag = "weight-decay" if name == "adam_weight_decay" else name.replace("_", "-")
                raise ConfigError(f"{name} (--{flag}) must be {words}, got {value}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML."""
        return dataclasses.asdict(self)


def check_template(template: str) -> None:
    """ConfigError unless `template` has exactly one "{}" (the token) and no other placeholder."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:
        fields = None
    if fields != [("", "", None)]:
        raise ConfigError(f"The prompt template {template!r} in prompt_templates must hold exactly one '{{}}' for "
                          "the token and no other braces.")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of named settings, read with bounds (see `user_files`); a clear error for anything else."""
    file = Path(path)
    data = read_yaml_file(file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {file} must hold a mapping of settings.")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"The config file {file} has setting names that are not strings ({odd[0]!r}).")
    return data


def base_defaults(bundled: bool) -> dict[str, Any]:
    """The shipped training config "tiny" for the bundled model, "sd-v1-4" for every other base."""
    defaults = read_yaml(shipped_config("training", "tiny" if bundled else "sd-v1-4"))
    defaults.setdefault("prompt_templates", read_yaml(config_path("prompt_templates.yaml"))["templates"])
    return defaults


def default_text(name: str) -> str:
    """'(default: X)' for a setting: the bundled model's value, and other models' where it differs."""
    fallback = {f.name: f.default for f in dataclasses.fields(TrainingSettings)}.get(name)
    try:
        tiny = base_defaults(True).get(name, fallback)
        other = base_defaults(False).get(name, fallback)
    except ConfigError:
        return ""

    def show(value: Any) -> str:
        return {True: "on", False: "off", None: "none"}.get(value, str(value)) if isinstance(value, (bool, type(None))) \
            else str(value)

    if show(tiny) == show(other):
        return f"(default: {show(tiny)})."
    return f"(default: {show(tiny)} on the bundled model, {show(other)} on others)."


def resolve_settings(cli: dict[str, Any], config_file: str | None = None) -> TrainingSettings:
    """Merge defaults < config file < CLI values (None in `cli` means "not given").

    `config_file` is a YAML file or the name of a shipped training config (such as tiny-prompt-preserving).
    """
    bundled = cli.get("model") is None
    merged = base_defaults(bundled)
    if config_file:
        merged.update(read_yaml(find_config_file(config_file, "training")))
    merged.update({k: v for k, v in cli.items() if v is not None and v != () and v != {}})
    known = {f.name for f in dataclasses.fields(TrainingSettings)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"Unknown training setting(s): {', '.join(map(repr, unknown))}.")
    try:
        settings = TrainingSettings(**merged)
    except TypeError:
        raise ConfigError("The training settings are incomplete: --concept and --images are required.") from None
    settings.validate()
    return settings


def write_settings(settings: TrainingSettings, path: Path) -> None:
    """Write training_config.yaml atomically."""
    atomic_write_text(path, yaml.safe_dump(settings.to_dict(), sort_keys=False))
