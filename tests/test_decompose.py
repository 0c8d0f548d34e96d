import pytest
import torch

from filteratom_sd.filter_atoms.functional import (
    block_size,
    compose_blocks,
    compose_conv,
    decompose_conv,
    decompose_linear,
    linear_to_blocks,
    solve_coefficients,
)
from filteratom_sd.errors import DecompositionError


def optimal_error(rows: torch.Tensor, m: int) -> float:
    """Eckart-Young: the best rank-m error, from the singular values (computed independently)."""
    s = torch.linalg.svdvals(rows.double())
    return float(s[m:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


@pytest.mark.parametrize("k", [3, 5])
def test_conv_is_exact_with_a_complete_set_of_atoms(k):
    weight = torch.randn(12, 7, k, k)
    alpha, atoms = decompose_conv(weight, m=k * k)
    assert alpha.shape == (12, 7, k * k) and atoms.shape == (k * k, k, k)
    torch.testing.assert_close(compose_conv(alpha, atoms).float(), weight, atol=1e-5, rtol=1e-5)
    assert decompose_conv(weight, m=k * k).relative_error < 1e-10


@pytest.mark.parametrize("m", [1, 4, 6, 8])
def test_svd_conv_error_is_the_optimal_one(m):
    weight = torch.randn(10, 9, 3, 3)
    found = decompose_conv(weight, m)
    expected = optimal_error(weight.reshape(-1, 9), m)
    assert found.relative_error == pytest.approx(expected, rel=1e-6)
    # the reported error is the real one
    direct = (compose_conv(*found) - weight.double()).norm() / weight.double().norm()
    assert float(direct) == pytest.approx(found.relative_error, rel=1e-9)


def test_lasso_is_sparser_than_svd_and_close_to_optimal():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    lasso = decompose_conv(weight, 6, solver="lasso", lam=0.2)
    svd = decompose_conv(weight, 6)
    assert (lasso.alpha.abs() < 1e-9).float().mean() > (svd.alpha.abs() < 1e-9).float().mean() + 0.05
    assert lasso.relative_error < svd.relative_error + 0.25
    torch.testing.assert_close(lasso.atoms.reshape(6, -1).norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_linear_blocks_round_trip_and_exactness():
    weight = torch.randn(32, 48)
    blocks = linear_to_blocks(weight, 4, 8)
    assert blocks.shape == (8, 6, 4, 8)
    # block (a, b) is W[a*4:(a+1)*4, b*8:(b+1)*8]
    torch.testing.assert_close(blocks[2, 3], weight[8:12, 24:32])
    found = decompose_linear(weight, m=32, kc=8, kc_out=4)
    assert found.alpha.shape == (8, 6, 32) and found.atoms.shape == (32, 4, 8)
    torch.testing.assert_close(compose_blocks(*found).float(), weight, atol=1e-5, rtol=1e-5)


def test_linear_error_is_optimal_for_its_block_matrix():
    weight = torch.randn(64, 32)
    found = decompose_linear(weight, m=9, kc=4)
    rows = linear_to_blocks(weight, 4, 4).reshape(-1, 16)
    assert found.relative_error == pytest.approx(optimal_error(rows, 9), rel=1e-6)


def test_one_by_one_conv_uses_the_linear_path():
    weight = torch.randn(16, 8, 1, 1)
    found = decompose_linear(weight, m=4, kc=4)
    same = decompose_linear(weight.reshape(16, 8), m=4, kc=4)
    torch.testing.assert_close(found.alpha, same.alpha)


def test_channels_kc_does_not_divide_fall_back_to_smaller_blocks():
    assert block_size(40, 16) == 10
    assert block_size(7, 4) == 1
    assert block_size(64, 16) == 16
    weight = torch.randn(40, 24)
    found = decompose_linear(weight, m=4, kc=16)
    assert found.atoms.shape == (4, 10, 12)  # largest divisors of 40 and 24 not above 16
    assert found.relative_error == pytest.approx(optimal_error(linear_to_blocks(weight, 10, 12).reshape(-1, 120), 4), rel=1e-6)


def test_coefficients_over_fixed_atoms_match_the_decomposition():
    weight = torch.randn(8, 8, 3, 3)
    found = decompose_conv(weight, 5)
    again = solve_coefficients(weight.reshape(-1, 9), found.atoms.reshape(5, 9))
    torch.testing.assert_close(again.reshape(8, 8, 5), found.alpha)


def test_decomposition_stays_on_the_weights_device_and_is_deterministic():
    weight = torch.randn(6, 6, 3, 3)
    a1, d1 = decompose_conv(weight, 4)
    a2, d2 = decompose_conv(weight.clone(), 4)
    assert torch.equal(d1, d2) and torch.equal(a1, a2)
    assert d1.device == weight.device


@pytest.mark.parametrize(
    "call",
    [
        lambda: decompose_conv(torch.randn(4, 4, 3, 3), 0),
        lambda: decompose_conv(torch.randn(4, 4, 3, 3), -2),
        lambda: decompose_conv(torch.randn(4, 4, 3, 3), 4, solver="magic"),
        lambda: decompose_conv(torch.randn(4, 4), 4),
        lambda: decompose_linear(torch.randn(4, 4), 4, kc=0),
        lambda: decompose_linear(torch.randn(4, 4, 3, 3), 4, kc=2),
    ],
)
def test_bad_arguments_raise_one_typed_error(call):
    with pytest.raises(DecompositionError) as info:
        call()
    assert str(info.value).count(".") >= 1 and "\n" not in str(info.value)
