"""Pretrain the bundled tiny Stable Diffusion (assets/tiny-sd) on procedurally generated shapes.

Stages: (1) the VAE on 64x64 images, (2) encode a fixed, seeded set of captioned images to
latents, (3) the UNet and the text encoder together on the usual noise-prediction loss, with
10% empty captions so classifier-free guidance works. Every stage checkpoints into --work-dir
and a rerun resumes where it stopped; the same seed gives the same model.

    python scripts/pretrain_tiny.py                 # full run (about an hour on 2 CPU cores)
    python scripts/pretrain_tiny.py --unet-steps 200 --vae-steps 100 --out /tmp/tiny  # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from filteratom_sd.tiny_domain import caption_vocabulary, random_example
from filteratom_sd.tiny_tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("pretrain_tiny")

# Words beyond the captions that prompts commonly use; giving them whole-word tokens costs nothing.
EXTRA_WORDS = ["the", "an", "and", "with", "image", "shape", "is", "at", "by", "near"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_model.json"))
    parser.add_argument("--out", default=str(ROOT / "assets" / "tiny-sd"))
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
    return parser.parse_args()


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


def train_vae(cfg: dict, args: argparse.Namespace, work: Path) -> AutoencoderKL:
    """Stage 1: reconstruction + a small KL term, on freshly generated images."""
    final = work / "vae.pt"
    vae = AutoencoderKL(**cfg["vae"])
    if final.exists():
        vae.load_state_dict(torch.load(final)["model"])
        return vae
    ckpt = work / "vae_ckpt.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    step, data_rng = 0, random.Random(args.seed + 1)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step, data_rng = state["step"], state["data_rng"]
        set_rng_state(state["rng"])
    start = time.time()
    vae.train()
    while step < args.vae_steps:
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
        if step % 50 == 0:
            logger.info("vae step %d/%d loss %.5f kl %.4f (%.1fs)", step, args.vae_steps, loss.item(), kl.item(), time.time() - start)
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                   "data_rng": data_rng, "rng": rng_state()})
    save_checkpoint(final, {"model": vae.state_dict()})
    return vae


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, args: argparse.Namespace, work: Path) -> dict:
    """Stage 2: a fixed set of captioned images, encoded once (mean and std of each latent)."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
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
    data = {"mean": mean, "std": std, "captions": captions, "scaling_factor": scaling}
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


def train_unet(cfg: dict, args: argparse.Namespace, work: Path, data: dict, tokenizer) -> tuple:
    """Stage 3: UNet + text encoder on the noise-prediction loss, with an EMA copy of both."""
    unet = UNet2DConditionModel(**cfg["unet"])
    text_encoder = build_text_encoder(cfg, tokenizer)
    ema_unet = UNet2DConditionModel(**cfg["unet"])
    ema_text = build_text_encoder(cfg, tokenizer)
    ema_unet.load_state_dict(unet.state_dict()), ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    scheduler = DDPMScheduler(**cfg["scheduler"])
    ckpt = work / "unet_ckpt.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        set_rng_state(state["rng"])
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    tokens = tokenizer(data["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    alphas = scheduler.alphas_cumprod
    n = len(data["captions"])
    unet.train(), text_encoder.train()
    start, running = time.time(), None
    while step < args.unet_steps:
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
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            logger.info("unet step %d/%d loss %.4f (%.1fs)", step, args.unet_steps, running, time.time() - start)
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            save_checkpoint(ckpt, {"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                                   "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                                   "opt": opt.state_dict(), "step": step, "rng": rng_state(), "loss": running})
    return ema_unet, ema_text, running


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
    (work / "args.json").write_text(json.dumps(vars(args), indent=2))
    cfg = json.loads(Path(args.config).read_text())
    seed_everything(args.seed)
    tokenizer = build_tokenizer(caption_vocabulary() + EXTRA_WORDS, cfg["text_encoder"]["max_position_embeddings"])
    started = time.time()
    vae = train_vae(cfg, args, work)
    data = encode_dataset(vae, args, work)
    seed_everything(args.seed + 3)
    unet, text_encoder, final_loss = train_unet(cfg, args, work, data, tokenizer)
    pipe = assemble(cfg, vae, text_encoder, tokenizer, unet, data["scaling_factor"])
    out = Path(args.out)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    summary = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
               "batch_size": args.batch_size, "lr": args.lr, "dataset_size": args.dataset_size,
               "final_loss": final_loss, "wall_seconds_this_run": round(time.time() - started, 1),
               "threads": torch.get_num_threads()}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("saved %s: %s", out, summary)


if __name__ == "__main__":
    main()
