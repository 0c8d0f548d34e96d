"""The `fa-sd` command line: train, sample, inspect, decompose, evaluate, compare, export.

User mistakes become one line, `Error: ...`, and exit status 2; --debug shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from .core.adapter_file import read_adapter
from .cli_help import TRAIN_HELP, default_help, parse_options
from .core.targets import pattern_warnings
from .errors import FilterAtomError, UserInputError
from .evaluation.compare import DEFAULT_METHODS, CompareRequest, parse_method_specs, run_comparison
from .evaluation.metrics import DEFAULT_CLIP_MODEL, DEFAULT_IMAGE_ENCODER
from .evaluation.report import table_markdown
from .evaluation.runs import EvalRequest, run_eval
from .filter_atoms.cache import decompose_unet
from .filter_atoms.config import FilterAtomConfig
from .methods.registry import available_methods
from .models import load_pipeline
from .resources import shipped_names
from .sampling import SampleRequest, run_sampling
from .training.loop import TrainingInterrupted, train as run_training
from .training.settings import COMPILE_MODES, LR_SCHEDULERS, TRAIN_PATHS, resolve_settings
from .user_files import MAX_PROMPTS_FILE_BYTES, read_text

logger = logging.getLogger("filteratom_sd")

# CUDA out-of-memory and host memory exhaustion get the same advice.
OUT_OF_MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks (read by main before the command runs).")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def cli(debug: bool, verbose: bool) -> None:
    """Teach Stable Diffusion a concept by tuning only filter atoms."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_loading_bars()


def _quiet_loading_bars() -> None:
    # the libraries' own loading bars and dtype notices would bury our one progress bar
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


@cli.command(help=TRAIN_HELP)
@click.option("--concept", required=True, help="Name of the concept; the trigger token defaults to <NAME>.")
@click.option("--images", required=True, help="Folder of 4-9 images of the concept (captions from metadata.jsonl or .txt files).")
@click.option("--token", help="Trigger token (default: <concept>).")
@click.option("--model", help="Diffusers folder, hub id, or one .safetensors/.ckpt file (default: the bundled tiny model).")
@click.option("--method", help=f"{', '.join(available_methods())} " + default_help("method"))
@click.option("--preset", help="Filter-atom preset C1, C2, C3 or C4 " + default_help("preset"))
@click.option("--method-option", "method_option", multiple=True, help="Method setting key=value (repeatable).")
@click.option("--config", "config_file",
              help="YAML file of training settings (any setting below, by its YAML name), or a shipped one by name: "
                   f"{', '.join(shipped_names('training'))}.")
@click.option("--steps", type=int, help="Training steps " + default_help("steps"))
@click.option("--lr", type=float, help="Learning rate (default: the base model's rate for the method, e.g. 3e-3 for "
                                       "filter atoms on the bundled model, else the method's own, 1e-3).")
@click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS),
              help="Learning-rate schedule (diffusers' get_scheduler) " + default_help("lr_scheduler"))
