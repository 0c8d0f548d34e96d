"""The training paths through the activations: which layers take them, and exactness on single layers
with several adapters, scales, strides and 1x1 convs (against plain autograd through W_eff)."""

import pytest
import torch
from torch import nn

from filteratom_sd.core.fast_paths import block_linear, tap_conv, activation_op
from filteratom_sd.core.layer import AdaptedLayer
from filteratom_sd.filter_atoms.decomposition import decompose_layer
from filteratom_sd.filter_atoms.config import FilterAtomConfig
from filteratom_sd.filter_atoms.delta import AtomDelta

C2 = FilterAtomConfig.preset("C2")


def atom_delta(weight, layout, seed, m1=None, train_alpha=False):
    """An AtomDelta of `weight` as the method builds it, with random trained tensors."""
    found = decompose_layer(weight, layout, C2)
    derived = layout == "conv" and not train_alpha
    delta = AtomDelta(None if derived else found.alpha, found.atoms0, layout, m1=m1, train_alpha=train_alpha,
                      coefficient_shape=tuple(weight.shape[:2]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return delta


def adapted(base, layout, seeds, scales, m1s=None):
    layer = AdaptedLayer(base.requires_grad_(False))
    layer.recompute_weights = True
    for i, (seed, scale) in enumerate(zip(seeds, scales)):
        layer.add_delta(f"a{i}", atom_delta(base.weight, layout, seed, m1=(m1s or [None] * len(seeds))[i]), scale)
    layer.train()
    return layer


def run_path(layer, x, path):
    layer.train_path = path
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    strided = torch.cat([x, x], -1)[..., : x.shape[-1]]  # rows that are not contiguous, as slices and chunks make them
    out = layer(strided)
    torch.cat([out, 2 * out], -1).pow(2).sum().backward()  # so is the incoming gradient
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}


def assert_paths_agree(layer, x, expected_op):
    layer.train_path = "activations"
    assert activation_op(layer, x, layer._active()) is expected_op
    out, x_grad, grads = run_path(layer, x, "activations")
    layer.recompute_weights = False  # the reference: plain autograd through the built W_eff
    ref_out, ref_x_grad, ref_grads = run_path(layer, x, "weight")
    # float32 sums in another order: tolerances relative to each tensor's largest entry
    torch.testing.assert_close(out, ref_out, atol=1e-5 * ref_out.abs().max(), rtol=1e-5)
    torch.testing.assert_close(x_grad, ref_x_grad, atol=1e-5 * ref_x_grad.abs().max(), rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) >= 2
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5 * ref_grads[name].abs().max(), rtol=1e-4)


def test_linear_with_two_adapters_and_scales():
    torch.manual_seed(0)
    layer = adapted(nn.Linear(32, 48), "blocks", seeds=[1, 2], scales=[0.7, -1.3])
    assert_paths_agree(layer, torch.randn(2, 5, 32), block_linear)


def test_pointwise_conv_with_two_adapters():
    torch.manual_seed(0)
    layer = adapted(nn.Conv2d(32, 16, 1), "blocks", seeds=[1, 2], scales=[1.0, 0.5])
    assert_paths_agree(layer, torch.randn(2, 32, 3, 5), block_linear)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_strided_and_dilated_conv_with_shared_and_per_channel_taps(stride, padding, dilation):
    torch.manual_seed(0)
    base = nn.Conv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation)
    layer = adapted(base, "conv", seeds=[1, 2], scales=[1.0, -0.4], m1s=[None, 3])
    assert_paths_agree(layer, torch.randn(2, 6, 7, 9), tap_conv)


