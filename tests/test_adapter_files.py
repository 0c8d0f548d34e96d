"""Adapter files and the pipeline hook: round trips, fingerprints, combination, bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from filteratom_sd import (
    FilterAtomConfig,
    add_filter_atoms,
    fuse_adapter,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
    set_adapter_scale,
    unfuse_adapter,
    unload_adapter,
)
from filteratom_sd.errors import AdapterFormatError, BaseModelMismatchError, ConfigError
from filteratom_sd.core.layer import AdaptedLayer
from filteratom_sd.core.inject import attached_adapters
from filteratom_sd.filter_atoms.method import FilterAtomMethod

from .tiny_unet import make_inputs, make_unet, run


def trained_adapter(tmp_path, preset="C2", seed=3, name="castle.safetensors"):
    """A filter-atom adapter with random (non-zero) atom updates, saved to tmp_path."""
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    path = save_adapter(unet, tmp_path / name, metadata={"token": "<castle>", "base_model": "tiny-test"})
    return unet, path


class FakePipeline:
    """Stands in for a StableDiffusionPipeline: the hook only needs `.unet`."""

    def __init__(self, unet):
        self.unet = unet


@pytest.mark.parametrize("preset", ["C1", "C2", "C3", "C4"])
def test_save_then_load_into_a_fresh_base_reproduces_outputs(tmp_path, preset):
    inputs = make_inputs()
    trained, path = trained_adapter(tmp_path, preset)
    expected = run(trained, inputs)
    pipe = FakePipeline(make_unet())
    assert load_adapter(pipe, path) == "castle"
    torch.testing.assert_close(run(pipe.unet, inputs), expected, atol=1e-5, rtol=1e-5)
    assert not (expected - run(make_unet(), inputs)).abs().max() < 1e-3  # the adapter does change outputs


def test_file_holds_atoms_but_never_alpha(tmp_path):
    _, path = trained_adapter(tmp_path, "C1")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.endswith("alpha") for k in keys)
    assert any(k.endswith("atoms0") for k in keys) and any(k.endswith("delta_atoms") for k in keys)
    meta = read_adapter_metadata(path)
    assert meta["method"] == "filter-atoms" and meta["token"] == "<castle>" and meta["base_model"] == "tiny-test"
    assert json.loads(meta["config"])["m"] == 6
    assert int(meta["num_parameters"]) > 0 and json.loads(meta["targets"])
    assert json.loads(meta["base_fingerprint"])["digest"]


def test_alpha_rebuilt_in_float64_matches_float32(tmp_path):
    inputs = make_inputs()
    _, path = trained_adapter(tmp_path, "C2")
    outputs = []
    for dtype in (torch.float32, torch.float64):
        unet = make_unet()
        original = FilterAtomMethod.__init__.__defaults__
        FilterAtomMethod.__init__.__defaults__ = (None, dtype)
        try:
            load_adapter(unet, path)
        finally:
            FilterAtomMethod.__init__.__defaults__ = original
        assert unet.conv_in.deltas["castle"].alpha.dtype == dtype
        outputs.append(run(unet, inputs))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=0)


def test_loading_into_a_base_with_different_weights_is_refused(tmp_path):
    _, path = trained_adapter(tmp_path)
    other = make_unet(seed=99)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseModelMismatchError, match="tiny-test"):
        load_adapter(other, path)
    assert not any(isinstance(m, AdaptedLayer) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    load_adapter(other, path, check_base=False)  # the override still works


def test_fingerprint_tolerates_a_half_precision_base(tmp_path):
    _, path = trained_adapter(tmp_path)
    load_adapter(make_unet().to(torch.bfloat16), path)


def test_two_adapters_combine_additively_with_their_own_scales(tmp_path):
    inputs = make_inputs()
    _, first = trained_adapter(tmp_path, "C2", seed=1, name="a.safetensors")
    _, second = trained_adapter(tmp_path, "C1", seed=2, name="b.safetensors")
    unet = make_unet()
    load_adapter(unet, first, scale=0.7)
    load_adapter(unet, second, scale=1.3)
    layer = unet.conv_in
    combined = layer.delta_weight()
    expected = 0.7 * layer.deltas["a"].delta_weight(layer.weight) + 1.3 * layer.deltas["b"].delta_weight(layer.weight)
    torch.testing.assert_close(combined, expected)
    # effect on the model: one adapter at a time, then both
    only_a = make_unet(); load_adapter(only_a, first, scale=0.7)
    only_b = make_unet(); load_adapter(only_b, second, scale=1.3)
    base = run(make_unet(), inputs)
    both = run(unet, inputs)
    assert (both - run(only_a, inputs)).abs().max() > 1e-4 and (both - run(only_b, inputs)).abs().max() > 1e-4
    set_adapter_scale(unet, 0.0, "b")
    torch.testing.assert_close(run(unet, inputs), run(only_a, inputs), atol=1e-5, rtol=0)
    set_adapter_scale(unet, 0.0)
    torch.testing.assert_close(run(unet, inputs), base, atol=1e-6, rtol=0)


def test_fuse_equals_unfused_and_unload_restores_the_base_bit_for_bit(tmp_path):
    inputs = make_inputs()
    _, path = trained_adapter(tmp_path)
    pristine = make_unet()
    base_state = {k: v.clone() for k, v in pristine.state_dict().items()}
    pipe = FakePipeline(pristine)
    load_adapter(pipe, path)
    unfused = run(pipe.unet, inputs)
    fuse_adapter(pipe)
    torch.testing.assert_close(run(pipe.unet, inputs), unfused, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        set_adapter_scale(pipe, 0.5)
    unfuse_adapter(pipe)
    fuse_adapter(pipe)
    unload_adapter(pipe)
    assert attached_adapters(pipe.unet) == {}
    state = pipe.unet.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    assert torch.equal(run(pipe.unet, inputs), run(make_unet(), inputs))


def test_loading_the_same_name_twice_is_refused(tmp_path):
    _, path = trained_adapter(tmp_path)
    unet = make_unet()
    load_adapter(unet, path, adapter_name="x")
    with pytest.raises(ConfigError):
        load_adapter(unet, path, adapter_name="x")
    assert load_adapter(unet, path) == "castle"


def test_saves_are_atomic_and_leave_no_temporary_files(tmp_path):
    trained_adapter(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["castle.safetensors"]


def test_saving_an_unknown_adapter_name_is_refused(tmp_path):
    with pytest.raises(ConfigError):
        save_adapter(make_unet(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def bad_files(tmp_path):
    good = trained_adapter(tmp_path)[1]
    data = good.read_bytes()
    (tmp_path / "text.safetensors").write_text("this is not a safetensors file")
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    return {
        "missing": tmp_path / "nope.safetensors",
        "text": tmp_path / "text.safetensors",
        "truncated": tmp_path / "truncated.safetensors",
        "foreign": tmp_path / "foreign.safetensors",
    }


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "foreign"])
def test_bad_files_give_one_sentence_and_leave_the_model_untouched(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    unet = make_unet()
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(unet, path)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")
    assert not any(isinstance(m, AdaptedLayer) for m in unet.modules())


def test_tensors_of_the_wrong_shape_are_refused(tmp_path):
    _, path = trained_adapter(tmp_path, "C1")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("delta_atoms"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    unet = make_unet()
    with pytest.raises(AdapterFormatError, match="misshapen"):
        load_adapter(unet, tmp_path / "bad.safetensors")
    assert not any(isinstance(m, AdaptedLayer) for m in unet.modules())


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    from filteratom_sd.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        trained_adapter(tmp_path, name="a.safetensors")  # safetensors creates the file itself
    finally:
        os.umask(umask)
    for name in ("a.txt", "a.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