@click.option("--lr-warmup-steps", type=int, help="Steps of linear warm-up " + default_help("lr_warmup_steps"))
@click.option("--weight-decay", "adam_weight_decay", type=float, help="AdamW weight decay " + default_help("adam_weight_decay"))
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm " + default_help("max_grad_norm"))
@click.option("--batch-size", type=int, help="Images per step " + default_help("batch_size"))
@click.option("--gradient-accumulation-steps", type=int, help="Batches per optimizer step " + default_help("gradient_accumulation_steps"))
@click.option("--resolution", type=int, help="Training resolution in pixels " + default_help("resolution"))
@click.option("--center-crop/--random-crop", default=None, help="Square crop of each image " + default_help("center_crop"))
@click.option("--flip/--no-flip", default=None, help="Add horizontally flipped copies " + default_help("flip"))
@click.option("--seed", type=int, help="Seed of every random choice " + default_help("seed"))
@click.option("--output-dir", help="Output folder (default: outputs/<concept>).")
@click.option("--overwrite", is_flag=True,
              help="Start again: remove an earlier run's checkpoints, samples, logs, card and adapter first.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue from the newest checkpoint in the output folder, or from the checkpoint folder given.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="Autocast precision " + default_help("mixed_precision"))
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for memory (off by default).")
@click.option("--train-path", type=click.Choice(TRAIN_PATHS), help="How filter-atom layers train " + default_help("train_path"))
@click.option("--compile", is_flag=False, flag_value="default", default=None, type=click.Choice(COMPILE_MODES),
              help="torch.compile the UNet (inductor; MODE reduce-overhead adds CUDA graphs): for GPUs, the first step compiles.")
@click.option("--instance-prompt", help="Caption of every concept image without its own; must contain the token "
                                        "(default: the caption templates).")
@click.option("--caption-template", "prompt_templates", multiple=True,
              help="Caption template with {} for the token, e.g. 'a {} on a white background': naming the images' "
                   "context keeps it a matter of the prompt (repeatable; default: configs/prompt_templates.yaml).")
@click.option("--caption-dropout", type=float, help="Probability of training a concept image with the empty prompt "
                                                    + default_help("caption_dropout"))
@click.option("--train-token/--no-train-token", default=None, help="Pivotal tuning: also learn the token's text "
              "embedding, stored in the adapter " + default_help("train_token"))
@click.option("--token-init", help="Word the trained token's embedding starts from, e.g. the class: 'dog'.")
@click.option("--token-lr", type=float, help="Learning rate of the token's embedding " + default_help("token_lr"))
@click.option("--noise-offset", type=float, help="Offset noise (per-channel constant added to the noise) " + default_help("noise_offset"))
@click.option("--prior-preservation/--no-prior-preservation", default=None,
              help="Also train on the base model's images of the class " + default_help("prior_preservation"))
@click.option("--class-prompt", "class_prompt", multiple=True,
              help="Prompt for prior-preservation images (repeatable: the images cycle through them).")
@click.option("--class-images", help="Folder of class images (default: OUT/class_images, missing ones generated).")
@click.option("--num-class-images", type=int, help="Class images to use " + default_help("num_class_images"))
@click.option("--sample-batch-size", type=int, help="Class images per pipeline call " + default_help("sample_batch_size"))
@click.option("--prior-loss-weight", type=float, help="Weight of the class images' loss " + default_help("prior_loss_weight"))
@click.option("--min-snr-gamma", type=float, help="Min-SNR loss weighting gamma (default: off).")
@click.option("--masked-loss/--no-masked-loss", default=None,
              help="Weight the loss by each image's alpha channel (transparent pixels are background; default: off).")
@click.option("--unmasked-weight", type=float, help="Loss weight of background pixels with --masked-loss (default 0).")
@click.option("--monitor/--no-monitor", default=None,
              help="Score a fixed probe set at step 0 and every --monitor-every steps: concept fidelity, alignment in "
                   "new contexts, prior drift (default: on; OUT/monitor.json, TensorBoard, the model card).")
@click.option("--monitor-every", type=int, help="Steps between monitor runs " + default_help("monitor_every"))
@click.option("--keep", type=click.Choice(["best", "last"]),
              help="Which step OUT/<concept>.safetensors holds: 'best' is the highest fidelity among monitored steps "
                   "whose alignment, prior accuracy and prior drift stay within margins of step 0 " + default_help("keep"))
@click.option("--max-drift", type=float, help="Stop early once the prior drift (relative noise-prediction MSE on "
                                              "prompts without the token) passes this (default: never).")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (each one also an adapter) "
                                                   + default_help("checkpoint_every"))
@click.option("--checkpoints-total-limit", type=int, help="Checkpoints kept " + default_help("checkpoints_total_limit"))
@click.option("--validation-prompt", "validation_prompts", multiple=True,
              help="Prompt sampled into OUT/samples every --validation-every steps (repeatable; default: none).")
@click.option("--validation-every", type=int, help="Steps between validation grids " + default_help("validation_every"))
@click.option("--report-to", type=click.Choice(["tensorboard", "wandb", "none"]),
              help="Where losses and monitor scores are logged, through accelerate's trackers " + default_help("report_to"))
