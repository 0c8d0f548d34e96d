"""The one resolver for the data shipped with the package (package data, so a wheel carries it too):
training and eval configs, prompt templates, model configs and the bundled tiny model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import UserInputError

# kind -> (folder under configs/, file suffix)
_KINDS = {"training": ("training", ".yaml"), "eval": ("eval", ".yaml"), "model": ("models", ".json")}


def resource_root() -> Path:
    """The folder holding the shipped data."""
    root = resources.files(__name__)
    if not isinstance(root, Path):  # a zipped install: diffusers needs real folders
        raise UserInputError("filteratom-sd must be installed as files, not zipped, to read its shipped data.")
    return root


def config_path(name: str) -> Path:
    """A file directly under configs/, such as prompt_templates.yaml or tiny_model.json."""
    return resource_root() / "configs" / name


def shipped_names(kind: str) -> list[str]:
    """The names of the shipped configs of one kind: "training", "eval" (prompt sets) or "model"."""
    folder, suffix = _KINDS[kind]
    return sorted(p.name[: -len(suffix)] for p in (resource_root() / "configs" / folder).glob(f"*{suffix}"))


def shipped_config(kind: str, name: str) -> Path:
    """The shipped config `name` (with or without its suffix) of one kind; a clear error for unknown names."""
    folder, suffix = _KINDS[kind]
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    path = resource_root() / "configs" / folder / f"{stem}{suffix}"
    if not path.is_file():
        raise UserInputError(f"There is no shipped {kind} config named {name!r}; "
                             f"shipped: {', '.join(shipped_names(kind))}.")
    return path


def config_file(value: str, kind: str) -> Path:
    """A user's config argument: an existing file, else the name of a shipped config of that kind."""
    given = Path(value).expanduser()
    if given.is_file() or given.parent != Path(".") or not value.strip():
        return given
    return shipped_config(kind, value)


def bundled_model_dir() -> Path:
    """The bundled tiny Stable Diffusion (a diffusers pipeline folder)."""
    return resource_root() / "tiny-sd"
