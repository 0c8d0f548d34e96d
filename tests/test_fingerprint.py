"""Weight signatures against a reference computed element by element, in float64."""

from __future__ import annotations

import pytest
import torch

from filteratom_sd.core import fingerprint as fp


def reference_signature(weight: torch.Tensor) -> list[float]:
    flat = weight.reshape(-1).double()
    index = torch.arange(flat.numel(), dtype=torch.int64)

    def signs(idx: torch.Tensor, multiplier: int) -> torch.Tensor:
        return (((idx * multiplier) % 2**32) >> 31).double() * 2 - 1

    out = [float(flat.norm())]
    for column_m, row_m in zip(fp._MULTIPLIERS, fp._ROW_MULTIPLIERS):
        pattern = signs(index % fp._ROW, column_m) * signs(index // fp._ROW, row_m)
        out.append(float(flat @ pattern))
    return out


@pytest.mark.parametrize("shape", [(7,), (fp._ROW,), (320, 320, 3, 3), (5, 1000)])
def test_signature_matches_the_elementwise_reference(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got, want = fp.weight_signature(weight), reference_signature(weight)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4 * want[0])


def test_half_precision_matches_and_other_weights_do_not():
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    unet = torch.nn.Module()
    unet.conv = torch.nn.Conv2d(32, 64, 3)
    unet.conv.weight.data = weight.clone()
    reference = fp.fingerprint(unet, ["conv"])
    unet.conv.to(torch.bfloat16)
    assert fp.mismatched_layers(reference, fp.fingerprint(unet, ["conv"])) == []
    unet.conv.float()
    unet.conv.weight.data = weight + 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    assert fp.mismatched_layers(reference, fp.fingerprint(unet, ["conv"])) == ["conv"]


def test_fingerprint_reuses_a_signature_until_the_weight_changes(monkeypatch):
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    calls = []
    monkeypatch.setattr(fp, "weight_signature", lambda w: calls.append(1) or reference_signature(w))
    first = fp.fingerprint(model, ["0", "1"])
    assert len(calls) == 2
    assert fp.fingerprint(model, ["0", "1"]) == first and len(calls) == 2  # both reused
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: the version counter moves
    edited = fp.fingerprint(model, ["0", "1"])
    assert len(calls) == 3 and edited["layers"]["0"][0] == pytest.approx(2 * first["layers"]["0"][0])
    model[1].weight.data = torch.zeros(4, 8)  # new storage under the same parameter
    assert fp.fingerprint(model, ["0", "1"])["layers"]["1"][0] == 0.0 and len(calls) == 4
