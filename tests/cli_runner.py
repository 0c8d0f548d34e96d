"""Running `fa-sd` in the test process with the base model's loading replaced by a marker exception."""

from __future__ import annotations

import sys

from filteratom_sd.cli import main


class ModelLoaded(BaseException):
    """Raised where the base model would load: the command got past every check."""


def refuse_model_loading(monkeypatch) -> None:
    """Make loading a base pipeline raise `ModelLoaded` (patched in diffusers, so independent of our layout)."""
    from diffusers import StableDiffusionPipeline

    def refuse(*args, **kwargs):
        raise ModelLoaded()

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", refuse)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int | str, str, str]:
    """(exit status or "model loaded", stdout, stderr) of `fa-sd ARGS` run in this process."""
    monkeypatch.setattr(sys, "argv", ["fa-sd", *args])
    code: int | str = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except ModelLoaded:
        code = "model loaded"
    captured = capsys.readouterr()
    return code, captured.out, captured.err
