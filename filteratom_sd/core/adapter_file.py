"""The adapter file: safetensors tensors plus JSON metadata (format, method, config, targets, fingerprint)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import AdapterFormatError, ConfigError
from .fingerprint import SIGNATURE_LENGTH, fingerprint
from .inject import attached_adapters
from .token_embedding import TOKEN_EMBEDDING_KEY

FORMAT_NAME = "filteratom-sd"
FORMAT_VERSION = 1
# Metadata keys the library writes; callers may add others (strings, or JSON-encoded values).
_RESERVED = {"format", "format_version", "method", "adapter_name", "config", "targets", "base_fingerprint",
             "num_parameters", "library_version"}
# Bounds on the JSON metadata entries: a crafted header cannot ask for deep recursion or huge strings.
MAX_JSON_CHARS = 4 * 2**20
MAX_JSON_DEPTH = 16


def library_version() -> str:
    """The installed filteratom-sd version ("unknown" when run from a bare source tree)."""
    try:
        return importlib_metadata.version("filteratom-sd")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class AdapterFile:
    """A parsed adapter: its tensors and validated metadata."""

    path: Path
    tensors: dict[str, Tensor]
    method: str
    config: dict[str, Any]
    targets: list[str]
    base_fingerprint: dict[str, Any]
    num_parameters: int
    metadata: dict[str, str]
    # the concept token's trained text embedding (1 x width), when training learned one
    token_embedding: Tensor | None = None

    @property
    def token(self) -> str:
        """The concept token the adapter was trained for ("" when none)."""
        return self.metadata.get("token", "")


def save_adapter(
    unet: nn.Module, path: str | os.PathLike, adapter_name: str = "default", metadata: dict[str, Any] | None = None,
    token_embedding: Tensor | None = None,
) -> Path:
    """Write the named adapter of `unet` to a .safetensors file, atomically; returns the path.

    `token_embedding` (1 x text-encoder width) is the metadata's token's trained embedding, stored beside the layers.
    """
    adapters = attached_adapters(unet)
    if adapter_name not in adapters:
        raise ConfigError(f"No adapter named '{adapter_name}' is attached to this model.")
    method = adapters[adapter_name]
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.adapter_state_dict(unet, adapter_name).items()}
    if token_embedding is not None:
        if not (metadata or {}).get("token"):
            raise ConfigError("A token embedding needs the token it embeds in the metadata ('token').")
        tensors[TOKEN_EMBEDDING_KEY] = token_embedding.detach().float().cpu().reshape(1, -1).contiguous()
    params = method.trainable_parameters(unet, adapter_name)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "method": method.name,
        "adapter_name": adapter_name,
        "config": json.dumps(method.config_dict(), sort_keys=True),
        "targets": json.dumps(method.targets),
        "base_fingerprint": json.dumps(fingerprint(unet, method.targets)),
        "num_parameters": str(sum(p.numel() for p in params)),
        "library_version": library_version(),
    }
    for key, value in (metadata or {}).items():
        if key in _RESERVED:
            raise ConfigError(f"Metadata key '{key}' is reserved for the library.")
        header[key] = value if isinstance(value, str) else json.dumps(value)
    header.setdefault("token", "")
    header.setdefault("base_model", "")
    final = Path(path)
    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        _sort_metadata_in_place(tmp)
    return final


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite the header with its metadata keys sorted, padded to the same length.

    safetensors writes metadata in hash-map order, which varies between calls; sorting makes
    the same adapter give the same bytes (reproducible runs, comparable checksums).
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        if len(text) <= length:  # same content, so never longer; spaces are the format's own padding
            handle.seek(8)
            handle.write(text.ljust(length, b" "))


def _depth(value: Any) -> int:
    # iterative: a value nested as deep as the parser allows must not overflow the stack here either
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _json_field(meta: dict[str, str], key: str, kind: type, name: Path) -> Any:
    text = meta.get(key)
    if not isinstance(text, str):
        raise AdapterFormatError(f"{name} has no '{key}' entry in its metadata.")
    if len(text) > MAX_JSON_CHARS:
        raise AdapterFormatError(f"{name} has a '{key}' entry larger than {MAX_JSON_CHARS // 2**20} MiB in its metadata.")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(f"{name} has a malformed or too deeply nested '{key}' entry in its metadata.") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise AdapterFormatError(f"{name} has a '{key}' entry nested deeper than {MAX_JSON_DEPTH} levels in its metadata.")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AdapterFormatError(f"{name} has a '{key}' entry of the wrong type in its metadata.")
    return value


def _is_signature(value: Any) -> bool:
    return isinstance(value, list) and len(value) == SIGNATURE_LENGTH and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _check_fingerprint(base: dict[str, Any], targets: list[str], name: Path) -> None:
    """The fingerprint is required: one well-formed signature for exactly each target layer."""
    layers = base.get("layers")
    if not isinstance(base.get("digest"), str) or not isinstance(layers, dict):
        raise AdapterFormatError(f"{name} has a malformed base fingerprint (it needs a digest and per-layer signatures).")
    if set(layers) != set(targets):
        raise AdapterFormatError(f"{name} has a base fingerprint that does not cover exactly its {len(targets)} target layers.")
    bad = next((t for t, signature in layers.items() if not _is_signature(signature)), None)
    if bad is not None:
        raise AdapterFormatError(f"{name} has a malformed base fingerprint for layer {bad!r} "
                                 f"(expected {SIGNATURE_LENGTH} finite numbers).")


def _raw_metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # safetensors raises several types for non-safetensors and truncated files
        raise AdapterFormatError(f"{file} is not a readable safetensors file (wrong format or truncated).") from None


def resolve_adapter_path(path: str | os.PathLike) -> Path:
    """An adapter file as given, or the one adapter file inside a folder (a run's output or one of its checkpoints)."""
    place = Path(path)
    if not place.is_dir():
        return place
    found = []
    for candidate in sorted(place.glob("*.safetensors")):
        try:
            if _raw_metadata(candidate).get("format") == FORMAT_NAME:
                found.append(candidate)
        except AdapterFormatError:
            continue  # a damaged or foreign file beside the adapter is not a reason to refuse the folder
    if len(found) != 1:
        what = "no filteratom-sd adapter" if not found else f"{len(found)} adapters ({', '.join(f.name for f in found)})"
        raise AdapterFormatError(f"The folder {place} holds {what}; give the adapter file itself.")
    return found[0]


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw string metadata of an adapter file (or a folder holding one), after checking it is one of ours."""
    file = resolve_adapter_path(path)
    if not file.is_file():
        raise AdapterFormatError(f"No adapter file at {file}.")
    meta = _raw_metadata(file)
    if meta.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{file} is a safetensors file but not a filteratom-sd adapter.")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise AdapterFormatError(f"{file} uses adapter format version {meta.get('format_version')!r}, "
                                 f"this library reads version {FORMAT_VERSION}.")
    return meta


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and validate an adapter file, or the one in a folder (nothing is unpickled: safetensors only)."""
    file = resolve_adapter_path(path)
    meta = read_adapter_metadata(file)
    method = meta.get("method")
    if not isinstance(method, str) or not method:
        raise AdapterFormatError(f"{file} does not say which method made it.")
    config = _json_field(meta, "config", dict, file)
    targets = _json_field(meta, "targets", list, file)
    if not all(isinstance(t, str) for t in targets):
        raise AdapterFormatError(f"{file} lists targets that are not module names.")
    if len(set(targets)) != len(targets):
        raise AdapterFormatError(f"{file} lists a target more than once.")
    base = _json_field(meta, "base_fingerprint", dict, file)
    _check_fingerprint(base, targets, file)
    count = _json_field(meta, "num_parameters", int, file)
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception:
        raise AdapterFormatError(f"{file} is truncated or its tensors cannot be read.") from None
    for key, tensor in tensors.items():
        if not torch.is_floating_point(tensor):
            raise AdapterFormatError(f"{file} holds a non-floating-point tensor {key!r}.")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(f"{file} holds values that are not finite (NaN or infinity) in tensor {key!r}.")
    embedding = tensors.pop(TOKEN_EMBEDDING_KEY, None)
    if embedding is not None and not meta.get("token"):
        raise AdapterFormatError(f"{file} holds a token embedding but names no token in its metadata.")
    if embedding is not None and (embedding.ndim != 2 or embedding.shape[0] != 1):
        raise AdapterFormatError(f"{file} holds a token embedding of shape {tuple(embedding.shape)}; expected 1 x width.")
    return AdapterFile(file, tensors, method, config, targets, base, count, meta, embedding)
