"""The README.md model card written next to a trained adapter, as diffusers writes for its LoRAs.

The card is meant to travel with the adapter: its snippet runs from the adapter's folder, and it
names folders by their last component only (no paths of the machine that trained it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text

# Settings that hold local paths: the card shows their last component only.
_PATH_SETTINGS = ("images", "output_dir", "class_images")


def _local_name(value: str) -> str:
    return Path(value).name or value


def _shown_settings(settings: Any) -> dict[str, Any]:
    shown = {k: v for k, v in settings.to_dict().items() if v not in (None, [], {})}
    for key in _PATH_SETTINGS:
        if key in shown:
            shown[key] = _local_name(str(shown[key]))
    if settings.model is not None and Path(settings.model).expanduser().exists():
        shown["model"] = _local_name(settings.model)
    return shown


def _load_lines(model: str | None) -> list[str]:
    """The snippet lines that load the base pipeline."""
    if model is None:
        return ["from filteratom_sd.tiny.bundled import bundled_model_path", "",
                "pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path()))"]
    if Path(model).expanduser().exists():
        return [f'pipe = StableDiffusionPipeline.from_pretrained("{_local_name(model)}")  # your copy of the base model']
    return [f'pipe = StableDiffusionPipeline.from_pretrained("{model}")']


def _monitor_section(monitor: dict | None) -> str:
    if monitor is None:
        return ""
    stopped = f"Training stopped early: {monitor['stopped_early']}.\n\n" if monitor.get("stopped_early") else ""
    return f"""## Drift monitor

The adapter is step {monitor['kept_step']} of {monitor['steps']}: {monitor['reason']}.

{stopped}![drift monitor]({monitor['curve'].as_posix()})

Every score per monitored step is in `monitor.json`.
"""


def write_model_card(out: Path, settings: Any, base_model: str, method: str, parameters: int, grid: Path | None,
                     losses: list[float], monitor: dict | None = None) -> Path:
    """Write out/README.md: trigger token, base model, method, parameter count, kept step, settings, sample grid.

    `monitor` (kept_step, steps, reason, curve, stopped_early) adds the drift monitor's section.
    """
    front = {"base_model": base_model, "library_name": "diffusers", "instance_prompt": settings.trigger,
             "tags": ["text-to-image", "stable-diffusion", "diffusers", "filteratom-sd", method]}
    last = losses[-20:]
    loss_line = (f"- final training loss: {losses[-1]:.4f} (the last step, as `fa-sd train` prints it; "
                 f"mean of the last {len(last)} steps: {sum(last) / len(last):.4f})" if losses else
                 "- final training loss: n/a")
    grid_line = f"![samples]({grid.relative_to(out).as_posix()})\n" if grid is not None else ""
    prompt = settings.prompt_templates[0].format(settings.trigger)
    snippet = "\n".join(["from diffusers import StableDiffusionPipeline", "from filteratom_sd import load_adapter",
                         *_load_lines(settings.model), f'load_adapter(pipe, "{settings.concept}.safetensors")',
                         f'image = pipe("{prompt}").images[0]', f'image.save("{settings.concept}-sample.png")'])
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# {settings.concept} — a filteratom-sd adapter

Trigger token: `{settings.trigger}` — use it in prompts, e.g. "{prompt}".

- base model: `{base_model}`
- method: `{method}` ({parameters:,} trainable parameters)
- file: `{settings.concept}.safetensors`
{loss_line}

{grid_line}
{_monitor_section(monitor)}
## Use it

From this folder:

```python
{snippet}
```

or `fa-sd sample --adapter {settings.concept}.safetensors --prompt "..."`.

## Training settings

```yaml
{yaml.safe_dump(_shown_settings(settings), sort_keys=False).strip()}
```
"""
    path = out / "README.md"
    atomic_write_text(path, text)
    return path
