"""Small training runs on the bundled tiny model, shared by the trainer, CLI and reliability tests."""

from __future__ import annotations

from pathlib import Path

from filteratom_sd.training.settings import TrainingSettings, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
CASTLE = ROOT / "assets" / "concepts" / "castle"


def quick_settings(out: Path, **overrides) -> TrainingSettings:
    """A few steps on the castle images with validation and the drift monitor off: seconds on a CPU."""
    values = dict(concept="castle", images=str(CASTLE), output_dir=str(out), steps=4, batch_size=2,
                  checkpoint_every=2, validation_every=10_000, validation_steps=2, monitor=False)
    values.update(overrides)
    return resolve_settings(values)


def adapter_bytes(out: Path, concept: str = "castle") -> bytes:
    """The adapter file a run wrote."""
    return (out / f"{concept}.safetensors").read_bytes()