@click.option("--on-nan", type=click.Choice(["skip", "stop"]), help="What to do with a non-finite loss " + default_help("on_nan"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(**kwargs: Any) -> None:
    """Train an adapter on a folder of concept images."""
    resume, overwrite, quiet = kwargs.pop("resume") or False, kwargs.pop("overwrite"), kwargs.pop("quiet")
    config_file = kwargs.pop("config_file")
    kwargs["method_options"] = parse_options(kwargs.pop("method_option"))
    kwargs["validation_prompts"] = list(kwargs["validation_prompts"]) or None
    kwargs["prompt_templates"] = list(kwargs["prompt_templates"]) or None
    class_prompt = list(kwargs["class_prompt"])
    kwargs["class_prompt"] = None if not class_prompt else class_prompt[0] if len(class_prompt) == 1 else class_prompt
    settings = resolve_settings(kwargs, config_file)
    try:
        result = run_training(settings, resume=resume, overwrite=overwrite, progress=not quiet)
    except TrainingInterrupted as exc:
        click.echo(f"Interrupted at step {exc.step}: checkpoint and adapter saved in {settings.output_path}. "
                   f"Resume with the same command plus --resume.", err=True)
        sys.exit(128 + exc.signum)
    click.echo(f"Adapter: {result.adapter_path} ({result.trainable_parameters:,} trainable parameters, "
               f"{result.seconds:.0f} s, final loss {result.losses[-1]:.4f})")
    if result.stopped_early:
        click.echo(f"Stopped early: {result.stopped_early}.")
    click.echo(f"Kept step {result.kept_step}: {result.kept_reason}.")


@cli.command()
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="One prompt per line.")
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter file, or a folder holding one such as OUT/checkpoints/step-000500 (repeatable).")
@click.option("--adapter-scale", "scales", multiple=True, type=float, help="Scale of each adapter, in order.")
@click.option("--model", help="Base model (default: the bundled tiny model).")
@click.option("-n", "--num-images", default=1, show_default=True, type=int, help="Images per prompt.")
@click.option("--steps", default=None, type=int, help="Sampling steps.")
@click.option("--guidance-scale", default=None, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--out", default="samples", show_default=True, help="Output folder.")
@click.option("--grid", is_flag=True, help="Also save one grid per prompt.")
@click.option("--fuse", is_flag=True, help="Merge the adapters into the weights (in place) before sampling.")
@click.option("--batch-size", default=4, show_default=True, type=int, help="Images per pipeline call (same images).")
def sample(prompts, prompts_file, adapters, scales, model, num_images, steps, guidance_scale, seed, height, width, out,
           grid, fuse, batch_size) -> None:
    """Generate images, optionally with adapters loaded."""
    all_prompts = list(prompts)
    if prompts_file:
        text = read_text(prompts_file, MAX_PROMPTS_FILE_BYTES, "prompts file")
        all_prompts += [line.strip() for line in text.splitlines() if line.strip()]
    request = SampleRequest(all_prompts, list(adapters), list(scales), model, num_images, steps, guidance_scale, seed,
                            height, width, Path(out), grid, fuse, batch_size)
    for path in run_sampling(request):
        click.echo(str(path))


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(adapter: str, as_json: bool) -> None:
    """Show an adapter's metadata, targets, parameter count and file size (ADAPTER: a file, or a checkpoint folder)."""
    found = read_adapter(adapter)
    info = {
        "file": str(found.path),
        "size_bytes": found.path.stat().st_size,
        "method": found.method,
        "token": found.token,
        "token_embedding": 0 if found.token_embedding is None else found.token_embedding.shape[1],
        "base_model": found.metadata.get("base_model", ""),
        "base_fingerprint": found.base_fingerprint.get("digest", ""),
        "trainable_parameters": found.num_parameters,
        "config": found.config,
        "targets": found.targets,
        "library_version": found.metadata.get("library_version", ""),
        # loading never runs these patterns (it selects the listed targets by name), but the file is odd
        "warnings": [f"{w}; loading uses the listed targets instead" for w in pattern_warnings(found.config)],
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "targets":
            click.echo(f"targets: {len(value)} layers")
            for name in value:
                click.echo(f"  {name}")
        elif key == "warnings":
            for warning in value:
                click.echo(f"warning: {warning}")
        else:
            click.echo(f"{key}: {value}")


@cli.command()
@click.option("--model", help="Base model (default: the bundled tiny model).")
@click.option("--preset", default="C2", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where to keep the cache (default: ~/.cache/filteratom-sd).")
def decompose(model: str | None, preset: str, cache_dir: str | None) -> None:
    """Precompute and cache alpha for a base model, with per-layer error and time."""
    config = FilterAtomConfig.preset(preset)
    pipe = load_pipeline(model)
    start = time.time()
    reports, path = decompose_unet(pipe.unet, config, Path(cache_dir) if cache_dir else None)
    for name, r in reports.items():
        click.echo(f"{name:70s} {r.layout:6s} {str(r.shape):22s} error {r.relative_error:.4f}  {r.seconds * 1000:7.1f} ms")
    click.echo(f"{len(reports)} layers in {time.time() - start:.1f} s; cache: {path}")


_EXPORT_FORMATS = ("diffusers", "single-file", "lycoris-full", "lora")


@cli.command(name="export")
@click.argument("adapter", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(_EXPORT_FORMATS),
              help="diffusers: fused pipeline folder; single-file: one checkpoint in the original SD layout (A1111, "
                   "ComfyUI); lycoris-full: each layer's full difference (fp16); lora: kohya LoRA by truncated SVD.")
@click.option("--out", required=True, help="Output folder (diffusers) or .safetensors file (the other formats).")
@click.option("--model", help="Base model the adapter was trained on (default: the bundled tiny model).")
@click.option("--rank", type=click.IntRange(min=1), help="lora: the same rank for every layer.")
@click.option("--max-error", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="lora: per layer, the smallest rank whose relative Frobenius error is at most this.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export(adapter, fmt, out, model, rank, max_error, overwrite) -> None:
    """Write an adapter in a format other tools load without filteratom-sd."""
    from .export import export_adapter

    result = export_adapter(adapter, fmt, out, model=model, rank=rank, max_error=max_error, overwrite=overwrite)
    if result.lora is not None:
        for layer in result.lora.layers:
            click.echo(f"{layer.name:70s} rank {layer.rank:5d}  error {layer.error:.4f}")
        for key in result.lora.dropped:
            click.echo(f"{key:70s} not expressible as LoRA (dropped)")
        click.echo(f"overall relative error {result.lora.overall_error:.4f} over {len(result.lora.layers)} layers")
    click.echo(f"Wrote {result.path} ({result.size_bytes / 1e6:.2f} MB)")
    if result.embedding is not None:
        click.echo(f"Wrote {result.embedding} (the token's embedding: load_textual_inversion(path, token=...))")


_PROMPT_SET_HELP = "Prompt-set YAML, or a shipped one by name: tiny (default for the bundled model) or dreambooth."
_METRICS_HELP = "tiny (offline checker; default for the bundled model) or embedding (DINOv2 + CLIP, the paper's; default otherwise)."


@cli.command(name="eval")
@click.option("--adapter", "adapters", multiple=True, help="Adapter file (repeatable).")
@click.option("--base", "include_base", is_flag=True, help="Also score the base model without an adapter.")
@click.option("--images", required=True, help="Folder of the concept's training images (for fidelity).")
@click.option("--model", help="Base model (default: the bundled tiny model).")
@click.option("--token", help="Trigger token in the prompts (default: each adapter's own).")
@click.option("--prompts-file", help=_PROMPT_SET_HELP)
@click.option("--metrics", type=click.Choice(["tiny", "embedding"]), help=_METRICS_HELP)
@click.option("--image-encoder", default=None, help="DINOv2 model for fidelity and diversity (hub id or folder).")
@click.option("--clip-model", default=None, help="CLIP model for alignment (hub id or folder).")
@click.option("--out", default="eval.json", show_default=True, help="JSON file to write.")
def evaluate(adapters, include_base, images, model, token, prompts_file, metrics, image_encoder, clip_model, out) -> None:
    """Score adapters: fidelity, diversity (Vendi) and text-image alignment of images from a prompt set."""
    request = EvalRequest(list(adapters), images, model, include_base, token, prompts_file, metrics,
                          image_encoder or DEFAULT_IMAGE_ENCODER, clip_model or DEFAULT_CLIP_MODEL, Path(out))
    report = run_eval(request)
    for row in report["results"]:
        click.echo(f"{row['label']}: fidelity {row['fidelity']:.4f}, diversity {row['diversity']:.3f}, "
                   f"alignment {row['alignment']:.4f} ({row['images']} images)")
    click.echo(f"Results: {out}")


@cli.command()
@click.option("--concept", required=True, help="Name of the concept; the trigger token defaults to <NAME>.")
@click.option("--images", required=True, help="Folder of the concept's images.")
@click.option("--methods", "methods", default=None,
              help="Comma-separated method[:preset or key=value,...] (default: C1-C4 and every baseline), "
                   "e.g. filter-atoms:C1,lora:r=4,lokr:factor=4,lr=1e-3.")
@click.option("--out", default="comparison", show_default=True, help="Report folder (runs are kept in OUT/runs).")
@click.option("--model", help="Base model (default: the bundled tiny model).")
@click.option("--token", help="Trigger token (default: <concept>).")
@click.option("--steps", type=int, help="Training steps of every method (default: the base model's config).")
@click.option("--seed", type=int, help="Seed of every run (default 0).")
@click.option("--config", "config_file", help="YAML file of training settings shared by every run.")
@click.option("--prompts-file", help=_PROMPT_SET_HELP)
@click.option("--metrics", type=click.Choice(["tiny", "embedding"]), help=_METRICS_HELP)
@click.option("--image-encoder", default=None, help="DINOv2 model for fidelity and diversity (hub id or folder).")
@click.option("--clip-model", default=None, help="CLIP model for alignment (hub id or folder).")
@click.option("--no-base", is_flag=True, help="Leave out the base model's reference row.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(concept, images, methods, out, model, token, steps, seed, config_file, prompts_file, metrics, image_encoder,
            clip_model, no_base, quiet) -> None:
    """Train several methods with the same seed and steps, score them, write a report (finished runs are reused)."""
    specs = parse_method_specs(methods or DEFAULT_METHODS)
    command = "fa-sd " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("--debug", "-v", "--verbose"))
    request = CompareRequest(concept, images, specs, Path(out), model, token, steps, seed, config_file,
                             prompts_file=prompts_file, metrics=metrics,
                             image_encoder=image_encoder or DEFAULT_IMAGE_ENCODER,
                             clip_model=clip_model or DEFAULT_CLIP_MODEL, include_base=not no_base,
                             progress=not quiet, command=command)
    records = run_comparison(request)
    click.echo(table_markdown(records))
    click.echo(f"Report: {Path(out) / 'report.md'}")


@cli.command()
@click.option("--concept", required=True, help="Name of the concept; the trigger token defaults to <NAME>.")
@click.option("--images", required=True, help="Folder of the concept's images.")
@click.option("--methods", "methods", required=True,
              help="Comma-separated method[:preset or key=value,...] as for compare; lr= pins one rate instead "
                   "of the method's grid.")
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated training seeds of every run.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Training steps of every run.")
@click.option("--score-every", type=int, default=100, show_default=True, help="Steps between scored checkpoints.")
@click.option("--out", default="frontier", show_default=True, help="Report folder (runs are kept in OUT/runs).")
@click.option("--model", help="Base model (default: the bundled tiny model).")
@click.option("--token", help="Trigger token (default: <concept>).")
@click.option("--config", "config_file", help="YAML file of training settings shared by every run.")
@click.option("--prompts-file", help="Prompt-set YAML (default: configs/eval/tiny.yaml or dreambooth.yaml).")
@click.option("--fidelity-level", type=float, help="A second fidelity level for the matched table.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def frontier(concept, images, methods, seeds, steps, score_every, out, model, token, config_file, prompts_file,
             fidelity_level, quiet) -> None:
    """Sweep each method over a learning-rate grid and seeds, score checkpoints, write Pareto fronts (resumable)."""
    from .evaluation.frontier import FrontierRequest, run_frontier
    from .evaluation.frontier_report import write_tables

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserInputError(f"--seeds expects comma-separated integers, got {seeds!r}.") from None
    request = FrontierRequest(concept, images, parse_method_specs(methods), Path(out), seeds=seed_list, steps=steps,
                              score_every=score_every, model=model, token=token, config_file=config_file,
                              prompts_file=prompts_file, progress=not quiet)
    points, costs = run_frontier(request)
    title = f"{concept}: {len(request.specs)} methods x lr grid x seeds {seeds}, {steps} steps, scored every {score_every}"
    click.echo(write_tables(points, costs, Path(out), title, fidelity_level))
    click.echo(f"Points: {Path(out) / 'frontier.json'}")


def main() -> None:
    """Entry point: run the CLI, turning errors into one-line messages and exit codes."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(128 + signal.SIGINT)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except FilterAtomError as exc:  # user mistakes exit 2, the library's other failures 1
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR if isinstance(exc, UserInputError) else EXIT_FAILURE)
    except OUT_OF_MEMORY_ERRORS as exc:
        if debug:
            raise
        click.echo(f"Error: out of memory ({type(exc).__name__}); try --gradient-checkpointing, a smaller "
                   "--batch-size or a lower --resolution.", err=True)
        sys.exit(EXIT_FAILURE)
    except Exception as exc:  # anything unexpected: one line unless --debug
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"Error: unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
        sys.exit(EXIT_FAILURE)
