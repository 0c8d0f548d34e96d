"""The README.md model card written next to a trained adapter, as diffusers writes for its LoRAs."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..atomic import atomic_write_text


def _monitor_section(monitor: dict | None) -> str:
    if monitor is None:
        return ""
    stopped = f"Training stopped early: {monitor['stopped_early']}.\n\n" if monitor.get("stopped_early") else ""
    return f"""## Drift monitor

The adapter is step {monitor['kept_step']} of {monitor['steps']}: {monitor['reason']}.

{stopped}![drift monitor]({monitor['curve'].as_posix()})

Every score per monitored step is in `monitor.json`.
"""


def write_model_card(out: Path, settings, base_model: str, method: str, parameters: int, grid: Path | None,
                     losses: list[float], monitor: dict | None = None) -> Path:
    """Write out/README.md: trigger token, base model, method, parameter count, kept step, settings, sample grid.

    `monitor` (kept_step, steps, reason, curve, stopped_early) adds the drift monitor's section.
    """
    front = {"base_model": base_model, "library_name": "diffusers", "instance_prompt": settings.trigger,
             "tags": ["text-to-image", "stable-diffusion", "diffusers", "filteratom-sd", method]}
    trained = {k: v for k, v in settings.to_dict().items() if v not in (None, [], {})}
    final_loss = f"{sum(losses[-20:]) / len(losses[-20:]):.4f}" if losses else "n/a"
    grid_line = f"![samples]({grid.relative_to(out).as_posix()})\n" if grid is not None else ""
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# {settings.concept} — a filteratom-sd adapter

Trigger token: `{settings.trigger}` — use it in prompts, e.g. "{settings.prompt_templates[0].format(settings.trigger)}".

- base model: `{base_model}`
- method: `{method}` ({parameters:,} trainable parameters)
- file: `{settings.concept}.safetensors`
- final training loss (mean of the last 20 steps): {final_loss}

{grid_line}
{_monitor_section(monitor)}
## Use it

```python
from diffusers import StableDiffusionPipeline
from filteratom_sd import load_adapter

pipe = StableDiffusionPipeline.from_pretrained("{settings.model or 'assets/tiny-sd'}")
load_adapter(pipe, "{settings.concept}.safetensors")
image = pipe("{settings.prompt_templates[0].format(settings.trigger)}").images[0]
```

or `fa-sd sample --adapter {settings.concept}.safetensors --prompt "..."`.

## Training settings

```yaml
{yaml.safe_dump(trained, sort_keys=False).strip()}
```
"""
    path = out / "README.md"
    atomic_write_text(path, text)
    return path
