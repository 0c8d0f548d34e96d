"""Pretrain the bundled tiny Stable Diffusion (filteratom_sd/resources/tiny-sd) on procedurally generated shapes.

Stages: (1) the VAE on 64x64 images, (2) encode a fixed, seeded set of captioned images to
latents, (3) the UNet and the text encoder together on the usual noise-prediction loss, with
10% empty captions so classifier-free guidance works. Every stage checkpoints into --work-dir
and a rerun resumes where it stopped; the same seed gives the same model.

    python scripts/pretrain_tiny.py                 # full run (about an hour on 2 CPU cores), then eval + model card
    python scripts/pretrain_tiny.py                 # the same command again resumes from .pretrain/
    # smoke run (a few minutes):
    python scripts/pretrain_tiny.py --vae-steps 100 --unet-steps 200 --dataset-size 1024 --work-dir runs/smoke/work --out runs/smoke/tiny-sd --eval-prompts 16 --eval-seeds 1

A work folder belongs to one set of training settings: rerunning with different ones is refused
(use another --work-dir). --max-steps-this-run stops early (after a checkpoint) to be resumed later.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from filteratom_sd.resources import bundled_model_dir, config_path
from filteratom_sd.tiny.domain import caption_vocabulary, random_example
from filteratom_sd.tiny.model_card import evaluate, model_card
from filteratom_sd.tiny.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# Settings that change the trained weights: a work folder is only resumed with the same values.
TRAINING_KEYS = ("config_sha256", "seed", "vae_steps", "vae_batch_size", "dataset_size", "unet_steps", "batch_size",
                 "lr", "ema_decay")
logger = logging.getLogger("pretrain_tiny")

# Words beyond the captions that prompts commonly use; giving them whole-word tokens costs nothing.
EXTRA_WORDS = ["the", "an", "and", "with", "image", "shape", "is", "at", "by", "near"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(config_path("tiny_model.json")))
    parser.add_argument("--out", default=str(bundled_model_dir()))
    parser.add_argument("--work-dir", default=str(ROOT / ".pretrain"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=12288)
    parser.add_argument("--unet-steps", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--max-steps-this-run", type=int, default=0,
                        help="stop after this many optimizer steps (0: run to the end); rerun to resume")
    return parser.parse_args()


class StepBudget:
    """Optimizer steps this invocation may still take (None: unlimited)."""

    def __init__(self, steps: int) -> None:
        self.left = steps if steps > 0 else None

    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1


def check_work_dir(work: Path, settings: dict) -> None:
    """Refuse to resume a work folder that was started with different training settings."""
    path = work / "args.json"
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = [k for k in TRAINING_KEYS if k in previous and previous[k] != settings[k]]
    if changed:
        raise SystemExit(f"{work} holds a run with different {', '.join(changed)}; use another --work-dir or delete it.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def lr_at(step: int, total: int, peak: float, warmup: int = 250) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(cfg: dict, args: argparse.Namespace, work: Path, budget: StepBudget, stats: dict) -> AutoencoderKL | None:
    """Stage 1: reconstruction + a small KL term, on freshly generated images (None: stopped early)."""
    final = work / "vae.pt"
    vae = AutoencoderKL(**cfg["vae"])
    if final.exists():
        state = torch.load(final, weights_only=False)
        vae.load_state_dict(state["model"])
        if "rng" in state:
            set_rng_state(state["rng"])
        stats.update(vae_seconds=state.get("seconds"), vae_final_loss=state.get("loss"))
        return vae
    ckpt = work / "vae_ckpt.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    step, data_rng, elapsed, loss = 0, random.Random(args.seed + 1), 0.0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, data_rng, elapsed = state["step"], state["data_rng"], state.get("seconds", 0.0)
        set_rng_state(state["rng"])
        logger.info("resumed the VAE at step %d", step)
    start = time.time()
    vae.train()
    while step < args.vae_steps:
        if budget.exhausted():
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "data_rng": data_rng, "rng": rng_state(), "seconds": elapsed + time.time() - start})
            return None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.lr, warmup=100)
        images = to_tensor([random_example(data_rng).image for _ in range(args.vae_batch_size)])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        loss = F.mse_loss(recon, images) + 1e-3 * kl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        budget.take()
        if step % 50 == 0:
            logger.info("vae step %d/%d loss %.5f kl %.4f (%.1fs)", step, args.vae_steps, loss.item(), kl.item(), time.time() - start)
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "data_rng": data_rng, "rng": rng_state(), "seconds": elapsed + time.time() - start})
    seconds, last = elapsed + time.time() - start, (None if loss is None else loss.item())
    save_checkpoint(final, {"model": vae.state_dict(), "rng": rng_state(), "seconds": seconds, "loss": last})
    stats.update(vae_seconds=seconds, vae_final_loss=last)
    return vae


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, args: argparse.Namespace, work: Path) -> dict:
    """Stage 2: a fixed set of captioned images, encoded once (mean and std of each latent)."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    started = time.time()
    data_rng = random.Random(args.seed + 2)
    vae.eval()
    means, stds, captions = [], [], []
    for start in range(0, args.dataset_size, 256):
        batch = [random_example(data_rng) for _ in range(min(256, args.dataset_size - start))]
        dist = vae.encode(to_tensor([e.image for e in batch])).latent_dist
        means.append(dist.mean), stds.append(dist.std)
        captions += [e.caption for e in batch]
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / torch.cat([mean.flatten(), (mean + std * torch.randn_like(std)).flatten()]).std())
    data = {"mean": mean, "std": std, "captions": captions, "scaling_factor": scaling, "seconds": time.time() - started}
    save_checkpoint(path, data)
    logger.info("encoded %d images, latent scaling factor %.4f", len(captions), scaling)
    return data


