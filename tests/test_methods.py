"""Every baseline method behind the AdapterMethod interface, on a tiny UNet.

Each method: identity at step 0, only its parameters train and all get gradients, the file
round trip reproduces the trained outputs, fuse equals unfused, unload restores the base bit
for bit. Then method-specific checks (LieRA's math, peft's state dict, OFT's limits, counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from filteratom_sd.core.adapter_file import save_adapter
from filteratom_sd.errors import ConfigError
from filteratom_sd.core.inject import add_adapter, remove_adapter
from filteratom_sd.core.inject import attached_adapters
from filteratom_sd.methods.registry import method_class
from filteratom_sd.methods.liera import lie_update
from filteratom_sd.filter_atoms.param_count import lora_parameters
from filteratom_sd.core.api import fuse_adapter, load_adapter, merge_and_unload, set_adapter_scale, unfuse_adapter, unload_adapter

from .tiny_unet import make_inputs, make_unet, run

METHODS = ["liera", "lora", "loha", "lokr", "oft", "bitfit", "difffit", "full"]


def make_method(name: str, **options):
    return method_class(name).from_config_dict(options)


def train_steps(unet: nn.Module, inputs: tuple, steps: int = 3) -> None:
    params = [p for p in unet.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-2)
    unet.train()
    for _ in range(steps):
        optimiser.zero_grad()
        unet(*inputs).sample.pow(2).mean().backward()
        optimiser.step()
    unet.eval()


def perturb(unet: nn.Module, adapter_name: str, seed: int) -> None:
    """Random non-zero adapter tensors, so an adapter visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    method = attached_adapters(unet)[adapter_name]
    with torch.no_grad():
        for p in method.trainable_parameters(unet, adapter_name):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def assert_is_base(unet: nn.Module) -> None:
    """Same module types, same attributes, same tensors, bit for bit, as a freshly built base."""
    base = make_unet()
    assert [type(m) for m in unet.modules()] == [type(m) for m in base.modules()]
    assert not hasattr(unet, "peft_config") and not attached_adapters(unet)
    got, want = unet.state_dict(), base.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.fixture(scope="module")
def base_output(inputs):
    return run(make_unet(), inputs)


@dataclass
class Trained:
    name: str
    unet: nn.Module
    count: int
    output: torch.Tensor
    path: Path


@pytest.fixture(scope="module", params=METHODS)
def trained(request, inputs, tmp_path_factory) -> Trained:
    unet = make_unet()
    count = add_adapter(unet, make_method(request.param))
    train_steps(unet, inputs)
    path = save_adapter(unet, tmp_path_factory.mktemp(request.param) / "adapter.safetensors", metadata={"token": "<x>"})
    return Trained(request.param, unet, count, run(unet, inputs), path)


@pytest.mark.parametrize("name", METHODS)
def test_patched_model_equals_its_base_at_init(name, inputs, base_output):
    unet = make_unet()
    add_adapter(unet, make_method(name))
    torch.testing.assert_close(run(unet, inputs), base_output, atol=1e-5, rtol=0)


def test_only_adapter_parameters_train_and_all_get_gradients(trained):
    unet = trained.unet
    method = attached_adapters(unet)["default"]
    trainable = method.trainable_parameters(unet, "default")
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in trainable}
    assert trained.count == sum(p.numel() for p in trainable) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_file_round_trip_reproduces_the_trained_model(trained, inputs, base_output):
    unet = make_unet()
    load_adapter(unet, trained.path, adapter_name="default")
    out = run(unet, inputs)
    torch.testing.assert_close(out, trained.output, atol=1e-6, rtol=0)
    assert (out - base_output).abs().max() > 1e-3
    assert not any(p.requires_grad for p in attached_adapters(unet)["default"].trainable_parameters(unet, "default"))


