"""Training weights built per group of same-shaped layers (`filter_atoms.grouped`): the bits of the per-layer build,
with the group actually used, across scales, a second adapter, gradient accumulation, a change of path and autocast."""

import pytest
import torch

from filteratom_sd import FilterAtomConfig, add_adapter, add_filter_atoms, set_adapter_scale
from filteratom_sd.core.layer import AdaptedLayer
from filteratom_sd.filter_atoms.grouped import set_grouped_builds, weight_groups
from filteratom_sd.filter_atoms.method import FilterAtomMethod

from .tiny_unet import make_inputs, make_unet

C2 = FilterAtomConfig.preset("C2")


def twin_unets(seed=3):
    """Two equal adapted UNets in training mode: the first builds per group, the second per layer."""
    pair = []
    for _ in range(2):
        unet = make_unet()
        add_filter_atoms(unet, C2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        pair.append(unet.train())
    assert set_grouped_builds(pair[1], False) == 0 and not weight_groups(pair[1])
    return pair


def loss_of(unet, inputs):
    return unet(*inputs).sample.pow(2).mean()


def assert_same_bits(grouped, per_layer):
    got = {n: p.grad for n, p in grouped.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in per_layer.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(g is not None for g in want.values())
    for name in want:
        assert torch.equal(got[name], want[name]), name


def train_both(pair, inputs, steps):
    optimizers = [torch.optim.AdamW([p for p in u.parameters() if p.requires_grad], lr=1e-2) for u in pair]
    for _ in range(steps):
        for unet, optimizer in zip(pair, optimizers):
            optimizer.zero_grad(set_to_none=True)
            loss_of(unet, inputs).backward()
        assert_same_bits(*pair)
        for optimizer in optimizers:
            optimizer.step()


def test_group_builds_are_the_per_layer_bits_and_are_used():
    grouped, per_layer = twin_unets()
    groups = weight_groups(grouped)
    members = sum(len(g.deltas) for g in groups)
    adapted = [m for m in grouped.modules() if isinstance(m, AdaptedLayer)]
    assert len(groups) >= 4 and members > len(adapted) // 2
    train_both((grouped, per_layer), make_inputs(), steps=3)
    # the first pass builds each layer alone (no layer has asked yet), every later pass once per group
    assert sum(g.builds for g in groups) == members + 2 * len(groups)
    with torch.no_grad():
        torch.testing.assert_close(grouped(*make_inputs(2)).sample, per_layer(*make_inputs(2)).sample, rtol=0, atol=0)


def test_scales_and_a_second_adapter_keep_the_bits():
    pair = twin_unets()
    groups = weight_groups(pair[0])
    for unet in pair:
        set_adapter_scale(unet, 0.5)
    train_both(pair, make_inputs(), steps=2)
    for unet in pair:  # a frozen second update on every layer
        add_adapter(unet, FilterAtomMethod(FilterAtomConfig.preset("C1")), "second")
        for name, p in unet.named_parameters():
            p.requires_grad_(".default." in name)
    set_grouped_builds(pair[1], False)
    builds = sum(g.builds for g in groups)
    train_both(pair, make_inputs(), steps=2)  # two active adapters on every layer: each builds per layer
    assert sum(g.builds for g in groups) == builds
    for unet in pair:
        set_adapter_scale(unet, 0.0, "second")
    train_both(pair, make_inputs(), steps=2)  # one active adapter again: the groups build
    assert sum(g.builds for g in groups) > builds


def test_two_passes_before_one_backward_accumulate_the_same_gradients():
    pair = twin_unets()
    inputs, other = make_inputs(1), make_inputs(2)
    for step in range(2):
        for unet in pair:
            unet.zero_grad(set_to_none=True)
            (loss_of(unet, inputs) + 0.5 * loss_of(unet, other)).backward()
        assert_same_bits(*pair)


def test_a_weight_built_for_a_layer_that_took_another_path_is_not_reused_after_backward():
    pair = twin_unets()
    inputs = make_inputs()
    layer_name = next(n for n, m in pair[0].named_modules()
                      if isinstance(m, AdaptedLayer) and m.deltas["default"].__dict__["_group_slot"] is not None)
    for path in ("weight", "activations", "weight"):  # the middle pass leaves that layer's built weight untaken
        for unet in pair:
            unet.get_submodule(layer_name).train_path = path
            unet.zero_grad(set_to_none=True)
            loss_of(unet, inputs).backward()
        assert_same_bits(*pair)


def test_autocast_keeps_the_bits():
    pair = twin_unets()
    for _ in range(2):
        for unet in pair:
            unet.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = unet(*make_inputs()).sample
            out.float().pow(2).mean().backward()
        assert_same_bits(*pair)


@pytest.mark.parametrize("recompute", [True, False])
def test_layers_that_rebuild_in_the_backward_or_run_without_gradients_leave_the_group_alone(recompute):
    grouped, _ = twin_unets()
    groups = weight_groups(grouped)
    for layer in grouped.modules():
        if isinstance(layer, AdaptedLayer):
            layer.recompute_weights = recompute
    with torch.set_grad_enabled(recompute):
        loss_of(grouped, make_inputs())
    assert sum(g.builds for g in groups) == 0
