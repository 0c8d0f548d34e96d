"""Hostile adapter files and careless library calls: refused with our typed error, the model left exactly as it was."""

from __future__ import annotations

import json
import logging
import math
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from filteratom_sd import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConfigError,
    FilterAtomConfig,
    UserInputError,
    add_adapter,
    add_filter_atoms,
    decompose_unet,
    fuse_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
    set_adapter_scale,
    unload_adapter,
)
from filteratom_sd.methods.registry import method_class

from .tiny_unet import make_inputs, make_unet, run

CONFIG = FilterAtomConfig(m=4, kc=8)


def _trained(unet: torch.nn.Module, seed: int) -> None:
    # Non-zero updates, so that a loaded adapter changes the output.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.requires_grad:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def _make_adapter(path: Path, method: str = "filter-atoms", seed: int = 3) -> Path:
    unet = make_unet()
    if method == "filter-atoms":
        add_filter_atoms(unet, CONFIG)
    else:
        add_adapter(unet, method_class(method).from_config_dict({"rank": 2} if method == "lora" else {}))
    _trained(unet, seed)
    return save_adapter(unet, path, metadata={"token": "<castle>"})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return _make_adapter(tmp_path_factory.mktemp("hostile") / "castle.safetensors")


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory) -> Path:
    return _make_adapter(tmp_path_factory.mktemp("hostile") / "tower.safetensors", seed=4)


def _contents(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}


def rewrite(src: Path, dst: Path, meta: dict[str, str] | None = None, tensors=None) -> Path:
    """A copy of an adapter with metadata entries replaced and tensors changed by `tensors(dict)`."""
    metadata, stored = _contents(src)
    metadata.update(meta or {})
    if tensors is not None:
        tensors(stored)
    save_file(stored, str(dst), metadata=metadata)
    return dst


def snapshot(unet: torch.nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    """Module names and types, and every state_dict tensor (cloned)."""
    return ([(n, type(m).__name__) for n, m in unet.named_modules()],
            {k: v.detach().clone() for k, v in unet.state_dict().items()})


def assert_same(unet: torch.nn.Module, before) -> None:
    modules, state = before
    now_modules, now_state = snapshot(unet)
    assert now_modules == modules
    assert list(now_state) == list(state)
    for key, value in state.items():
        assert torch.equal(now_state[key], value), key


def _first(stored: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(k for k in stored if k.endswith(suffix))[0]


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: the regular-expression engine checks for signals while it runs."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("where, value", [
    ("delta_atoms", math.nan), ("delta_atoms", math.inf), ("delta_atoms", -math.inf), ("atoms0", math.nan),
])
def test_non_finite_tensors_are_refused(adapter, tmp_path, where, value):
    def poison(stored):
        stored[_first(stored, where)].view(-1)[0] = value

    bad = rewrite(adapter, tmp_path / "bad.safetensors", tensors=poison)
    with pytest.raises(AdapterFormatError, match="not finite"):
        read_adapter(bad)
    unet = make_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFormatError):
        load_adapter(unet, bad)
    assert_same(unet, before)


@pytest.mark.parametrize("case", ["all zero", "one atom zero", "two equal atoms", "nearly equal atoms"])
def test_degenerate_fixed_atoms_are_refused_before_any_solve(adapter, tmp_path, case):
    def degrade(stored):
        key = _first(stored, ".atoms0")
        atoms = stored[key]
        if case == "all zero":
            atoms.zero_()
        elif case == "one atom zero":
            atoms[1].zero_()
        elif case == "two equal atoms":
            atoms[1] = atoms[0]
        else:
            atoms[1] = atoms[0] + 1e-7 * atoms[2]

    bad = rewrite(adapter, tmp_path / "bad.safetensors", tensors=degrade)
    unet = make_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFormatError, match="atoms"):
        load_adapter(unet, bad)
    assert_same(unet, before)


def _fingerprint(adapter: Path) -> dict:
    return json.loads(_contents(adapter)[0]["base_fingerprint"])


