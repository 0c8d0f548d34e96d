"""The public API on a compiled UNet, under sequential CPU offload and beside a diffusers / peft LoRA."""

from __future__ import annotations

import pytest
import torch

from filteratom_sd import fuse_adapter, load_adapter, set_adapter_scale, unfuse_adapter, unload_adapter

from .test_adapter_files import trained_adapter
from .tiny_unet import make_inputs, make_unet, run

@pytest.fixture
def adapter(tmp_path):
    trained, path = trained_adapter(tmp_path)
    return path, run(trained, make_inputs())


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