def test_auto_takes_the_activations_only_where_they_cost_less():
    torch.manual_seed(0)
    linear = adapted(nn.Linear(512, 512), "blocks", seeds=[1], scales=[1.0])  # 2^18 entries: the smallest taken
    conv = adapted(nn.Conv2d(176, 176, 3, padding=1), "conv", seeds=[1], scales=[1.0])
    small = adapted(nn.Linear(64, 64), "blocks", seeds=[1], scales=[1.0])
    names = ["a0"]
    # C2 (m = 9, kc = 16): 2 (n m / kc + n m kc / c_out) <= n + 16 + 2 m holds up to n = 49 rows at c_out = 512,
    # 128 at 2048 (wide layers pay for more rows), 27 at 256
    assert activation_op(linear, torch.randn(49, 512), names) is block_linear
    assert activation_op(linear, torch.randn(50, 512), names) is None
    wide = adapted(nn.Linear(512, 2048), "blocks", seeds=[1], scales=[1.0])
    narrow = adapted(nn.Linear(1024, 256), "blocks", seeds=[1], scales=[1.0])
    assert activation_op(wide, torch.randn(128, 512), names) is block_linear
    assert activation_op(wide, torch.randn(129, 512), names) is None
    assert activation_op(narrow, torch.randn(27, 1024), names) is block_linear
    assert activation_op(narrow, torch.randn(28, 1024), names) is None
    # k x k conv: the im2col columns (9x the input) no larger than the weight
    assert activation_op(conv, torch.randn(1, 176, 13, 13), names) is tap_conv
    assert activation_op(conv, torch.randn(1, 176, 14, 14), names) is None
    assert activation_op(small, torch.randn(1, 64), names) is None  # too small to pay for the extra kernels
    linear.train_path = conv.train_path = small.train_path = "activations"
    assert activation_op(linear, torch.randn(50, 512), names) is block_linear
    assert activation_op(conv, torch.randn(1, 176, 14, 14), names) is tap_conv
    assert activation_op(small, torch.randn(1, 64), names) is block_linear
    linear.train_path = conv.train_path = "weight"
    assert activation_op(linear, torch.randn(2, 512), names) is None
    assert activation_op(conv, torch.randn(1, 176, 2, 2), names) is None


def test_updates_of_other_forms_keep_the_weight_path():
    torch.manual_seed(0)
    base = nn.Linear(32, 32).requires_grad_(False)
    layer = AdaptedLayer(base)
    layer.add_delta("c4", atom_delta(base.weight, "blocks", 1, train_alpha=True))  # trainable alpha: no Kronecker form
    layer.train_path = "activations"
    assert activation_op(layer, torch.randn(2, 32), ["c4"]) is None
    grouped = AdaptedLayer(nn.Conv2d(8, 8, 3, padding=1, groups=2).requires_grad_(False))
    grouped.add_delta("a", atom_delta(grouped.base_layer.weight, "conv", 1))
    grouped.train_path = "activations"
    assert activation_op(grouped, torch.randn(1, 8, 2, 2), ["a"]) is None


@pytest.mark.parametrize("case", ["linear", "pointwise", "conv"])
def test_sampling_on_the_cpu_goes_through_the_activations_and_matches_the_cached_weight(case, monkeypatch):
    torch.manual_seed(0)
    base, layout, x = {
        "linear": (nn.Linear(32, 48), "blocks", torch.randn(2, 5, 32)),
        "pointwise": (nn.Conv2d(32, 16, 1), "blocks", torch.randn(2, 32, 3, 5)),
        "conv": (nn.Conv2d(6, 8, 3, stride=2, padding=1), "conv", torch.randn(2, 6, 7, 9)),
    }[case]
    layer = adapted(base, layout, seeds=[1, 2], scales=[0.7, -1.3]).eval()
    builds = []
    build = AdaptedLayer.effective_weight_and_bias
    monkeypatch.setattr(AdaptedLayer, "effective_weight_and_bias", lambda self, *a: builds.append(1) or build(self, *a))
    with torch.no_grad():
        layer.train_path = "weight"
        cached = layer(x)
        assert layer._cached is not None
        assert len(builds) == 1
        layer.train_path = "activations"
        through = layer(x)
        assert len(builds) == 1  # no W_eff built ...
        assert layer._cached is None  # ... and the cached one dropped: nothing weight-sized stays resident
    torch.testing.assert_close(through, cached, atol=1e-5 * cached.abs().max(), rtol=1e-5)


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_weights_built_without_gradients_in_chunks_match_the_autograd_build(case, monkeypatch):
    from filteratom_sd.filter_atoms import delta as delta_module

    monkeypatch.setattr(delta_module, "_CHUNK_ELEMENTS", 100)  # many chunks, one of them short
    torch.manual_seed(0)
    base, layout = (nn.Linear(48, 80), "blocks") if case == "linear" else (nn.Conv2d(6, 11, 3), "conv")
    layer = adapted(base, layout, seeds=[1, 2], scales=[0.7, -1.3])
    with torch.no_grad():
        chunked, _ = layer.effective_weight_and_bias()
    whole, _ = layer.effective_weight_and_bias()  # trainable atoms: one autograd expression, no chunks
    assert whole.requires_grad and not chunked.requires_grad
    # a GEMM's rounding depends on its shape on some CPUs (AMD EPYC: 1 ulp); a lost or repeated chunk is off by O(W)
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5 * whole.abs().max().item(), rtol=0)
    layer.merge()  # builds without gradients: the chunked weight, bit for bit
    torch.testing.assert_close(layer.base_layer.weight, chunked, atol=0, rtol=0)