@pytest.mark.parametrize("case", [
    "missing", "not JSON", "a list", "no layers", "empty layers", "one layer missing", "signature a string",
    "signature too short", "signature of strings", "signature NaN", "signature a boolean", "layers a list",
    "digest a number",
])
def test_the_base_fingerprint_is_required_and_well_formed(adapter, tmp_path, case):
    meta, _ = _contents(adapter)
    found = _fingerprint(adapter)
    layers = found["layers"]
    first = sorted(layers)[0]
    changed = {
        "not JSON": "{layers:",
        "a list": json.dumps([found]),
        "no layers": json.dumps({"digest": found["digest"]}),
        "empty layers": json.dumps({"digest": found["digest"], "layers": {}}),
        "one layer missing": json.dumps({**found, "layers": {k: v for k, v in layers.items() if k != first}}),
        "signature a string": json.dumps({**found, "layers": {**layers, first: "abc"}}),
        "signature too short": json.dumps({**found, "layers": {**layers, first: layers[first][:2]}}),
        "signature of strings": json.dumps({**found, "layers": {**layers, first: [str(v) for v in layers[first]]}}),
        "signature NaN": json.dumps({**found, "layers": {**layers, first: [math.nan] * 3}}),
        "signature a boolean": json.dumps({**found, "layers": {**layers, first: [True, 1.0, 2.0]}}),
        "layers a list": json.dumps({**found, "layers": list(layers.values())}),
        "digest a number": json.dumps({**found, "digest": 5}),
    }
    bad = tmp_path / "bad.safetensors"
    if case == "missing":
        del meta["base_fingerprint"]
        save_file(_contents(adapter)[1], str(bad), metadata=meta)
    else:
        rewrite(adapter, bad, meta={"base_fingerprint": changed[case]})
    with pytest.raises(AdapterFormatError, match="fingerprint"):
        read_adapter(bad)
    unet = make_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFormatError):
        load_adapter(unet, bad, check_base=False)  # a malformed file is refused even when the check is skipped
    assert_same(unet, before)


def test_the_base_check_is_skipped_only_when_asked(adapter):
    other = make_unet(seed=1)
    before = snapshot(other)
    with pytest.raises(BaseModelMismatchError, match="differ from this model's weights"):
        load_adapter(other, adapter)
    assert_same(other, before)
    for unclear in (None, 0, "no"):
        with pytest.raises(ConfigError, match="check_base"):
            load_adapter(other, adapter, check_base=unclear)
        assert_same(other, before)
    assert load_adapter(other, adapter, check_base=False) == "castle"


@pytest.mark.parametrize("key, text", [
    ("config", "[" * 100_000 + "]" * 100_000),
    ("targets", "[" * 100_000 + "]" * 100_000),
    ("base_fingerprint", '{"layers": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
    ("num_parameters", "[" * 100_000 + "]" * 100_000),
    ("config", json.dumps({"m": 4, "kc": 8, "padding": "x" * (20 * 2**20)})),
])
def test_metadata_json_depth_and_size_are_bounded(adapter, tmp_path, key, text):
    bad = rewrite(adapter, tmp_path / "bad.safetensors", meta={key: text})
    with pytest.raises(AdapterFormatError, match=key):
        read_adapter(bad)


EVIL = "^(.*.*)*Z$"


@pytest.mark.parametrize("method", ["filter-atoms", "lora", "bitfit"])
def test_patterns_from_an_adapter_file_are_never_run(tmp_path, method):
    good = _make_adapter(tmp_path / "good.safetensors", method)
    config = json.loads(_contents(good)[0]["config"])
    if "target_modules" in config:
        config["target_modules"] = [EVIL]
    config["exclude_modules"] = [EVIL, "(x+x+)+y"]
    crafted = rewrite(good, tmp_path / "crafted.safetensors", meta={"config": json.dumps(config)})
    reference, unet = make_unet(), make_unet()
    load_adapter(reference, good)
    inputs = make_inputs()
    with time_limit(60):
        name = load_adapter(unet, crafted)
    assert torch.equal(run(unet, inputs), run(reference, inputs))
    unload_adapter(unet, name)
    assert_same(unet, snapshot(make_unet()))


@pytest.mark.parametrize("adapter_name", ["castle.v2", "__class__", "a b", "x" * 200, "training", "forward", "-x"])
def test_a_bad_adapter_name_leaves_the_model_as_it_was(adapter, second_adapter, adapter_name):
    unet = make_unet()
    load_adapter(unet, second_adapter, adapter_name="first")
    before = snapshot(unet)
    with pytest.raises(ConfigError, match="adapter name"):
        load_adapter(unet, adapter, adapter_name=adapter_name)
    assert_same(unet, before)
    unload_adapter(unet)
    assert_same(unet, snapshot(make_unet()))
    assert not any("base_layer" in k for k in unet.state_dict())


@pytest.mark.parametrize("case", ["misshapen tensor", "missing tensor", "other base", "NaN scale", "duplicate name"])
def test_a_failed_load_is_all_or_nothing(adapter, second_adapter, tmp_path, case):
    unet = make_unet()
    load_adapter(unet, second_adapter, adapter_name="first")
    before = snapshot(unet)
    path, kwargs, error = adapter, {}, UserInputError
    if case == "misshapen tensor":
        path = rewrite(adapter, tmp_path / "bad.safetensors",
                       tensors=lambda s: s.update({_first(s, "delta_atoms"): torch.zeros(4, 3, 2)}))
        error = AdapterFormatError
    elif case == "missing tensor":
        path = rewrite(adapter, tmp_path / "bad.safetensors", tensors=lambda s: s.pop(_first(s, "delta_atoms")))
        error = AdapterFormatError
    elif case == "other base":
        other = make_unet(seed=1)
        add_filter_atoms(other, CONFIG)
        _trained(other, 3)
        path = save_adapter(other, tmp_path / "other.safetensors")
        error = BaseModelMismatchError
    elif case == "NaN scale":
        kwargs = {"scale": math.nan}
        error = ConfigError
    else:
        kwargs = {"adapter_name": "first"}
        error = ConfigError
    with pytest.raises(error):
        load_adapter(unet, path, **kwargs)
    assert_same(unet, before)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e30, -1e30, "1", None, True])