def test_fuse_equals_unfused_and_unload_restores_the_base(trained, inputs, base_output):
    unet = make_unet()
    load_adapter(unet, trained.path)
    unfused = run(unet, inputs)
    fuse_adapter(unet)
    torch.testing.assert_close(run(unet, inputs), unfused, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        set_adapter_scale(unet, 0.5)
    unfuse_adapter(unet)
    assert torch.equal(run(unet, inputs), unfused)
    fuse_adapter(unet)
    unload_adapter(unet)  # unfuses first
    assert_is_base(unet)
    assert all(p.requires_grad for p in unet.parameters())  # loading leaves the base's flags alone
    assert torch.equal(run(unet, inputs), base_output)


def test_scale_zero_is_the_base(trained, inputs, base_output):
    unet = make_unet()
    load_adapter(unet, trained.path)
    if trained.name == "oft":
        with pytest.raises(ConfigError, match="only scale 1"):
            set_adapter_scale(unet, 0.0)
        return
    set_adapter_scale(unet, 0.0)
    torch.testing.assert_close(run(unet, inputs), base_output, atol=1e-6, rtol=0)
    set_adapter_scale(unet, 1.0)
    torch.testing.assert_close(run(unet, inputs), trained.output, atol=1e-6, rtol=0)


def test_counting_on_the_meta_device_matches(trained):
    with torch.device("meta"):
        unet = make_unet()
    assert add_adapter(unet, make_method(trained.name)) == trained.count


# --- parameter counts from the layer shapes --------------------------------------------------

def _target_shapes(name: str, **options) -> tuple[int, list[tuple[int, ...]]]:
    unet = make_unet()
    count = add_adapter(unet, make_method(name, **options))
    targets = attached_adapters(unet)["default"].targets
    # Both peft layers and AdaptedLayers expose their base layer's weight as `.weight`.
    return count, [tuple(unet.get_submodule(t).weight.shape) for t in targets]


def _fan(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], int(torch.tensor(shape[1:]).prod())


@pytest.mark.parametrize("name, rank, per_rank", [("liera", 4, 1), ("lora", 1, 1), ("lora", 16, 1), ("loha", 4, 2)])
def test_low_rank_counts_follow_the_formulas(name, rank, per_rank):
    count, shapes = _target_shapes(name, rank=rank)
    assert count == per_rank * rank * sum(c_out + fan_in for c_out, fan_in in map(_fan, shapes))


def test_low_rank_methods_share_the_filter_atom_targets():
    unet = make_unet()
    add_adapter(unet, make_method("liera"), "a")
    targets = attached_adapters(unet)["a"].targets
    assert "conv_in" in targets and "down_blocks.0.attentions.0.proj_in" in targets
    assert "time_embedding.linear_1" not in targets
    assert add_adapter(make_unet(), make_method("lora")) == lora_parameters(make_unet(), targets, 4)


def test_bias_and_full_counts():
    base = make_unet()
    norms = [m for m in base.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias"))
    norm_weights = sum(m.weight.numel() for m in norms)
    assert add_adapter(make_unet(), make_method("bitfit")) == biases
    assert add_adapter(make_unet(), make_method("full")) == sum(p.numel() for p in base.parameters())
    unet = make_unet()
    count = add_adapter(unet, make_method("difffit"))
    gammas = [t for t, layer in ((t, unet.get_submodule(t)) for t in attached_adapters(unet)["default"].targets)
              if layer.deltas["default"].gamma_delta is not None]
    assert "down_blocks.0.resnets.0.conv2" in gammas and "up_blocks.1.attentions.0.proj_out" in gammas
    assert count == biases + norm_weights + sum(unet.get_submodule(t).base_layer.weight.shape[0] for t in gammas)


# --- LieRA ------------------------------------------------------------------------------------

def _liera_conv(first_order: bool, magnitude: float):
    unet = make_unet()
    add_adapter(unet, make_method("liera", rank=2, alpha=4.0, first_order=first_order))
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    delta = layer.deltas["default"]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        delta.lora_B.copy_(magnitude * torch.randn(delta.lora_B.shape, generator=gen))
    return layer, delta


def test_liera_update_is_the_hadamard_exponential():
    layer, delta = _liera_conv(first_order=False, magnitude=0.5)
    w = layer.base_layer.weight
    c_out, c_in, k, _ = w.shape
    log_delta = torch.zeros_like(w)
    for o in range(c_out):  # ΔW filter by filter: s · sum_r B[o, r] A[r] reshaped to c_in x k x k
        for r in range(2):
            log_delta[o] += 2.0 * delta.lora_B[o, r] * delta.lora_A[r].reshape(c_in, k, k)
    expected = w * torch.exp(log_delta)
    torch.testing.assert_close(w + layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)
    assert (layer.delta_weight() == 0).sum() >= (w == 0).sum()  # zeros of W stay zeros
    x = torch.randn(1, c_in, 8, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, expected, layer.base_layer.bias, padding=1),
                               atol=1e-5, rtol=1e-5)


def test_liera_exact_and_first_order_agree_for_small_updates_only():
    for magnitude, close in ((1e-3, True), (5.0, False)):
        exact = _liera_conv(first_order=False, magnitude=magnitude)[0].delta_weight().detach()
        first = _liera_conv(first_order=True, magnitude=magnitude)[0].delta_weight().detach()
        relative = float((exact - first).norm() / exact.norm())
        assert (relative < 1e-2) if close else (relative > 0.1), (magnitude, relative)


def test_lie_update_math():
    w, log_delta = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.1, -0.2, 5.0])
    torch.testing.assert_close(lie_update(w, log_delta), w * (torch.exp(log_delta) - 1))
    torch.testing.assert_close(lie_update(w, log_delta, first_order=True), w * log_delta)


