"""Filter-atom layers and injection on a tiny UNet: identity at init, gradients, merge, scale."""

import pytest
import torch
from torch import nn

from filteratom_sd import FilterAtomConfig, add_filter_atoms
from filteratom_sd.errors import ConfigError
from filteratom_sd.core.layer import AdaptedLayer
from filteratom_sd.filter_atoms.decomposition import decompose_layer
from filteratom_sd.filter_atoms.delta import AtomDelta
from filteratom_sd.filter_atoms.overcomplete import overcomplete_update
from filteratom_sd.core.inject import attached_adapters

from .tiny_unet import make_inputs, make_unet, run

PRESETS = ["C1", "C2", "C3", "C4"]


@pytest.mark.parametrize("preset", PRESETS)
def test_patched_model_equals_its_base_at_init(preset):
    inputs = make_inputs()
    base = run(make_unet(), inputs)
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    torch.testing.assert_close(run(unet, inputs), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_only_adapter_parameters_train_and_all_get_gradients(preset):
    unet = make_unet()
    count = add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert count == sum(p.numel() for _, p in trainable) > 0
    assert all(".deltas.default.delta_" in n for n, _ in trainable)
    unet.train()
    unet(*make_inputs()).sample.pow(2).mean().backward()
    # C3's beta multiplies D1, which starts at zero: its gradient is exactly 0 until D1 has moved
    at_init = [(n, p) for n, p in trainable if not n.endswith("delta_beta")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in at_init)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def expected_count(unet, config):
    """Parameter count from the paper's formulas (Table 6), counted from the layer shapes."""
    total = 0
    for module in unet.modules():
        if not isinstance(module, AdaptedLayer):
            continue
        w = module.base_layer.weight
        delta = module.deltas["default"]
        if delta.layout == "conv":
            c_in, k = w.shape[1], w.shape[2]
            if config.strategy == "beta+D1+Dc":
                total += config.m * config.m1 * k * k + c_in * config.m * config.m1
            else:
                total += config.m * k * k
        else:
            total += delta.atoms0.numel()  # m x kc_out x kc
        if config.train_alpha:
            total += delta.alpha.numel()
    return total


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_count_follows_the_papers_formulas(preset):
    unet = make_unet()
    config = FilterAtomConfig.preset(preset)
    assert add_filter_atoms(unet, config) == expected_count(unet, config)


def test_default_targets_and_skipped_layers_are_listed():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C1"))
    method = attached_adapters(unet)["default"]
    assert "conv_in" in method.targets and "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in method.targets
    assert "down_blocks.0.attentions.0.proj_in" in method.targets
    assert "time_embedding.linear_1" in method.skipped
    assert all(reason for reason in method.skipped.values())
    convs_and_linears = {n for n, m in make_unet().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(method.targets) | set(method.skipped) == convs_and_linears


def test_strategy_d_only_touches_kxk_convolutions():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig(m=6, strategy="D"))
    method = attached_adapters(unet)["default"]
    assert all(isinstance(unet.get_submodule(t).base_layer, nn.Conv2d) for t in method.targets)
    assert all(unet.get_submodule(t).base_layer.kernel_size != (1, 1) for t in method.targets)


def test_target_and_exclude_patterns():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig(m=4, kc=4, target_modules=[r"attn1\.to_q$", r"conv_in"], exclude_modules=["conv_in"]))
    method = attached_adapters(unet)["default"]
    assert method.targets and all(t.endswith("attn1.to_q") for t in method.targets)
    assert method.skipped["conv_in"] == "matched by exclude_modules"


def test_update_is_alpha_times_delta_atoms():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C2"))
    layer = unet.conv_in
    delta = layer.deltas["default"]
    with torch.no_grad():
        delta.delta_atoms.normal_()
    expected = torch.einsum("oim,mpq->oipq", delta.alpha, delta.delta_atoms)
    torch.testing.assert_close(layer.delta_weight(), expected)
    linear = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    d = linear.deltas["default"]
    with torch.no_grad():
        d.delta_atoms.normal_()
    a, b, m = d.alpha.shape
    p, q = d.atoms0.shape[1:]
    manual = torch.zeros(a * p, b * q)
    for i in range(a):
        for j in range(b):
            manual[i * p:(i + 1) * p, j * q:(j + 1) * q] = sum(d.alpha[i, j, l] * d.delta_atoms[l] for l in range(m))
    torch.testing.assert_close(linear.delta_weight(), manual)


