"""`fa-sd export`: every format loads in plain diffusers (a separate process, no filteratom_sd) and matches the adapter."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from filteratom_sd.core.adapter_file import save_adapter
from filteratom_sd.tiny.bundled import bundled_model_path
from filteratom_sd.export import export_adapter
from filteratom_sd.export.kohya import kohya_name
from filteratom_sd.export.ldm_keys import UNET_PREFIX, ldm_state_dict
from filteratom_sd.export.low_rank import low_rank_factors
from filteratom_sd.core.inject import add_adapter
from filteratom_sd.methods.registry import method_class
from filteratom_sd.models import build_unet, load_pipeline
from filteratom_sd.resources import shipped_config
from filteratom_sd.core.api import load_adapter, merge_and_unload, unload_adapter

from .test_cli import assert_user_error, run_cli

PLAIN_LOADER = Path(__file__).with_name("plain_diffusers_load.py")


def _make_adapter(folder: Path, method: str, seed: int) -> Path:
    """An adapter of `method` on the bundled model with random tuned tensors (no training needed)."""
    pipe = load_pipeline(None)
    chosen = method_class(method).from_config_dict({})
    add_adapter(pipe.unet, chosen, "default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in chosen.trainable_parameters(pipe.unet, "default"):
            param.copy_(0.03 * torch.randn(param.shape, generator=generator))
    return save_adapter(pipe.unet, folder / f"{method}.safetensors")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def adapters(workdir) -> dict[str, Path]:
    return {"filter-atoms": _make_adapter(workdir, "filter-atoms", 0), "lora": _make_adapter(workdir, "lora", 1)}


@pytest.fixture(scope="module")
def inputs(workdir) -> Path:
    generator = torch.Generator().manual_seed(2)
    path = workdir / "inputs.safetensors"
    save_file({"latents": torch.randn(2, 4, 16, 16, generator=generator), "timesteps": torch.tensor([10, 700]),
               "text": torch.randn(2, 8, 64, generator=generator)}, str(path))
    return path


def _unet_output(pipe, inputs: Path) -> torch.Tensor:
    tensors = load_file(str(inputs))
    with torch.no_grad():
        return pipe.unet(tensors["latents"], tensors["timesteps"], tensors["text"]).sample


@pytest.fixture(scope="module")
def reference(adapters, inputs) -> dict[str, torch.Tensor]:
    """The base UNet's output and weights, and each adapter's output loaded (unfused) through our API."""
    pipe = load_pipeline(None)
    out = {"base": _unet_output(pipe, inputs), "base_weights": {k: v.clone() for k, v in pipe.unet.state_dict().items()}}
    for method, path in adapters.items():
        load_adapter(pipe, path, adapter_name="ref")
        out[method] = _unet_output(pipe, inputs)
        unload_adapter(pipe, "ref")
    return out


def _plain_diffusers(fmt: str, export: Path, inputs: Path, workdir: Path) -> dict[str, torch.Tensor]:
    """What diffusers alone, in a fresh process, makes of an exported file."""
    out = workdir / f"plain-{export.name}.safetensors"
    done = subprocess.run([sys.executable, str(PLAIN_LOADER), fmt, str(export), str(bundled_model_path()), str(inputs),
                           str(out)], capture_output=True, text=True, cwd=workdir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = load_file(str(out))
    assert result.pop("filteratom_sd_imported").item() == 0
    return result


@pytest.mark.parametrize("fmt, tolerance", [("diffusers", 1e-5), ("single-file", 1e-5), ("lycoris-full", 2e-3)])
def test_exact_formats_match_the_adapted_pipeline_in_plain_diffusers(fmt, tolerance, adapters, inputs, reference,
                                                                     workdir):
    out = workdir / ("castle-diffusers" if fmt == "diffusers" else f"castle-{fmt}.safetensors")
    export_adapter(adapters["filter-atoms"], fmt, out)
    plain = _plain_diffusers(fmt, out, inputs, workdir)
    effect = (reference["filter-atoms"] - reference["base"]).abs().max()
    assert effect > 0.1, "the test adapter should change the output clearly"
    # fp32 formats agree to rounding; the fp16 diffs to fp16's precision of the (small) difference
    assert (plain["output"] - reference["filter-atoms"]).abs().max() <= tolerance * effect


@pytest.mark.parametrize("method, options", [("filter-atoms", {"max_error": 0.2}), ("filter-atoms", {"rank": 4}),
                                             ("lora", {})], ids=["max-error", "rank", "own-factors"])
def test_lora_loads_in_diffusers_and_keeps_its_printed_error(method, options, adapters, inputs, reference, workdir):
    out = workdir / f"castle-lora-{method}-{'-'.join(map(str, options.values()))}.safetensors"
    result = export_adapter(adapters[method], "lora", out, **options)
    plain = _plain_diffusers("lora", out, inputs, workdir)
    base = reference["base_weights"]
    adapted = load_pipeline(None)
    load_adapter(adapted, adapters[method])
    merge_and_unload(adapted)
    fused = adapted.unet.state_dict()
    lost = total = 0.0
    for layer in result.lora.layers:
        key = f"{layer.name}.weight"
        exact, loaded = fused[key] - base[key], plain[f"unet.{key}"] - base[key]
        error = ((loaded - exact).norm() / exact.norm()).item()
        assert error <= layer.error + 1e-3, f"{layer.name}: diffusers applies {error:.4f}, the report says {layer.error:.4f}"
        if "rank" in options:
            assert layer.rank <= options["rank"]
        lost, total = lost + ((loaded - exact).norm() ** 2).item(), total + (exact.norm() ** 2).item()
    assert len(result.lora.layers) == len([k for k in fused if not torch.equal(fused[k], base[k])])
    assert math.sqrt(lost / total) <= result.lora.overall_error + 1e-3
    if "max_error" in options:
        assert all(layer.error <= options["max_error"] for layer in result.lora.layers)
    if method == "lora":  # its own factors: exact up to fp16 storage
        assert result.lora.overall_error < 2e-3
        effect = (reference["lora"] - reference["base"]).abs().max()
        assert (plain["output"] - reference["lora"]).abs().max() <= 5e-3 * effect


def test_low_rank_factors_meet_a_known_spectrum():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(18, 8, dtype=torch.float64, generator=generator))
    values = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    delta = ((u * values) @ v.T).reshape(8, 2, 3, 3)
    tail = lambda r: math.sqrt((values[r:] ** 2).sum() / (values ** 2).sum())  # noqa: E731
    factors = low_rank_factors(delta, max_error=tail(3) + 1e-9, dtype=torch.float64)
    assert factors.rank == 3 and factors.error == pytest.approx(tail(3))
    assert factors.down.shape == (3, 2, 3, 3) and factors.up.shape == (8, 3, 1, 1)
    assert low_rank_factors(delta, rank=2, dtype=torch.float64).error == pytest.approx(tail(2))
    whole = low_rank_factors(delta, rank=100, dtype=torch.float64)
    assert whole.rank == 8 and torch.allclose(whole.up.reshape(8, 8) @ whole.down.reshape(8, 18), delta.reshape(8, 18))


@pytest.fixture(scope="module")
def sd14_unet() -> UNet2DConditionModel:
    return build_unet(shipped_config("model", "sd-v1-4-unet"), device="meta")


def test_kohya_names_of_the_sd14_unet_are_what_diffusers_and_kohya_files_use(sd14_unet):
    layers = {n for n, m in sd14_unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    names = {kohya_name(n): n for n in layers}
    # names found in kohya sd-scripts LoRA / LoCon files for SD 1.x
    for known in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                  "lora_unet_mid_block_attentions_0_proj_in",
                  "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
                  "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
                  "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                  "lora_unet_down_blocks_2_resnets_1_time_emb_proj", "lora_unet_down_blocks_0_downsamplers_0_conv",
                  "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_conv_in", "lora_unet_conv_out"):
        assert known in names
    # diffusers' own conversion maps every name back to its layer
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.empty(1, 1, device="meta")
        state[f"{name}.lora_up.weight"] = torch.empty(1, 1, device="meta")
        state[f"{name}.alpha"] = torch.tensor(1.0)
    converted, _ = StableDiffusionPipeline.lora_state_dict(state)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")} == layers


def test_single_file_keys_of_the_sd14_unet_are_the_original_checkpoint_names(sd14_unet):
    unet_state = sd14_unet.state_dict()
    state = ldm_state_dict((unet_state, sd14_unet.config), ({}, {}), {})
    for known in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.3.0.op.weight",
                  "input_blocks.4.0.skip_connection.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                  "middle_block.1.proj_in.weight", "middle_block.2.in_layers.2.weight",
                  "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.11.0.skip_connection.weight",
                  "output_blocks.11.1.proj_out.weight", "out.0.weight", "out.2.weight"):
        assert UNET_PREFIX + known in state
    # diffusers' reader gives back every key, each with its own tensor
    back = convert_ldm_unet_checkpoint(state, sd14_unet.config)
    assert set(back) == set(unet_state) and all(back[k] is unet_state[k] for k in back)


def test_merge_and_unload_leaves_plain_layers_that_save_standard_keys(adapters, tmp_path):
    pipe = load_pipeline(None)
    load_adapter(pipe, adapters["filter-atoms"])
    with torch.no_grad():
        adapted = pipe.unet(torch.ones(1, 4, 16, 16), 5, torch.ones(1, 8, 64)).sample
    merge_and_unload(pipe)
    plain = UNet2DConditionModel.from_config(pipe.unet.config)
    assert set(pipe.unet.state_dict()) == set(plain.state_dict())
    assert not any(re.search(r"base_layer|deltas", n) for n, _ in pipe.unet.named_modules())
    with torch.no_grad():
        assert torch.allclose(pipe.unet(torch.ones(1, 4, 16, 16), 5, torch.ones(1, 8, 64)).sample, adapted, atol=1e-5)


def test_cli_export_prints_each_layer_and_refuses_mistakes(adapters, workdir, monkeypatch, capsys):
    out = workdir / "cli-lora.safetensors"
    code, stdout, err = run_cli(["export", str(adapters["filter-atoms"]), "--format", "lora", "--rank", "2",
                                 "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    layers = [line for line in stdout.splitlines() if " rank " in line]
    assert len(layers) > 10 and all(line.split()[2] in ("1", "2") for line in layers)
    assert re.search(r"overall relative error 0\.\d{4} over \d+ layers", stdout) and out.is_file()
    before = out.read_bytes()
    assert_user_error(run_cli(["export", str(adapters["filter-atoms"]), "--format", "lora", "--rank", "2", "--out",
                               str(out)], monkeypatch, capsys), "already exists")
    assert out.read_bytes() == before
    for args, name, fragment in ((["--format", "lora"], "never.safetensors", "Choose --rank R or --max-error E"),
                                 (["--format", "diffusers", "--rank", "4"], "never", "apply to the lora format only"),
                                 (["--format", "lycoris-full"], "never", "name the output *.safetensors")):
        target = workdir / name
        assert_user_error(run_cli(["export", str(adapters["filter-atoms"]), *args, "--out", str(target)], monkeypatch,
                                  capsys), fragment)
        assert not target.exists()
    assert_user_error(run_cli(["export", str(workdir / "missing.safetensors"), "--format", "lora", "--rank", "2",
                               "--out", str(workdir / "x.safetensors")], monkeypatch, capsys), "No adapter file")
