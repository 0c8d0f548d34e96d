"""The concept-training loop (accelerate): cached latents and prompt embeddings, one method's adapter trained.

Random numbers of step s come from a generator seeded by (seed, s, process), so a run is
reproducible and a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.adapter_file import save_adapter
from ..core.fingerprint import fingerprint
from ..core.inject import add_adapter
from ..core.layer import set_train_path, set_weight_recompute
from ..core.token_embedding import TOKEN_EMBEDDING_KEY, TrainableToken
from ..core.method import AdapterMethod
from ..errors import ConfigError, DataError, TrainingError
from ..evaluation.best_step import Choice
from ..methods.registry import method_class
from ..models import load_pipeline, model_label
from .accelerate_setup import compile_unet, make_accelerator, plain_model
from .checkpoint import load_checkpoint, save_checkpoint
from .data import check_image_shapes, instance_prompts, load_concept_images
from .latents import encode_prompts, latent_set, prompt_ids
from .model_card import write_model_card
from .preflight import (CONFIG_NAME, bytes_needed, bytes_reused, check_class_images_folder, check_free_space,
                        check_output_dir, check_output_writable, previous_concept)
from .monitor import CURVE_FILE, TrainingMonitor, monitor_due
from .prior import prepare_class_images
from .resume import CheckpointRecord, check_resumable, find_checkpoint, read_record
from .run_folder import RunLock, check_not_foreign, clean_interrupted_writes, clear_previous_run
from .run_identity import check_resume_steps, content_hash, run_identity
from .reporting import validate
from .settings import TrainingSettings, write_settings

logger = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint and the current adapter were saved."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"Interrupted at step {step}; a checkpoint and the adapter were saved.")


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_path: Path
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    skipped_steps: int = 0
    kept_step: int = 0
    kept_reason: str = ""
    stopped_early: str | None = None
    monitor_seconds: float = 0.0


def build_method(settings: TrainingSettings) -> AdapterMethod:
    """The adapter method named in the settings, with its options."""
    cls = method_class(settings.method)
    options = dict(settings.method_options)
    if settings.method == "filter-atoms" and settings.preset is not None:
        options.setdefault("preset", settings.preset)
    return cls.from_config_dict(options)


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + process * 104_729) % (2**63))


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalGuard":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. in a notebook worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(settings: TrainingSettings, resume: bool | str | os.PathLike = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train one adapter on a concept folder; every user mistake is found before anything is written.

    `resume`: True continues from the newest checkpoint in the output folder; a checkpoint's path, from that one.
    """
    settings.validate()
    images = load_concept_images(settings.images)
    check_image_shapes(images, settings.resolution)
    check_class_images_folder(settings.images, settings.class_images)
    check_output_writable(settings.output_path)
    check_not_foreign(settings.output_path, overwrite)
    check_output_dir(settings, bool(resume), overwrite)
    method = build_method(settings)
    accelerator = make_accelerator(settings)
    lock = RunLock(settings.output_path).acquire() if accelerator.is_main_process else None
    try:
        check_output_dir(settings, bool(resume), overwrite)  # again under the lock: another run may have finished since
        record = _checkpoint_to_resume(settings, resume)
        if lock is not None:
            _prepare_output_dir(settings, overwrite)
        accelerator.wait_for_everyone()
        return _train(settings, record, progress, images, method, accelerator, lock)
    finally:
        if lock is not None:
            lock.release(remove_created=True)


def _checkpoint_to_resume(settings: TrainingSettings, resume: bool | str | os.PathLike) -> CheckpointRecord | None:
    if not resume:
        return None
    record = read_record(find_checkpoint(settings.output_path / "checkpoints", resume))
    check_resume_steps(record.step, settings.steps, record.path)
    return record


def _prepare_output_dir(settings: TrainingSettings, overwrite: bool) -> None:
    """Under the lock: remove what killed writes left, and on --overwrite the earlier run's outputs."""
    out = settings.output_path
    clean_interrupted_writes(out)
    if overwrite:
        clear_previous_run(out, {settings.concept} | {c for c in [previous_concept(out)] if c})


