"""The public API on a compiled UNet, under sequential CPU offload and beside a diffusers / peft LoRA."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from accelerate.hooks import remove_hook_from_module
from peft import LoraConfig

from filteratom_sd import fuse_adapter, load_adapter, merge_and_unload, set_adapter_scale, unfuse_adapter, unload_adapter
from filteratom_sd.errors import ConfigError

from .test_adapter_files import trained_adapter
from .tiny_unet import make_inputs, make_unet, run

# Linears the filter-atom default targets leave alone: a LoRA there shares no layer with the adapter.
OTHER_LAYERS = ["time_emb_proj", "linear_1"]


@pytest.fixture
def adapter(tmp_path):
    trained, path = trained_adapter(tmp_path)
    return path, run(trained, make_inputs())


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def add_lora(unet, targets, seed=5):
    """A peft LoRA as diffusers' `load_lora_weights` / `add_adapter` adds it, with non-zero updates."""
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))


# --- torch.compile -----------------------------------------------------------------------------

def test_a_compiled_unet_takes_adapters_and_follows_every_change(adapter, dynamo):
    path, expected = adapter
    inputs = make_inputs()
    unet = make_unet()
    base = run(unet, inputs)
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    assert torch.equal(run(compiled, inputs), base)
    assert load_adapter(compiled, path) == "castle"  # layer names without the "_orig_mod." prefix
    torch.testing.assert_close(run(compiled, inputs), expected, atol=1e-5, rtol=1e-5)
    fuse_adapter(compiled)
    torch.testing.assert_close(run(compiled, inputs), expected, atol=1e-5, rtol=1e-5)
    unfuse_adapter(compiled)
    unload_adapter(compiled)
    assert torch.equal(run(compiled, inputs), base)


def test_load_then_compile_makes_one_graph_fused_or_not(adapter, dynamo):
    path, _ = adapter
    inputs = make_inputs()
    unet = make_unet()
    load_adapter(unet, path)
    eager = run(unet, inputs)  # fills the unfused weight cache, whose checks must not reach the graph
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
    set_adapter_scale(unet, 0.5)
    torch.testing.assert_close(run(compiled, inputs), run(unet, inputs), atol=1e-5, rtol=1e-5)
    set_adapter_scale(unet, 1.0)
    fuse_adapter(unet)  # the documented fast path: the fused graph is the base UNet's
    torch.testing.assert_close(run(compiled, inputs), eager, atol=1e-5, rtol=1e-5)


# --- offload -----------------------------------------------------------------------------------
# diffusers' enable_sequential_cpu_offload wants an accelerator (device="cpu" becomes "cpu:0", which accelerate
# cannot restore weights to), so these tests attach the same accelerate hook it attaches to the UNet.

def test_sequential_offload_runs_a_merged_adapter_and_refuses_the_rest(adapter):
    path, expected = adapter
    inputs = make_inputs()
    offloaded = make_unet()
    cpu_offload(offloaded, torch.device("cpu"))
    calls = (lambda: load_adapter(offloaded, path), lambda: fuse_adapter(offloaded), lambda: unfuse_adapter(offloaded),
             lambda: set_adapter_scale(offloaded, 0.5), lambda: unload_adapter(offloaded))
    for call in calls:
        with pytest.raises(ConfigError, match=r"merge_and_unload\(pipe\) before pipe.enable_sequential_cpu_offload"):
            call()
    unfused = make_unet()
    load_adapter(unfused, path)
    cpu_offload(unfused, torch.device("cpu"))
    with pytest.raises(ConfigError, match="sequential CPU offload"):  # sampling, not only the API
        run(unfused, inputs)
    for finish in (fuse_adapter, merge_and_unload):
        unet = make_unet()
        load_adapter(unet, path)
        finish(unet)
        cpu_offload(unet, torch.device("cpu"))
        torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="remove_all_hooks"):
        unfuse_adapter(unet)
    remove_hook_from_module(unet, recurse=True)  # what pipe.remove_all_hooks() does: the weights come back
    assert torch.equal(run(unet, inputs), run(merged_reference(path), inputs))


def merged_reference(path):
    unet = make_unet()
    load_adapter(unet, path)
    merge_and_unload(unet)
    return unet


def test_model_offload_moves_whole_models_and_takes_adapters_at_any_time(adapter):
    path, expected = adapter
    unet = make_unet()
    cpu_offload_with_hook(unet, torch.device("cpu"))  # enable_model_cpu_offload's hook
    load_adapter(unet, path)
    torch.testing.assert_close(run(unet, make_inputs()), expected, atol=1e-5, rtol=1e-5)


# --- a diffusers / peft LoRA -------------------------------------------------------------------

def test_a_lora_on_the_same_layers_is_refused_before_anything_changes(adapter):
    path, _ = adapter
    inputs = make_inputs()
    unet = make_unet()
    add_lora(unet, ["to_q", "to_k", "to_v"])
    before = run(unet, inputs)
    with pytest.raises(ConfigError, match=r"already carries a peft adapter .* merge_and_unload\(pipe\)"):
        load_adapter(unet, path)
    assert torch.equal(run(unet, inputs), before)


def test_a_lora_added_after_merge_and_unload_stacks_on_the_adapter(adapter):
    path, expected = adapter
    inputs = make_inputs()
    unet = make_unet()
    load_adapter(unet, path)
    merge_and_unload(unet)
    add_lora(unet, ["to_q", "to_k", "to_v", "conv1"])
    assert (run(unet, inputs) - expected).abs().max() > 1e-3  # the LoRA applies ...
    unet.disable_adapters()
    torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=1e-5)  # ... on top of the adapter


def test_a_lora_on_other_layers_stacks_in_either_order(adapter):
    path, expected = adapter
    inputs = make_inputs()
    lora_first = make_unet()
    add_lora(lora_first, OTHER_LAYERS)
    lora_only = run(lora_first, inputs)
    load_adapter(lora_first, path)
    both = run(lora_first, inputs)
    ours_first = make_unet()
    load_adapter(ours_first, path)
    add_lora(ours_first, OTHER_LAYERS)
    torch.testing.assert_close(run(ours_first, inputs), both, atol=1e-5, rtol=1e-5)
    assert min((both - lora_only).abs().max(), (both - expected).abs().max()) > 1e-3
    unload_adapter(lora_first)
    assert torch.equal(run(lora_first, inputs), lora_only)
