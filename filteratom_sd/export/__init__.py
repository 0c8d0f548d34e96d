"""Writing an adapter in the formats other tools load: a diffusers folder, one SD checkpoint file, LyCORIS diffs, LoRA.
Each starts from the base model with the adapter fused in; none needs filteratom_sd to be read back. A trained
token embedding goes into the diffusers folder's tokenizer, or beside a file as a textual-inversion file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..core.adapter_file import read_adapter_metadata, resolve_adapter_path
from ..core.token_embedding import TOKEN_EMBEDDING_KEY, remove_token, write_embedding_file
from ..errors import ConfigError
from ..models import model_label
from .adapted import AdaptedModel, adapted_model
from .lora import LayerError, LoraReport, lora_tensors, write_lora
from .lycoris import lycoris_full_tensors, write_lycoris_full
from .outputs import check_output
from .pipeline_files import write_diffusers_folder, write_single_file

FORMATS = ("diffusers", "single-file", "lycoris-full", "lora")


@dataclass
class ExportResult:
    """What an export wrote: its path, its size on disk and, for LoRA, the error report."""

    path: Path
    size_bytes: int
    lora: LoraReport | None = None
    # the token's textual-inversion file written beside `path` (formats other than diffusers)
    embedding: Path | None = None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def embedding_path(out: Path) -> Path:
    """Where a file export writes the token's textual-inversion file: OUT's name with .embedding before the suffix."""
    return out.with_name(f"{out.stem}.embedding.safetensors")


def _has_token_embedding(adapter_path: str | os.PathLike) -> bool:
    with safe_open(str(resolve_adapter_path(adapter_path)), framework="pt") as handle:
        return TOKEN_EMBEDDING_KEY in handle.keys()


def _check_request(adapter_path: str | os.PathLike, fmt: str, out: Path, rank: int | None, max_error: float | None,
                   overwrite: bool) -> None:
    """Every refusal that needs no model loaded, before one is."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if fmt != "lora" and (rank is not None or max_error is not None):
        raise ConfigError("--rank and --max-error apply to the lora format only.")
    if rank is not None and max_error is not None:
        raise ConfigError("Give --rank or --max-error, not both.")
    if fmt != "diffusers" and out.suffix != ".safetensors":
        raise ConfigError(f"The {fmt} format writes one .safetensors file; name the output *.safetensors.")
    check_output(out, overwrite)
    method = read_adapter_metadata(adapter_path).get("method")
    if fmt != "diffusers" and _has_token_embedding(adapter_path):
        check_output(embedding_path(out), overwrite)
    if fmt == "lora" and rank is None and max_error is None and method != "lora":
        raise ConfigError("Choose --rank R or --max-error E: this adapter's updates are not low-rank factors.")


def export_adapter(adapter_path: str | os.PathLike, fmt: str, out: str | os.PathLike, model: str | None = None,
                   rank: int | None = None, max_error: float | None = None, overwrite: bool = False) -> ExportResult:
    """Export an adapter file for the base `model` (None: the bundled one) to `out` in format `fmt` (see FORMATS)."""
    out = Path(out)
    _check_request(adapter_path, fmt, out, rank, max_error, overwrite)
    adapted = adapted_model(adapter_path, model)
    metadata = {"filteratom_sd_adapter": adapted.adapter.path.name, "filteratom_sd_method": adapted.adapter.method,
                "base_model": model_label(model)}
    report, embedding = None, None
    token_embedding = adapted.adapter.token_embedding
    if token_embedding is not None and fmt != "diffusers":
        # the file's text encoder stays the base one (plain loaders expect its vocabulary); the token goes beside
        remove_token(adapted.pipe, adapted.adapter.token)
        embedding = embedding_path(out)
        write_embedding_file(token_embedding, embedding)
    if fmt == "diffusers":
        write_diffusers_folder(adapted.pipe, out)
    elif fmt == "single-file":
        write_single_file(adapted.pipe, out)
    elif fmt == "lycoris-full":
        write_lycoris_full(adapted.deltas, out, metadata)
    else:
        tensors, report = lora_tensors(adapted.adapter, adapted.deltas, rank, max_error)
        write_lora(tensors, out, metadata)
    return ExportResult(out, _size(out), report, embedding)


__all__ = [
    "FORMATS",
    "AdaptedModel",
    "ExportResult",
    "LayerError",
    "LoraReport",
    "adapted_model",
    "export_adapter",
    "lora_tensors",
    "lycoris_full_tensors",
]
