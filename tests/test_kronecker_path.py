"""The Kronecker-form update through the activations is exact: against dW built densely, and against
plain autograd through W_eff on a tiny UNet (outputs, every gradient, the input's gradient)."""

import pytest
import torch

from filteratom_sd import FilterAtomConfig, add_filter_atoms
from filteratom_sd.core.kronecker_path import as_rows, coefficient_rows, from_rows, kronecker_update
from filteratom_sd.core.layer import AdaptedLayer

from .tiny_unet import make_inputs, make_unet


def dense_update(alpha, factors):
    """dW[(i, p), (j, q)] = sum_m alpha[i, j, m] B[m, p, q], element by element in float64."""
    a, b, m = alpha.shape
    _, p, q = factors.shape
    weight = torch.zeros(a * p, b * q, dtype=torch.float64)
    for i in range(a):
        for j in range(b):
            block = sum(alpha[i, j, k].double() * factors[k].double() for k in range(m))
            weight[i * p:(i + 1) * p, j * q:(j + 1) * q] = block
    return weight


@pytest.mark.parametrize("a,b,m,p,q", [(3, 2, 4, 5, 2), (1, 1, 1, 1, 1), (2, 5, 9, 4, 4)])
def test_kronecker_update_equals_x_times_dense_update(a, b, m, p, q):
    gen = torch.Generator().manual_seed(a * 100 + b * 10 + m)
    alpha = torch.randn(a, b, m, generator=gen, dtype=torch.float64)
    factors = torch.randn(m, p, q, generator=gen, dtype=torch.float64)
    x = torch.randn(7, b * q, generator=gen, dtype=torch.float64)
    got = kronecker_update(x, coefficient_rows(alpha), factors)
    torch.testing.assert_close(got, x @ dense_update(alpha, factors).T, atol=1e-12, rtol=1e-12)


def test_rows_round_trip_for_linear_and_1x1_conv_inputs():
    x = torch.randn(2, 6, 3, 4)
    rows = as_rows(x, conv=True)
    assert rows.shape == (24, 6)
    torch.testing.assert_close(rows[5], x[0, :, 1, 1])
    torch.testing.assert_close(from_rows(rows, x, conv=True), x, atol=0, rtol=0)
    tokens = torch.randn(2, 5, 6)
    torch.testing.assert_close(from_rows(as_rows(tokens, conv=False), tokens, conv=False), tokens, atol=0, rtol=0)


def adapted(preset, path):
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset(preset))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    for module in unet.modules():
        if hasattr(module, "deltas"):
            module.conv_path = path
    return unet.train()


def gradients(unet, inputs, autocast_dtype=None):
    sample = inputs[0].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = unet(sample, *inputs[1:]).sample
    out.float().pow(2).mean().backward()
    return out.detach().float(), {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}, sample.grad


@pytest.mark.parametrize("path", ["taps", "auto"])
@pytest.mark.parametrize("preset", ["C1", "C2", "C3", "C4"])
def test_kronecker_path_matches_plain_autograd(preset, path):
    inputs = make_inputs()
    out, grads, input_grad = gradients(adapted(preset, path), inputs)
    ref_out, ref_grads, ref_input_grad = gradients(adapted(preset, "weight"), inputs)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(input_grad, ref_input_grad, atol=1e-7, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-4)


def test_kronecker_path_under_autocast():
    inputs = make_inputs()
    out, grads, _ = gradients(adapted("C2", "taps"), inputs, torch.bfloat16)
    ref_out, ref_grads, _ = gradients(adapted("C2", "weight"), inputs, torch.bfloat16)
    torch.testing.assert_close(out, ref_out, atol=0.05, rtol=0.05)
    for name in grads:
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-3, rtol=0.1)


def test_block_layers_build_no_effective_weight_in_training(monkeypatch):
    built = []
    original = AdaptedLayer.effective_weight_and_bias

    def recording(self, *args, **kwargs):
        built.append(self.base_layer.weight.dim())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedLayer, "effective_weight_and_bias", recording)
    inputs = make_inputs()
    for path, linear_builds in (("weight", True), ("taps", False)):
        built.clear()
        adapted("C2", path)(*inputs).sample.mean().backward()
        assert (2 in built) is linear_builds, path