def test_scales_must_be_finite_numbers_in_range(adapter, scale):
    unet = make_unet()
    load_adapter(unet, adapter)
    before = snapshot(unet)
    inputs = make_inputs()
    expected = run(unet, inputs)
    with pytest.raises(ConfigError, match="scale"):
        set_adapter_scale(unet, scale)
    with pytest.raises(ConfigError, match="scale"):
        set_adapter_scale(unet, scale, adapter_name="castle")
    assert_same(unet, before)
    assert torch.equal(run(unet, inputs), expected)
    fresh = make_unet()
    with pytest.raises(ConfigError, match="scale"):
        load_adapter(fresh, adapter, scale=scale)
    assert_same(fresh, snapshot(make_unet()))


@pytest.mark.parametrize("scale", [0.0, -1.0, 0.5, 2, 10.0])
def test_ordinary_scales_are_accepted(adapter, scale):
    unet = make_unet()
    load_adapter(unet, adapter, scale=scale)
    set_adapter_scale(unet, scale)


def test_unloading_one_of_two_fused_adapters_keeps_the_other_fused(adapter, second_adapter):
    inputs = make_inputs()
    only_first = make_unet()
    load_adapter(only_first, adapter, adapter_name="first")
    fuse_adapter(only_first)
    unet = make_unet()
    load_adapter(unet, adapter, adapter_name="first")
    load_adapter(unet, second_adapter, adapter_name="second")
    fuse_adapter(unet)
    unload_adapter(unet, "second")
    assert any(getattr(m, "merged", None) for m in unet.modules()), "the remaining adapter was unfused"
    assert torch.allclose(run(unet, inputs), run(only_first, inputs), atol=1e-5)
    unload_adapter(unet, "first")
    assert_same(unet, snapshot(make_unet()))


def test_a_truncated_decomposition_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FILTERATOM_SD_CACHE_DIR", str(tmp_path))
    fresh = make_unet()
    add_filter_atoms(fresh, CONFIG)  # before the cache exists
    _, path = decompose_unet(make_unet(), CONFIG, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    unet = make_unet()
    with caplog.at_level(logging.WARNING):
        add_filter_atoms(unet, CONFIG)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert path.name in warning and "unreadable" in warning
    assert not path.exists() or path.stat().st_size > 0 and _readable(path)
    inputs = make_inputs()
    assert torch.equal(run(unet, inputs), run(fresh, inputs))


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return all(handle.get_tensor(k) is not None for k in handle.keys())
    except Exception:
        return False


@pytest.mark.parametrize("targets, message", [
    ([""], "not a layer with weights"), (["time_embedding"], "not a layer with weights"),
    (["down_blocks"], "not a layer with weights"), (["conv_in", "conv_in"], "more than once"),
])
def test_targets_that_are_not_layers_are_refused(adapter, tmp_path, targets, message):
    fingerprint = {"digest": "0", "layers": {t: [1.0, 0.0, 0.0] for t in targets}}
    bad = rewrite(adapter, tmp_path / "bad.safetensors",
                  meta={"targets": json.dumps(targets), "base_fingerprint": json.dumps(fingerprint)})
    for check_base in (True, False):  # the fingerprint check once read a container's missing weight
        unet = make_unet()
        before = snapshot(unet)
        with pytest.raises(AdapterFormatError, match=message):
            load_adapter(unet, bad, check_base=check_base)
        assert_same(unet, before)
