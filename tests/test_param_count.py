import pytest
from torch import nn

from filteratom_sd import FilterAtomConfig, add_filter_atoms
from filteratom_sd.filter_atoms.param_count import (
    filter_atom_parameters,
    lora_parameters,
    loralib_lora_parameters,
    lycoris_loha_parameters,
)
from filteratom_sd.models import build_unet
from filteratom_sd.resources import shipped_config

from .tiny_unet import make_unet


@pytest.mark.parametrize("preset", ["C1", "C2", "C3", "C4"])
def test_shape_formula_matches_what_injection_trains(preset):
    config = FilterAtomConfig.preset(preset)
    assert filter_atom_parameters(make_unet(), config) == add_filter_atoms(make_unet(), config)


def test_lora_formula_on_a_linear_and_a_conv():
    unet = make_unet()
    # conv_in: 4 -> 32, 3x3; attn1.to_q: 32 -> 32
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert lora_parameters(unet, ["conv_in"], 4) == 4 * (32 + 4 * 9)
    assert lora_parameters(unet, [q], 4) == 4 * (32 + 32)


def test_sd_v1_4_counts_on_the_meta_device():
    unet = build_unet(shipped_config("model", "sd-v1-4-unet"), device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    c1 = filter_atom_parameters(unet, FilterAtomConfig.preset("C1"))
    c2 = filter_atom_parameters(unet, FilterAtomConfig.preset("C2"))
    c3 = filter_atom_parameters(unet, FilterAtomConfig.preset("C3"))
    assert c1 < c2 < c3 < 2.5e6
    assert c1 < 0.05e6


def test_the_papers_lora_and_loha_counts_come_from_loralib_and_lycoris_formulas():
    unet = build_unet(shipped_config("model", "sd-v1-4-unet"), device="meta")
    # Table 2: LoRA r=1 / 4 / 16 = 1.42 / 5.67 / 22.67 M, LoHa r=4 = 8.47 M
    assert [loralib_lora_parameters(unet, r) for r in (1, 4, 16)] == [1_416_896, 5_667_584, 22_670_336]
    assert lycoris_loha_parameters(unet, 4) == 8_465_728


def test_loralib_formula_counts_block_layers_only_and_time_emb_proj_too():
    unet = make_unet()
    blocks = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    assert any(n.endswith("time_emb_proj") for n, _ in blocks)
    expected = sum(2 * (m.weight[0].numel() + m.weight.shape[0] * (m.weight[0, 0].numel() if m.weight.dim() == 4 else 1))
                   for _, m in blocks)
    assert loralib_lora_parameters(unet, 2) == expected