def _train(settings: TrainingSettings, record: CheckpointRecord | None, progress: bool, images, method: AdapterMethod,
           accelerator, lock: RunLock | None) -> TrainResult:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    lr, _ = settings.learning_rate()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_pipeline(settings.model)
    out = settings.output_path
    device = accelerator.device

    class_images = prepare_class_images(pipe, settings, accelerator) if settings.prior_preservation else None
    pipe.to(device)
    unet = pipe.unet
    token = TrainableToken(pipe, settings.trigger, settings.token_init) if settings.train_token else None
    count = add_adapter(unet, method)
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if token is not None:
        params[TOKEN_EMBEDDING_KEY] = token.vector
    identity = run_identity(settings.to_dict(), lr, content_hash([i.path for i in images], [i.caption for i in images]),
                            None if class_images is None else
                            content_hash([i.path for i in class_images], [i.caption for i in class_images]),
                            fingerprint(unet, method.targets)["digest"])
    if record is not None:
        check_resumable(record, identity, settings.to_dict())
    trainable = sum(p.numel() for p in params.values())
    check_free_space(out, bytes_needed(trainable, settings) - bytes_reused(out, trainable, settings))
    pipe.vae.requires_grad_(False).eval().to(dtype=weight_dtype)
    pipe.text_encoder.requires_grad_(False).eval().to(dtype=weight_dtype)
    unet.to(dtype=weight_dtype)
    for p in params.values():
        p.data = p.data.float()  # trained parameters stay fp32 under mixed precision
    set_train_path(unet, settings.train_path)
    if settings.gradient_checkpointing:  # trade compute for memory in the adapter's layers too
        unet.enable_gradient_checkpointing()
        set_weight_recompute(unet, True)
    unet.train()

    if settings.instance_prompt:
        prompts = [i.caption or settings.instance_prompt for i in images]
    else:
        prompts = instance_prompts(images, settings.trigger, settings.prompt_templates)
    masks = [i.mask for i in images]
    if settings.masked_loss and not any(m is not None for m in masks):
        raise DataError(f"--masked-loss needs images with transparency (an alpha channel) in {settings.images}.")
    instance = latent_set(pipe, [i.image for i in images], prompts, settings, device, weight_dtype, 0, masks)
    if token is not None:
        ids = prompt_ids(pipe, instance.prompts, device)
        instance.encode_each_step(lambda: pipe.text_encoder(ids)[0].float())
    if settings.caption_dropout > 0:
        instance.drop_captions(settings.caption_dropout, encode_prompts(pipe, [""], device)[0])
    prior = None
    if class_images is not None:
        prior = latent_set(pipe, [i.image for i in class_images], [i.caption for i in class_images], settings,
                            device, weight_dtype, 1)

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    groups = [{"params": [p for n, p in params.items() if n != TOKEN_EMBEDDING_KEY]}]
    if token is not None:  # its own rate, and no decay pulling the embedding towards zero
        groups.append({"params": [token.vector], "lr": settings.token_lr, "weight_decay": 0.0})
    # foreach: one kernel per op over all tensors, bit for bit the per-tensor loop (torch picks it on CUDA only)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=settings.adam_weight_decay, foreach=True)
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                                 num_training_steps=settings.steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet = compile_unet(settings, unet)

    start_step, losses = 0, []
    checkpoints = out / "checkpoints"
    if record is not None:
        state = load_checkpoint(record.path, params, optimizer, lr_scheduler)
        start_step, losses = state.step, state.losses
        logger.info("resuming from %s (step %d)", record.path, start_step)

    if accelerator.is_main_process:
        write_settings(settings, out / CONFIG_NAME)
        lock.keep_folders()
    run = {"identity": identity, "settings": settings.to_dict()}
    accelerator.init_trackers(settings.concept)
    monitor = None
    if settings.monitor and accelerator.is_main_process:
        count_views = min(8, len(instance.mean))  # a few views: the concept fit is a trend, not an estimate
        monitor = TrainingMonitor.start(settings, pipe, out, [i.image for i in images],
                                        instance.mean[:count_views] * instance.scaling,
                                        instance.view_prompts[:count_views], plain_model(accelerator, unet),
                                        start_step, settings.model is None, accelerator)

    started, skipped, last_step = time.time(), 0, start_step
    bar = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps,
               disable=not (progress and accelerator.is_local_main_process), desc=settings.concept)
    adapter_path = out / f"{settings.concept}.safetensors"
    with _SignalGuard() as guard:
        for step in bar:
            generator = _step_generator(settings.seed, step, accelerator.process_index)
            step_loss, finite = 0.0, True
            for _ in range(settings.gradient_accumulation_steps):
                with accelerator.accumulate(unet):
                    loss = _loss(unet, instance, prior, settings, noise_scheduler, alphas_cumprod, prediction,
                                 generator, device, weight_dtype)
                    if not torch.isfinite(loss):
                        finite = False
                    else:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            if token is not None and accelerator.num_processes > 1:
                                _average_token_gradient(accelerator, token)
                            norm = accelerator.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
                            finite = bool(torch.isfinite(torch.as_tensor(norm)))
                        if finite:
                            optimizer.step()
                            lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step_loss += loss.item() / settings.gradient_accumulation_steps
            if not finite:
                skipped += 1
                if settings.on_nan == "stop":
                    raise TrainingError(f"The loss or its gradient became NaN/inf at step {step}; the last checkpoint is kept.")
                logger.warning("step %d: non-finite loss or gradient, step skipped", step)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            done = last_step = step + 1
            if monitor_due(settings, done):
                if monitor is not None:
                    monitor.observe(plain_model(accelerator, unet), done, accelerator, params)
                    if monitor.stopped_early:
                        accelerator.set_trigger()
                if settings.max_drift is not None and accelerator.check_trigger():
                    break
            if done % settings.checkpoint_every == 0 and done < settings.steps:
                _save_checkpoint(accelerator, unet, token, checkpoints, done, params, optimizer, lr_scheduler, losses, settings, run)
            if settings.validation_prompts and done % settings.validation_every == 0 and accelerator.is_main_process:
                validate(pipe, plain_model(accelerator, unet), settings, out / "samples" / f"step-{done:06d}.png")
            if guard.received is not None:
                _save_checkpoint(accelerator, unet, token, checkpoints, done, params, optimizer, lr_scheduler, losses, settings, run)
                _save_adapter(accelerator, unet, token, adapter_path, settings, done)
                raise TrainingInterrupted(guard.received, done)
    bar.close()

    accelerator.wait_for_everyone()
    seconds = time.time() - started
    unwrapped = plain_model(accelerator, unet)
    kept = _keep(settings, monitor, params, last_step)
    _save_adapter(accelerator, unet, token, adapter_path, settings, kept.step)
    monitor_seconds = 0.0
    if accelerator.is_main_process:
        grid = validate(pipe, unwrapped, settings, out / "samples" / "final.png")
        summary = None
        if monitor is not None:
            monitor_seconds = sum(r["seconds"] for r in monitor.records if r["step"] > start_step)
            monitor.finish(kept, seconds - monitor_seconds)
            summary = {"kept_step": kept.step, "steps": last_step, "reason": kept.reason, "curve": CURVE_FILE,
                       "stopped_early": monitor.stopped_early}
        write_model_card(out, settings, model_label(settings.model), method.name, count, grid, losses, summary)
    accelerator.end_training()
    return TrainResult(out, adapter_path, count, losses, seconds, skipped, kept.step, kept.reason,
                       monitor.stopped_early if monitor else None, monitor_seconds)


