"""The key a cached effective weight is valid for: an adapted layer's path, scales and parameters' state."""

from __future__ import annotations

from typing import Any

_SOURCES = "_weight_cache_sources"  # instance attribute: (delta modules, their parameter dicts)


def _parameter_dicts(layer: Any) -> list[dict]:
    # the parameter dicts a cached weight depends on (buffers are derived from them and move with them; the
    # backup is read only while merged, which the key holds), gathered once per set of delta modules: walking
    # modules() and every tensor on each call costs more than a small layer's convolution
    deltas = tuple(layer._modules["deltas"]._modules.values())
    sources = layer.__dict__.get(_SOURCES)
    if sources is None or sources[0] != deltas:
        dicts = [layer._modules["base_layer"]._parameters]
        dicts += [module._parameters for delta in deltas for module in delta.modules()]
        sources = layer.__dict__[_SOURCES] = (deltas, dicts)
    return sources[1]


def state_key(layer: Any) -> tuple | None:
    """What a layer's cached W_eff depends on: its path, scales, what is merged, each parameter's storage and version.

    None when it cannot be told (inference-mode tensors carry no version counter): then nothing is cached.
    """
    try:
        # new storage (a cast, a move, a replaced tensor) changes the pointer; in-place edits the version
        tensors = [(t.data_ptr(), t._version) for d in _parameter_dicts(layer) for t in d.values() if t is not None]
    except RuntimeError:
        return None
    return layer.train_path, tuple(layer.scales.items()), tuple(layer.merged), tensors


def forget_sources(state: dict) -> None:
    """Drop the gathered parameter dicts from a layer's pickled state: a copy's modules hold new dicts."""
    state.pop(_SOURCES, None)
