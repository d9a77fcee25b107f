"""Train the toy-world text-to-image model on the CPU and write it in diffusers layout (fp16 safetensors).

    .venv/bin/python bench/toyworld_train.py --out tests/data/toyworld/model --minutes 58

Three phases, each bounded by wall time: the VAE (reconstruction + a small KL term), the latent scale (the
VAE config's ``scaling_factor`` = 1 / std of the latents), then the UNet and the CLIP text encoder together
(epsilon prediction on SD1.x's schedule, min-SNR weighting, 10 % empty captions for classifier-free guidance,
an EMA of the weights is what gets saved). One thread (``--threads``). A checkpoint is written every
``--save-every`` minutes, so a partial run is usable. See docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zerocon_core.toyworld import model as tm
from zerocon_core.toyworld.world import render_batch, scenes

logger = logging.getLogger("zerocon")
TRAIN_SEED = 0  # training scenes come from this seed; held-out edits use others (toyworld.edits)


@dataclass
class TrainSettings:
    out: Path
    minutes: float = 58.0
    vae_minutes: float = 7.0
    dataset: int = 20000
    vae_batch: int = 32
    batch: int = 64
    lr: float = 1e-3
    drop_caption: float = 0.1
    ema: float = 0.999
    save_every: float = 10.0
    threads: int = 1
    seed: int = 0


def train_vae(vae, s: TrainSettings, deadline: float) -> int:
    """Train ``vae`` on fresh random scenes until ``deadline`` (time.time()); returns the step count."""
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    rng_seed, step = 10_000, 0
    while time.time() < deadline:
        x = torch.from_numpy(render_batch(scenes(rng_seed + step, s.vae_batch))) * 2 - 1
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            logger.info("vae step %d loss %.5f kl %.3f", step, loss.item(), kl.item())
    return step


@torch.no_grad()
def encode_dataset(vae, s: TrainSettings) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(mean, std, captions)`` of the VAE posterior on the training scenes (unscaled latents)."""
    data = scenes(TRAIN_SEED, s.dataset)
    means, stds = [], []
    for i in range(0, len(data), 256):
        x = torch.from_numpy(render_batch(data[i : i + 256])) * 2 - 1
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), [sc.caption for sc in data]


def _alphas() -> torch.Tensor:
    cfg = tm.scheduler_config()
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    return torch.cumprod(1 - betas, 0)


def _ema_update(ema, live, decay: float) -> None:
    with torch.no_grad():
        for pe, pl in zip(ema.parameters(), live.parameters()):
            pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)


class DiffusionTrainer:
    """The UNet + text-encoder phase over pre-encoded latents."""

    def __init__(self, unet, text, tokenizer, latents, captions, s: TrainSettings) -> None:
        self.unet, self.text, self.s = unet, text, s
        self.mean, self.std = latents
        ids = tokenizer(captions + [""], padding="max_length", max_length=tm.MAX_LENGTH, return_tensors="pt")
        self.ids, self.empty = ids.input_ids[:-1], ids.input_ids[-1]
        self.alphas = _alphas()
        self.params = list(unet.parameters()) + list(text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=0.01)
        self.ema_unet, self.ema_text = copy.deepcopy(unet), copy.deepcopy(text)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.step = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.ids), (self.s.batch,), generator=self.gen)
        z = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=self.gen)
        ids = self.ids[idx].clone()
        drop = torch.rand(self.s.batch, generator=self.gen) < self.s.drop_caption
        ids[drop] = self.empty
        return z, ids

    def train_step(self, scale: float) -> float:
        z0, ids = self.batch()
        z0 = z0 * scale
        t = torch.randint(0, len(self.alphas), (z0.shape[0],), generator=self.gen)
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = torch.randn(z0.shape, generator=self.gen)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = self.unet(zt, t, self.text(ids).last_hidden_state).sample
        snr = (a / (1 - a)).view(-1)
        w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
        loss = (w * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        for g in self.opt.param_groups:
            g["lr"] = self.s.lr * min(1.0, (self.step + 1) / 200)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(self.s.ema, (1 + self.step) / (10 + self.step))
        _ema_update(self.ema_unet, self.unet, decay)
        _ema_update(self.ema_text, self.text, decay)
        self.step += 1
        return loss.item()


def _save(vae, trainer: DiffusionTrainer, tok_dir: Path, out: Path, info: dict) -> None:
    tm.save_model(out, vae, trainer.ema_unet, trainer.ema_text, tok_dir)
    (out / "training.json").write_text(json.dumps(info, indent=2))
    logger.info("saved %s (step %d)", out, trainer.step)


def train(s: TrainSettings) -> dict:
    """Run the three phases within ``s.minutes`` and write the model to ``s.out``; returns the run's facts."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    start = time.time()
    tok_dir = tm.write_tokenizer(s.out / "tokenizer")
    tokenizer = tm.load_tokenizer(tok_dir)
    vae, unet, text = tm.build_parts(len(tokenizer), s.seed)
    vae_steps = train_vae(vae, s, start + 60 * s.vae_minutes)
    vae.eval().requires_grad_(False)
    mean, std, captions = encode_dataset(vae, s)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    logger.info("vae: %d steps, latent scale %.4f, %.1f min", vae_steps, scale, (time.time() - start) / 60)
    trainer = DiffusionTrainer(unet, text, tokenizer, (mean, std), captions, s)
    info = dict(vae_steps=vae_steps, scaling_factor=scale, batch=s.batch, threads=s.threads, dataset=s.dataset)
    deadline, next_save, losses = start + 60 * s.minutes, time.time() + 60 * s.save_every, []
    while time.time() < deadline:
        losses.append(trainer.train_step(scale))
        if trainer.step % 50 == 0:
            logger.info(
                "unet step %d loss %.4f (%.1f min)", trainer.step, np.mean(losses[-50:]), (time.time() - start) / 60
            )
        if time.time() > next_save:
            info.update(unet_steps=trainer.step, minutes=(time.time() - start) / 60, loss=float(np.mean(losses[-200:])))
            _save(vae, trainer, tok_dir, s.out, info)
            next_save = time.time() + 60 * s.save_every
    info.update(unet_steps=trainer.step, minutes=(time.time() - start) / 60, loss=float(np.mean(losses[-200:])))
    _save(vae, trainer, tok_dir, s.out, info)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=TrainSettings.minutes, help="total wall-time budget")
    p.add_argument("--vae-minutes", type=float, default=TrainSettings.vae_minutes)
    p.add_argument("--threads", type=int, default=TrainSettings.threads)
    p.add_argument("--save-every", type=float, default=TrainSettings.save_every, help="minutes between checkpoints")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    s = TrainSettings(args.out, args.minutes, args.vae_minutes, threads=args.threads, save_every=args.save_every)
    info = train(s)
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
