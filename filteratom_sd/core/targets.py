"""Which layers of a UNet an adapter targets by default, and swapping modules in by dotted name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Callable

from torch import nn

from .layer import base_layer_of

try:
    from re import _parser as _regex_parser  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser

# Linear layers adapted by default: attention projections, feed-forward, proj_in/proj_out.
DEFAULT_LINEAR_PATTERN = re.compile(r"(attn\d*\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
# Longer patterns are reported without being parsed.
MAX_PATTERN_CHARS = 1000


def classify_layer(name: str, module: nn.Module) -> tuple[str | None, str]:
    """("conv" | "blocks" | None, reason): how the default rule treats a module."""
    module = base_layer_of(module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, "grouped convolution"
        if module.kernel_size == (1, 1):
            return "blocks", "1x1 convolution"
        return "conv", f"{module.kernel_size[0]}x{module.kernel_size[1]} convolution"
    if isinstance(module, nn.Linear):
        if DEFAULT_LINEAR_PATTERN.search(name):
            return "blocks", "attention / feed-forward / projection linear"
        return None, "linear layer outside attention, feed-forward and proj_in/proj_out"
    return None, ""


def select_layers(
    unet: nn.Module,
    target_modules: list[str] | None,
    exclude_modules: list[str],
    refuse: Callable[[str, str], str | None] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """(targets: name -> "conv" | "blocks", skipped: name -> reason) among the conv and linear layers.

    Explicit `target_modules` patterns pick any conv / linear layer they match; otherwise the
    default rule applies. `refuse(name, layout)` may give a method's own reason to skip a layer.
    Every conv or linear layer not chosen is reported with a reason.
    """
    patterns = [re.compile(p) for p in target_modules] if target_modules is not None else None
    excludes = [re.compile(p) for p in exclude_modules]
    targets: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, module in unet.named_modules():
        if hasattr(module, "deltas") or ".deltas." in name:
            continue  # an AdaptedLayer and its updates: its base_layer is visited by name below
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        layout, reason = classify_layer(name, module)
        if not isinstance(base_layer_of(module), (nn.Conv2d, nn.Linear)):
            continue
        if patterns is not None:
            if not any(p.search(name) for p in patterns):
                skipped[name] = "not matched by target_modules"
                continue
            if layout is None and reason == "grouped convolution":
                skipped[name] = reason
                continue
            layout = layout or "blocks"
        elif layout is None:
            skipped[name] = reason
            continue
        refused = "matched by exclude_modules" if any(p.search(name) for p in excludes) else None
        refused = refused or (refuse(name, layout) if refuse is not None else None)
        if refused:
            skipped[name] = refused
        else:
            targets[name] = layout
    return targets, skipped


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted `name` under `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def pinned_to_targets(config: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """`config` with its target / exclude patterns replaced by patterns of the exact names in `targets`.

    Patterns read from an adapter file are untrusted (a backtracking one spins for hours), so a
    loaded adapter selects exactly the layers its file lists, through escaped names only.
    """
    names = "|".join(re.escape(t) for t in sorted(targets))
    pinned = dict(config)
    if "target_modules" in pinned:
        pinned["target_modules"] = [rf"^(?:{names})\Z"]
        pinned["exclude_modules"] = []
    elif "exclude_modules" in pinned:
        pinned["exclude_modules"] = [rf"^(?!(?:{names})\Z)"]
    return pinned


def _subpatterns(value: Any) -> Iterator[Any]:
    if isinstance(value, _regex_parser.SubPattern):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _subpatterns(item)


def _repeats_without_bound(pattern: Any) -> bool:
    return any((str(op) in _REPEATS and value[1] == _regex_parser.MAXREPEAT)
               or any(_repeats_without_bound(sub) for sub in _subpatterns(value)) for op, value in pattern)


def _nested_repetition(pattern: Any) -> bool:
    return any((str(op) in _REPEATS and value[1] > 1 and _repeats_without_bound(value[2]))
               or any(_nested_repetition(sub) for sub in _subpatterns(value)) for op, value in pattern)


def pattern_warnings(config: dict[str, Any]) -> list[str]:
    """Why the target / exclude patterns of an adapter's config could be slow to match (for `fa-sd inspect`).

    Loading never runs them (`pinned_to_targets`); the warnings tell the user the file is odd.
    """
    warnings = []
    for key in ("target_modules", "exclude_modules"):
        patterns = config.get(key)
        for pattern in patterns if isinstance(patterns, list) else []:
            if not isinstance(pattern, str):
                continue
            if len(pattern) > MAX_PATTERN_CHARS:
                warnings.append(f"{key} holds a pattern of {len(pattern)} characters")
                continue
            try:
                parsed = _regex_parser.parse(pattern)
            except (re.error, RecursionError, OverflowError):
                warnings.append(f"{key} holds an invalid pattern {pattern!r}")
                continue
            if _nested_repetition(parsed):
                warnings.append(f"{key} pattern {pattern!r} has nested repetition (exponential backtracking)")
    return warnings
