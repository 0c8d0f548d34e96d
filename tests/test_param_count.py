import pytest

from filteratom_sd import FilterAtomConfig, add_filter_atoms
from filteratom_sd.filter_atoms.param_count import filter_atom_parameters, lora_parameters
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