def test_overcomplete_update_matches_building_the_atoms_explicitly():
    torch.manual_seed(0)
    o, i, m, m1, k = 5, 4, 3, 2, 3
    alpha, atoms0 = torch.randn(o, i, m), torch.randn(m, k, k)
    d_beta, d_atoms1 = torch.randn(i, m, m1), torch.randn(m, m1, k, k)
    beta = 1.0 / m1 + d_beta
    atoms1 = atoms0[:, None] + d_atoms1
    per_channel = torch.einsum("imj,mjpq->impq", beta, atoms1)  # D_il = sum_j beta_ilj D1_lj
    new_weight = torch.einsum("oim,impq->oipq", alpha, per_channel)
    old_weight = torch.einsum("oim,mpq->oipq", alpha, atoms0)
    torch.testing.assert_close(overcomplete_update(alpha, atoms0, d_beta, d_atoms1, init="copies"), new_weight - old_weight)


def test_merge_unmerge_restore_exactly_and_scale_multiplies():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C1"))
    layer = unet.conv_in
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.deltas["default"].delta_atoms.normal_()
    x = torch.randn(1, 4, 8, 8)
    unfused = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unfused)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    full = layer.delta_weight()
    layer.set_scale("default", 0.5)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * full)
    layer.set_scale("default", 0.0)
    assert torch.equal(layer(x), layer.base_layer(x))
    with pytest.raises(ConfigError, match="No adapter named 'other'"):
        layer.set_scale("other", 1.0)  # a typo fails instead of setting a scale nothing reads
    assert layer.scales == {"default": 0.0}



@pytest.mark.parametrize("preset", ["C1", "C2", "C3"])
def test_in_place_add_writes_the_bits_of_a_new_tensor(preset, monkeypatch):
    monkeypatch.setattr("filteratom_sd.filter_atoms.delta._CHUNK_ELEMENTS", 256)  # several chunks per layer
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    gen = torch.Generator().manual_seed(2)
    taken = set()
    for layer in (m for m in unet.modules() if isinstance(m, AdaptedLayer)):
        delta = layer.deltas["default"]
        with torch.no_grad():
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            weight = layer.base_layer.weight.detach()
            expected = delta.add_to(weight, weight, 0.7)
            in_place = weight.clone()
            if delta.add_in_place(in_place, 0.7):
                taken.add(delta.layout)
                assert torch.equal(in_place, expected)
            else:
                assert torch.equal(in_place, weight)
    # C3's k x k convs are overcomplete (one transform per input channel): they keep the new-tensor build
    assert taken == ({"blocks"} if preset == "C3" else {"conv", "blocks"})


@pytest.mark.parametrize("c_out, c_in", [(5, 3), (4, 6)])  # 15 filters: one left over after the pairs; 24: none
def test_derived_conv_update_in_place_matches_alpha_times_atoms(c_out, c_in, monkeypatch):
    monkeypatch.setattr("filteratom_sd.filter_atoms.delta._CHUNK_ELEMENTS", 40)  # chunks of 4 filters
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3)
    found = decompose_layer(conv.weight.detach(), "conv", FilterAtomConfig.preset("C1"))
    delta = AtomDelta(None, found.atoms0, "conv", coefficient_shape=(c_out, c_in))
    with torch.no_grad():
        delta.delta_atoms.normal_()
        weight = conv.weight.detach().clone()
        # the reference builds alpha = rows(W) pinv(D0) in float64 and multiplies it by dD
        rows = weight.double().reshape(-1, 9)
        alpha = rows @ torch.linalg.pinv(found.atoms0.double().reshape(found.atoms0.shape[0], -1))
        expected = weight.double() + 0.7 * (alpha @ delta.delta_atoms.double().reshape(-1, 9)).reshape(weight.shape)
        assert delta.add_in_place(weight, 0.7)
    torch.testing.assert_close(weight.double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_runs_one_convolution():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C1"))
    layer = unet.conv_in
    with torch.no_grad():
        layer.deltas["default"].delta_atoms.normal_()
    calls = []
    original = torch.nn.functional.conv2d

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.nn.functional.conv2d = counting
    try:
        layer(torch.randn(1, 4, 8, 8))
    finally:
        torch.nn.functional.conv2d = original
    assert len(calls) == 1


def test_alpha_is_not_saved_in_state_dicts():
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C2"))
    assert not any(k.endswith(".alpha") for k in unet.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda: FilterAtomConfig.preset("C9"),
        lambda: FilterAtomConfig(m=0),
        lambda: FilterAtomConfig(m=-3),
        lambda: FilterAtomConfig(strategy="everything"),
        lambda: FilterAtomConfig(solver="magic"),
        lambda: FilterAtomConfig.from_dict({"preset": "C1", "colour": "red"}),
        lambda: add_filter_atoms(make_unet(), FilterAtomConfig(kc=7)),
    ],
)
def test_bad_configuration_is_one_clear_sentence(make):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_atom_delta_rejects_unknown_layouts():
    with pytest.raises(ConfigError):
        AtomDelta(torch.zeros(2, 2, 3), torch.zeros(3, 3, 3), layout="diagonal")