def build_text_encoder(cfg: dict, tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg["text_encoder"],
    )
    return CLIPTextModel(config)


def train_unet(cfg: dict, args: argparse.Namespace, work: Path, data: dict, tokenizer, budget: StepBudget,
               stats: dict) -> tuple | None:
    """Stage 3: UNet + text encoder on the noise-prediction loss, with an EMA copy of both (None: stopped early)."""
    unet = UNet2DConditionModel(**cfg["unet"])
    text_encoder = build_text_encoder(cfg, tokenizer)
    ema_unet = UNet2DConditionModel(**cfg["unet"])
    ema_text = build_text_encoder(cfg, tokenizer)
    ema_unet.load_state_dict(unet.state_dict()), ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    scheduler = DDPMScheduler(**cfg["scheduler"])
    ckpt = work / "unet_ckpt.pt"
    step, elapsed, running = 0, 0.0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step, elapsed, running = state["step"], state.get("seconds", 0.0), state.get("loss")
        set_rng_state(state["rng"])
        logger.info("resumed the UNet and text encoder at step %d", step)
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    tokens = tokenizer(data["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    alphas = scheduler.alphas_cumprod
    n = len(data["captions"])
    unet.train(), text_encoder.train()
    start = time.time()

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                               "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                               "opt": opt.state_dict(), "step": step, "rng": rng_state(), "loss": running,
                               "seconds": elapsed + time.time() - start})

    while step < args.unet_steps:
        if budget.exhausted():
            checkpoint()
            return None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr)
        idx = torch.randint(0, n, (args.batch_size,))
        latents = (data["mean"][idx] + data["std"][idx] * torch.randn_like(data["std"][idx])) * data["scaling_factor"]
        ids = tokens[idx].clone()
        drop = torch.rand(args.batch_size) < 0.1
        ids[drop] = empty
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        budget.take()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            logger.info("unet step %d/%d loss %.4f (%.1fs)", step, args.unet_steps, running, time.time() - start)
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            checkpoint()
    stats.update(unet_seconds=elapsed + time.time() - start, final_loss=running)
    return ema_unet, ema_text


def assemble(cfg: dict, vae, text_encoder, tokenizer, unet, scaling: float) -> StableDiffusionPipeline:
    vae.register_to_config(scaling_factor=scaling)
    scheduler = DPMSolverMultistepScheduler(**cfg["scheduler"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_text = Path(args.config).read_text()
    settings = {**vars(args), "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}
    check_work_dir(work, settings)
    (work / "args.json").write_text(json.dumps(settings, indent=2))
    cfg = json.loads(config_text)
    seed_everything(args.seed)
    tokenizer = build_tokenizer(caption_vocabulary() + EXTRA_WORDS, cfg["text_encoder"]["max_position_embeddings"])
    started, budget, stats = time.time(), StepBudget(args.max_steps_this_run), {}
    vae = train_vae(cfg, args, work, budget, stats)
    if vae is None:
        logger.info("stopped after %d steps in the VAE stage; rerun the same command to resume", args.max_steps_this_run)
        return
    data = encode_dataset(vae, args, work)
    seed_everything(args.seed + 3)
    trained = train_unet(cfg, args, work, data, tokenizer, budget, stats)
    if trained is None:
        logger.info("stopped after %d steps in the UNet stage; rerun the same command to resume", args.max_steps_this_run)
        return
    unet, text_encoder = trained
    pipe = assemble(cfg, vae, text_encoder, tokenizer, unet, data["scaling_factor"])
    out = Path(args.out)
    pipe.to(torch.float16)
    # transformers loads a model in its stored dtype: an fp32 text encoder (0.8 MB) lets a plain
    # from_pretrained(path) run on a CPU, while diffusers loads the fp16 UNet and VAE in fp32 anyway
    pipe.text_encoder.to(torch.float32)
    pipe.save_pretrained(str(out), safe_serialization=True)
    stage_seconds = [stats.get("vae_seconds"), data.get("seconds"), stats.get("unet_seconds")]
    summary = {"seed": args.seed, "vae_steps": args.vae_steps, "vae_batch_size": args.vae_batch_size,
               "unet_steps": args.unet_steps, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
               "dataset_size": args.dataset_size, "vae_final_loss": stats.get("vae_final_loss"),
               "final_loss": stats.get("final_loss"),
               "vae_seconds": _round(stats.get("vae_seconds")), "encode_seconds": _round(data.get("seconds")),
               "unet_seconds": _round(stats.get("unet_seconds")),
               "train_seconds": _round(sum(stage_seconds)) if None not in stage_seconds else None,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "transformers": transformers.__version__}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("saved %s: %s", out, summary)
    if args.eval_prompts > 0 and args.eval_seeds > 0:
        metrics = evaluate(out, args.eval_prompts, args.eval_seeds)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "README.md").write_text(model_card(out, metrics, summary))
        logger.info("measured %s; wrote %s", metrics, out / "README.md")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    main()
