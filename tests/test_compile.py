"""torch.compile of a UNet with filter atoms: one graph per call, and the same outputs and gradients as eager.

The compiled graphs run through the "aot_eager" backend: dynamo's trace and AOT autograd's joint graph, the
parts that see the adapters, without the minutes of code generation that inductor takes on a CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from filteratom_sd import FilterAtomConfig, add_filter_atoms
from filteratom_sd.core.fast_paths import prepare_compile
from filteratom_sd.core.layer import set_train_path, set_weight_recompute

from .tiny_unet import make_inputs, make_unet


@pytest.fixture
def dynamo_config():
    """Each test starts from dynamo's default and leaves the config and the compiled-code cache as it found them."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        yield
    torch._dynamo.reset()


def adapted_unet(path: str, recompute: bool):
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig.preset("C2"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    set_train_path(unet, path)
    set_weight_recompute(unet, recompute)
    return unet.train()


def output_and_grads(model, params):
    latents, timesteps, text = make_inputs()
    for p in params:
        p.grad = None
    out = model(latents, timesteps, text).sample
    F.mse_loss(out, torch.zeros_like(out)).backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("path,recompute", [("weight", False), ("weight", True), ("activations", False)],
                         ids=["weight-path", "rebuilt-weight", "activation-paths"])
def test_compiled_training_step_matches_eager(dynamo_config, path, recompute):
    unet = adapted_unet(path, recompute)
    params = [p for p in unet.parameters() if p.requires_grad]
    eager_out, eager_grads = output_and_grads(unet, params)
    prepare_compile()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    for _ in range(2):  # the first call traces, the second runs the cached graph
        out, grads = output_and_grads(compiled, params)
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_rebuilt_weights_break_the_graph_without_prepare_compile(dynamo_config):
    unet = adapted_unet("weight", recompute=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="autograd"):
        output_and_grads(compiled, params)


def test_compiled_training_run_writes_the_eager_runs_adapter(dynamo_config, tmp_path):
    from safetensors.torch import load_file

    from filteratom_sd.training.loop import train

    from .train_helpers import quick_settings

    eager = train(quick_settings(tmp_path / "eager", steps=3), progress=False)
    compiled = train(quick_settings(tmp_path / "compiled", steps=3, compile="default", compile_backend="aot_eager"),
                     progress=False)
    # one graph for all three steps: the UNet was compiled (not left eager), without breaks or recompiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want, got = load_file(eager.adapter_path), load_file(compiled.adapter_path)
    assert sorted(got) == sorted(want) and not any(k.startswith("_orig_mod") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--compile", "fast"], "Invalid value for '--compile'"),
    (["--compile", "reduce-overhead", "--config", "{config}"], "is an inductor mode"),
])
def test_compile_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    from .cli_runner import refuse_model_loading, run_cli
    from .train_helpers import CASTLE

    config = tmp_path / "aot.yaml"
    config.write_text("compile_backend: aot_eager\n")
    refuse_model_loading(monkeypatch)
    command = ["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(tmp_path / "o")]
    code, _, err = run_cli(command + [a.format(config=config) for a in args], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compile_alone_means_the_default_mode(tmp_path, monkeypatch, capsys):
    from .cli_runner import refuse_model_loading, run_cli
    from .train_helpers import CASTLE

    seen = {}
    import filteratom_sd.cli as cli_module

    def record(settings, **kwargs):
        seen["compile"] = settings.compile
        raise SystemExit(0)

    monkeypatch.setattr(cli_module, "run_training", record)
    refuse_model_loading(monkeypatch)
    code, _, _ = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--compile", "--steps", "2"],
                         monkeypatch, capsys)
    assert code == 0 and seen == {"compile": "default"}
