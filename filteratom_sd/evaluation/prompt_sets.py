"""Prompt sets: the prompts ("{}" = trigger token), seeds and sampler settings an evaluation samples.

Shipped sets: "tiny" (the bundled domain) and "dreambooth" (the paper's 25 prompts); any YAML
file with the same keys works too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import MAX_GUIDANCE, MAX_SEED
from ..errors import UserInputError
from ..resources import config_file, shipped_config
from ..training.settings import read_yaml


@dataclass
class PromptSet:
    """Prompts ("{}" = trigger token) sampled once per seed, with the sampler's settings."""

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance_scale: float = 7.5
    batch_size: int = 8
    source: str = ""

    def validate(self) -> None:
        """UserInputError with one sentence for the first unusable value."""
        where = f" in {self.source}" if self.source else ""
        if not self.prompts or not all(isinstance(p, str) and "{}" in p for p in self.prompts):
            raise UserInputError(f"The prompt set{where} needs a list of prompts, each with '{{}}' for the token.")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED
                                     for s in self.seeds):
            raise UserInputError(f"The prompt set{where} needs a list of integer seeds from 0 to 2**63 - 1.")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserInputError(f"{name} must be a positive integer{where}, got {value!r}.")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise UserInputError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE:g}{where}, "
                                 f"got {self.guidance_scale!r}.")

    def for_token(self, token: str) -> list[str]:
        """The prompts with the trigger token filled in."""
        return [p.replace("{}", token) for p in self.prompts]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (recorded next to the scores)."""
        return {"source": self.source, "prompts": list(self.prompts), "seeds": list(self.seeds), "steps": self.steps,
                "guidance_scale": self.guidance_scale, "batch_size": self.batch_size}


def default_prompt_set_path(bundled: bool) -> Path:
    """The shipped prompt set "tiny" for the bundled model, "dreambooth" (the paper's 25 prompts) otherwise."""
    return shipped_config("eval", "tiny" if bundled else "dreambooth")


def load_prompt_set(path: str | os.PathLike | None = None, bundled: bool = True) -> PromptSet:
    """Read a prompt-set YAML file, or a shipped one by name (None: the default for the base model)."""
    file = config_file(str(path), "eval") if path is not None else default_prompt_set_path(bundled)
    if not file.is_file():
        raise UserInputError(f"There is no prompt-set file at {file}.")
    data = read_yaml(file)
    known = {"prompts", "seeds", "steps", "guidance_scale", "batch_size"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError(f"Unknown prompt-set key(s) {', '.join(map(repr, unknown))} in {file}.")
    if "prompts" not in data:
        raise UserInputError(f"The prompt-set file {file} has no 'prompts' list.")
    prompt_set = PromptSet(**data, source=file.name)
    prompt_set.validate()
    return prompt_set
