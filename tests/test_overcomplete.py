"""C3's overcomplete atoms: the residual form starts at the base, its m1 copies separate, and it reaches
per-input-channel atom changes that C2 (one change per atom) and the paper's copies start cannot."""

import pytest
import torch

from filteratom_sd import FilterAtomConfig
from filteratom_sd.errors import ConfigError
from filteratom_sd.filter_atoms.delta import AtomDelta
from filteratom_sd.filter_atoms.method import FilterAtomMethod
from filteratom_sd.filter_atoms.overcomplete import copies_atom_change, initial_beta, overcomplete_update, residual_atom_change

C_OUT, C_IN, M, M1, STEPS = 6, 5, 9, 3, 8


def test_residual_update_matches_building_the_atoms_explicitly():
    torch.manual_seed(0)
    alpha, atoms0 = torch.randn(C_OUT, C_IN, M), torch.randn(M, 3, 3)
    beta, atoms1 = torch.randn(C_IN, M, M1), torch.randn(M, M1, 3, 3)
    per_channel = atoms0.unsqueeze(0) + torch.einsum("imj,mjpq->impq", beta, atoms1)  # D_il = D0_l + sum_j b D1
    expected = torch.einsum("oim,impq->oipq", alpha, per_channel) - torch.einsum("oim,mpq->oipq", alpha, atoms0)
    torch.testing.assert_close(overcomplete_update(alpha, atoms0, beta, atoms1), expected)
    torch.testing.assert_close(residual_atom_change(beta, atoms1).shape, torch.Size([C_IN, M, 3, 3]))


def test_both_forms_start_with_no_change_and_beta_is_seeded():
    atoms0 = torch.randn(M, 3, 3)
    beta = initial_beta(C_IN, M, M1)
    torch.testing.assert_close(beta, initial_beta(C_IN, M, M1), atol=0, rtol=0)
    assert beta.std() == pytest.approx(1 / M1, rel=0.3)
    zeros = torch.zeros(M, M1, 3, 3)
    assert residual_atom_change(beta, zeros).abs().max() == 0
    assert copies_atom_change(atoms0, torch.zeros(C_IN, M, M1), zeros).abs().max() == 0


def _fit(init: str | None) -> AtomDelta:
    """A few Adam steps pulling one conv layer's dW towards a random target (m1=None: C2's single dD)."""
    torch.manual_seed(0)
    weight = torch.randn(C_OUT, C_IN, 3, 3)
    delta = AtomDelta(None, torch.linalg.qr(torch.randn(9, 9))[0].reshape(M, 3, 3), "conv", coefficient_shape=(C_OUT, C_IN),
                      m1=None if init is None else M1, overcomplete_init=init or "residual")
    target = torch.randn(C_OUT, C_IN, 3, 3)
    optimizer = torch.optim.Adam(delta.parameters(), lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        (delta.delta_weight(weight) - target).pow(2).sum().backward()
        optimizer.step()
    return delta


def _spread_across_copies(delta: AtomDelta) -> float:
    return float(delta.delta_atoms1.detach().std(dim=1).max())


def test_residual_copies_separate_and_the_papers_copies_never_do():
    residual, copies = _fit("residual"), _fit("copies")
    assert _spread_across_copies(residual) > 1e-3
    assert float(residual.delta_beta.detach().std(dim=2).max()) > 1e-3
    assert _spread_across_copies(copies) == 0.0
    assert float(copies.delta_beta.detach().std(dim=2).max()) == 0.0


def _rank_per_atom(change: torch.Tensor) -> int:
    """The largest rank, over atoms l, of the (c_in x k^2) matrix of atom changes D_il - D0_l."""
    ranks = []
    for l in range(change.shape[1]):
        values = torch.linalg.svdvals(change[:, l].reshape(change.shape[0], -1).double())
        ranks.append(int((values > 1e-6 * values[0]).sum()))
    return max(ranks)


def test_c3_reaches_atom_changes_that_c2_cannot():
    """C2 changes each atom once for every input channel (rank 1); the copies start spans D0 and one
    shared change (rank <= 2); the residual form uses its m1 separated copies (rank m1)."""
    c2 = _fit(None)
    c2_change = c2.delta_atoms.detach().unsqueeze(0).expand(C_IN, -1, -1, -1)
    assert _rank_per_atom(c2_change) == 1
    assert _rank_per_atom(_fit("copies").atom_change().detach()) <= 2
    assert _rank_per_atom(_fit("residual").atom_change().detach()) == M1


def test_overcomplete_init_is_checked_and_old_saved_configs_keep_the_copies_form():
    with pytest.raises(ConfigError, match="overcomplete_init"):
        FilterAtomConfig.preset("C3", overcomplete_init="zeros")
    assert FilterAtomConfig.preset("C3").overcomplete_init == "residual"
    saved = FilterAtomConfig.preset("C3").to_dict()
    assert FilterAtomMethod.from_config_dict(saved).config.overcomplete_init == "residual"
    saved.pop("overcomplete_init")
    assert FilterAtomMethod.from_config_dict(saved).config.overcomplete_init == "copies"