# --- peft-backed methods ----------------------------------------------------------------------

def test_file_holds_peafts_own_state_dict():
    from peft import get_peft_model_state_dict

    unet = make_unet()
    add_adapter(unet, make_method("lora"))
    perturb(unet, "default", seed=0)
    ours = attached_adapters(unet)["default"].adapter_state_dict(unet, "default")
    theirs = get_peft_model_state_dict(unet, adapter_name="default")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_oft_leaves_kxk_convolutions_out():
    unet = make_unet()
    add_adapter(unet, make_method("oft", block_size=16))
    method = attached_adapters(unet)["default"]
    assert "down_blocks.0.attentions.0.proj_in" in method.targets
    assert method.skipped["conv_in"].startswith("peft's OFT")
    assert all(unet.get_submodule(t).weight.shape[2:] in ((), (1, 1)) for t in method.targets)


@pytest.mark.parametrize("first, second", [("lora", "loha"), ("lora", "lora"), ("liera", "difffit"), ("bitfit", "full")])
def test_two_adapters_add_up_and_come_off_exactly(first, second, inputs, base_output):
    unet = make_unet()
    add_adapter(unet, make_method(first), "a")
    perturb(unet, "a", seed=1)
    only_a = run(unet, inputs)
    add_adapter(unet, make_method(second), "b")
    perturb(unet, "b", seed=2)
    both = run(unet, inputs)
    assert (both - only_a).abs().max() > 1e-4
    fuse_adapter(unet)
    torch.testing.assert_close(run(unet, inputs), both, atol=1e-5, rtol=0)
    unfuse_adapter(unet)
    remove_adapter(unet, "b")
    assert torch.equal(run(unet, inputs), only_a)
    remove_adapter(unet, "a")
    assert_is_base(unet)
    assert torch.equal(run(unet, inputs), base_output)


