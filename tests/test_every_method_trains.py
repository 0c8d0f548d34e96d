"""Every method trains through `train()` on the bundled model, saves a file that loads into a pipeline and changes its output."""

from __future__ import annotations

import pytest
import torch

from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.models import load_pipeline
from filteratom_sd.core.api import load_adapter, unload_adapter
from filteratom_sd.training.loop import train

from .train_helpers import quick_settings

# (method, preset): filter atoms once per preset family that trains different tensors (C3: beta and D1; C4: alpha too).
CASES = [("filter-atoms", "C1"), ("filter-atoms", "C3"), ("filter-atoms", "C4"), ("liera", None), ("lora", None),
         ("loha", None), ("lokr", None), ("oft", None), ("bitfit", None), ("difffit", None), ("full", None)]


def _sample(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = pipe("a <castle> on a red background", num_inference_steps=3, guidance_scale=5.0, generator=generator,
                  output_type="np").images
    return torch.from_numpy(images)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


@pytest.fixture(scope="module")
def base_image(pipe):
    return _sample(pipe)


@pytest.mark.parametrize("method,preset", CASES, ids=[m if p is None else f"{m}-{p}" for m, p in CASES])
def test_method_trains_saves_loads_and_changes_the_output(method, preset, tmp_path, pipe, base_image):
    overrides = {"preset": preset} if preset else {}
    # Each method's own default learning rate (full fine-tuning: 5e-6), two steps of batch 1.
    settings = quick_settings(tmp_path / method, method=method, steps=2, batch_size=1, checkpoint_every=100,
                              validation_steps=1, lr_by_method={}, **overrides)
    result = train(settings, progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))

    adapter = read_adapter(result.adapter_path)
    assert adapter.method == method and adapter.num_parameters == result.trainable_parameters > 0

    load_adapter(pipe, result.adapter_path, adapter_name="trained")
    try:
        adapted = _sample(pipe)
    finally:
        unload_adapter(pipe, "trained")
    assert (adapted - base_image).abs().max() > 1e-2, "the trained adapter does not change the output"
    assert torch.equal(_sample(pipe), base_image), "unloading did not restore the base model"
