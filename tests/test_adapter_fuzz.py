"""Fuzzing adapter files: every malformed file is refused with our typed error, never anything else."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from filteratom_sd import FilterAtomConfig, add_filter_atoms, load_adapter, save_adapter, unload_adapter
from filteratom_sd.errors import FilterAtomError
from filteratom_sd.core.layer import AdaptedLayer
from filteratom_sd.core.inject import attached_adapters

from .tiny_unet import make_unet

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
CONFIG_FIELDS = ["m", "kc", "kc_out", "m1", "strategy", "train_alpha", "target_modules", "exclude_modules", "solver",
                 "lam", "iterations", "dictionary_steps", "scale", "preset", "unknown"]
META_KEYS = ["format", "format_version", "method", "config", "targets", "base_fingerprint", "num_parameters", "token"]


@pytest.fixture(scope="module")
def valid_adapter(tmp_path_factory):
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig(m=4, kc=8, strategy="beta+D1+Dc", m1=2))
    path = save_adapter(unet, tmp_path_factory.mktemp("fuzz") / "valid.safetensors")
    with safe_open(str(path), "pt") as f:
        return path.read_bytes(), dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def shared_unet():
    return make_unet()


mutations = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(META_KEYS), json_values),
    st.tuples(st.just("meta-text"), st.sampled_from(META_KEYS), st.text(max_size=30)),
    st.tuples(st.just("drop-meta"), st.sampled_from(META_KEYS), st.none()),
    st.tuples(st.just("config"), st.sampled_from(CONFIG_FIELDS), json_values),
    st.tuples(st.just("shape"), st.integers(0, 1000), st.lists(st.integers(0, 40), min_size=0, max_size=5)),
    st.tuples(st.just("dtype"), st.integers(0, 1000), st.sampled_from([torch.int32, torch.float16, torch.uint8])),
    st.tuples(st.just("drop-tensor"), st.integers(0, 1000), st.none()),
    st.tuples(st.just("bytes"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.none()),
)


def write_mutant(path, valid, mutation):
    data, meta, tensors = valid
    kind, key, value = mutation
    meta, tensors = dict(meta), dict(tensors)
    names = sorted(tensors)
    if kind in ("bytes", "truncate"):
        raw = bytearray(data)
        index = key % len(raw)
        if kind == "bytes":
            raw[index] = value
        else:
            raw = raw[:index]
        path.write_bytes(bytes(raw))
        return
    if kind == "meta":
        meta[key] = json.dumps(value)
    elif kind == "meta-text":
        meta[key] = value
    elif kind == "drop-meta":
        meta.pop(key, None)
    elif kind == "config":
        config = json.loads(meta["config"])
        config[key] = value
        meta["config"] = json.dumps(config)
    elif kind == "shape":
        name = names[key % len(names)]
        tensors[name] = torch.zeros(value)
    elif kind == "dtype":
        name = names[key % len(names)]
        tensors[name] = tensors[name].to(value)
    elif kind == "drop-tensor":
        tensors.pop(names[key % len(names)])
    save_file(tensors, str(path), metadata=meta)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations)
def test_malformed_adapters_raise_only_our_typed_errors(tmp_path, valid_adapter, shared_unet, mutation):
    path = tmp_path / "mutant.safetensors"
    write_mutant(path, valid_adapter, mutation)
    try:
        load_adapter(shared_unet, path, adapter_name="fuzz")
    except FilterAtomError as exc:
        assert "\n" not in str(exc)
        assert not any(isinstance(m, AdaptedLayer) for m in shared_unet.modules())
        assert attached_adapters(shared_unet) == {}
        return
    unload_adapter(shared_unet)  # a harmless mutation (say, of the token) may load