@pytest.mark.parametrize("first, second", [("liera", "lora"), ("lora", "liera"), ("lora", "bitfit")])
def test_peft_layers_and_adapted_layers_do_not_stack(first, second):
    unet = make_unet()
    add_adapter(unet, make_method(first), "a")
    with pytest.raises(ConfigError, match="cannot"):
        add_adapter(unet, make_method(second), "b")


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_settings_round_trip_and_unknown_keys_are_refused(name):
    cls = method_class(name)
    config = cls.from_config_dict({}).config_dict()
    assert cls.from_config_dict(config).config_dict() == config
    with pytest.raises(ConfigError, match="'bogus'"):
        cls.from_config_dict({"bogus": 1})
    assert cls.default_lr == (5e-6 if name == "full" else 1e-3)


@pytest.mark.parametrize("name, bad", [
    ("liera", {"rank": 0}), ("liera", {"first_order": "yes"}), ("lora", {"alpha": float("nan")}),
    ("lora", {"dropout": 2.0}), ("lokr", {"factor": 0}), ("oft", {"block_size": True}),
    ("loha", {"target_modules": ["("]}), ("difffit", {"gamma_modules": "conv2"}), ("full", {"exclude_modules": None}),
])
def test_bad_values_are_config_errors(name, bad):
    with pytest.raises(ConfigError):
        method_class(name).from_config_dict(bad)


def test_defaults_match_the_papers_tables():
    assert make_method("lora").config_dict()["rank"] == 4
    assert make_method("loha").config_dict()["rank"] == 4
    assert make_method("lokr").config_dict()["factor"] == 4
    assert make_method("lora", rank=16).config_dict()["alpha"] == 16.0
    assert make_method("oft").config_dict()["block_size"] == 32


@pytest.mark.parametrize("name, change", [("liera", {"rank": 3}), ("lora", {"rank": 8}), ("lokr", {"factor": 2}),
                                          ("difffit", {"gamma_modules": []}), ("liera", {"rank": 4096}),
                                          ("loha", {"rank": 4096})])
def test_a_file_that_does_not_fit_its_config_is_refused_and_leaves_the_base(name, change, tmp_path, inputs, base_output):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from filteratom_sd.errors import AdapterFormatError

    unet = make_unet()
    add_adapter(unet, make_method(name))
    path = save_adapter(unet, tmp_path / "good.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), **change})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = make_unet()
    with pytest.raises(AdapterFormatError):
        load_adapter(fresh, tmp_path / "bad.safetensors")
    assert_is_base(fresh)
    assert torch.equal(run(fresh, inputs), base_output)




def assert_merged_in_place(path: Path) -> None:
    """merge_and_unload leaves the weights fuse + unload leave, in the base parameters' own storage."""
    fused_first = make_unet()
    load_adapter(fused_first, path)
    fuse_adapter(fused_first)  # keeps W as the backup, which merge_and_unload then drops
    merge_and_unload(fused_first)
    unet = make_unet()
    storage = {name: p.data_ptr() for name, p in unet.named_parameters()}
    load_adapter(unet, path)
    merge_and_unload(unet)
    got, want, base = unet.state_dict(), fused_first.state_dict(), make_unet().state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], base[k]) for k in base)
    assert [name for name, p in unet.named_parameters() if p.data_ptr() != storage[name]] == []


def test_merge_and_unload_writes_the_fused_weights_into_the_base_storage(trained):
    assert_merged_in_place(trained.path)


@pytest.mark.parametrize("preset", ["C1", "C2", "C3"])
def test_filter_atoms_merge_and_unload_in_place(preset, tmp_path):
    from .test_adapter_files import trained_adapter

    assert_merged_in_place(trained_adapter(tmp_path, preset)[1])


def test_a_fuse_without_backup_refuses_to_unfuse(trained, inputs):
    unet = make_unet()
    load_adapter(unet, trained.path)
    for method in attached_adapters(unet).values():
        method.fuse(unet, backup=False)
    fused = run(unet, inputs)
    with pytest.raises(ConfigError, match="without a backup"):
        unfuse_adapter(unet)
    assert torch.equal(run(unet, inputs), fused)
