"""Text and parsing shared by the `fa-sd` commands: the train command's help and examples, --method-option pairs."""

from __future__ import annotations

from typing import Any

from .errors import UserInputError
from .training.settings import default_text
from .user_files import parse_yaml

TRAIN_HELP = """Train an adapter on a folder of concept images.

Settings come from the base model's shipped defaults, then --config FILE.yaml, then
these flags; "default" below names the bundled model's value, and other models' where it differs.

\b
Examples:
  fa-sd train --concept castle --images assets/concepts/castle
  fa-sd train --concept castle --images photos/ --monitor-every 50 --keep best --max-drift 0.5
  fa-sd train --concept dog --images dog/ --model CompVis/stable-diffusion-v1-4 --mixed-precision fp16 \\
      --prior-preservation --class-prompt "a photo of a dog" --prior-loss-weight 1.0
  fa-sd train --concept castle --images photos/ --caption-template "a {} on a white background" \\
      --lr-scheduler cosine --lr-warmup-steps 50 --report-to tensorboard
"""


def default_help(name: str) -> str:
    """The '(default: ...)' text of a training option, read from the shipped settings."""
    return default_text(name)


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """key=value pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserInputError(f"--method-option expects key=value, got {pair!r}.")
        options[key.strip()] = parse_yaml(value, f"--method-option {pair!r}")
    return options