def _keep(settings: TrainingSettings, monitor: TrainingMonitor | None, params: dict, last_step: int) -> Choice:
    """The step whose adapter is written (its parameters restored into `params`), and why."""
    if monitor is None:
        return Choice(last_step, "the last step (the drift monitor is off)", False)
    if settings.keep == "last":
        return Choice(last_step, "the last step (--keep last)", False)
    choice = monitor.choice
    if choice is None:
        return Choice(last_step, "the last step (no monitored step after step 0)", False)
    if choice.step != last_step:
        saved = monitor.kept_params(choice)
        if saved is None or set(saved) != set(params):
            logger.warning("the parameters of step %d were not kept; the adapter is the last step's", choice.step)
            return Choice(last_step, "the last step (the chosen step's parameters were not found)", False)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name].to(param.dtype))
    return choice


def _loss(unet, instance, prior, settings, noise_scheduler, alphas_cumprod, prediction, generator, device, dtype):
    latents, embeddings, weights = instance.sample(settings.batch_size, generator)
    if prior is not None:
        class_latents, class_embeddings, class_weights = prior.sample(settings.batch_size, generator)
        latents, embeddings = torch.cat([latents, class_latents]), torch.cat([embeddings, class_embeddings])
        weights = torch.cat([weights, class_weights])
    noise = torch.randn(latents.shape, generator=generator)
    if settings.noise_offset:  # a per-channel constant: lets the model change an image's overall brightness
        noise = noise + settings.noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=generator)
    noise = noise.to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ConfigError(f"Unsupported prediction type {prediction!r} in the scheduler config.")
    pred = unet(noisy.to(dtype), timesteps, embeddings.to(dtype)).sample.float()
    squared = F.mse_loss(pred, target, reduction="none") * weights  # weights are 1 unless --masked-loss
    per_sample = squared.mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3)).clamp_min(1e-6)
    if settings.min_snr_gamma is not None:
        per_sample = per_sample * snr_weights(alphas_cumprod, timesteps, settings.min_snr_gamma,
                                              prediction == "v_prediction")
    if prior is None:
        return per_sample.mean()
    own, cls = per_sample.chunk(2)
    return own.mean() + settings.prior_loss_weight * cls.mean()


def _average_token_gradient(accelerator, token: TrainableToken) -> None:
    # DDP averages the UNet's gradients across processes; the token's vector lives outside it
    grad = token.vector.grad if token.vector.grad is not None else torch.zeros_like(token.vector)
    token.vector.grad = accelerator.reduce(grad, reduction="mean")


def _save_checkpoint(accelerator, unet, token, folder, step, params, optimizer, lr_scheduler, losses, settings,
                     run) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(folder, step, params, optimizer, lr_scheduler, losses, settings.checkpoints_total_limit, run,
                        write_adapter=lambda into: _save_adapter(
                            accelerator, unet, token, into / f"{settings.concept}.safetensors", settings, step))


def _save_adapter(accelerator, unet, token: TrainableToken | None, path: Path, settings: TrainingSettings,
                  step: int) -> None:
    if accelerator.is_main_process:
        save_adapter(plain_model(accelerator, unet), path, metadata={
            "token": settings.trigger, "concept": settings.concept, "base_model": model_label(settings.model),
            "steps": str(settings.steps), "step": str(step), "seed": str(settings.seed)},
            token_embedding=None if token is None else token.state())
