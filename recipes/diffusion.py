"""Diffusion on MNIST: a class-conditional DDPM with classifier-free guidance, sampled in a few DDIM steps.

Forward process: T = 1000 small Gaussian steps turn a digit into noise. With a_t = prod(1 - beta_s), the
noisy image at any step is one draw, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, and at t = T it is N(0, 1).
The network learns the reverse: given x_t, t and the digit class, predict the noise eps (an MSE loss).

    x_t, pixels in [-1, 1]  (B, 1, 28, 28)
    t -> sinusoidal features (B, C) -> MLP (B, 4C); class -> embedding (B, 4C); added together = the
    conditioning vector each residual block adds to its channels
    U-Net: 28x28 (C/2) -> 14x14 (C) -> 7x7 (2C, two blocks) -> 14x14 (C) -> 28x28, each level up
    concatenating the features of the same size from the way down (the skips) -> eps (B, 1, 28, 28)

Classifier-free guidance: 10 % of training digits get the class "none" (index 10), so one network is both
conditional and unconditional; sampling mixes them, eps = (1 + w) eps(x, t, class) - w eps(x, t, none),
which pushes each sample towards its class. DDIM sampling takes 20 deterministic steps over the 1,000
noise levels instead of 1,000 random ones: the same trained network, 50 times fewer forward passes.

Judged, not eyeballed: a cnn-mnist classifier (the newest cnn-mnist run under --out that met its target,
trained first if there is none, or --judge-run DIR) labels 1,000 generated digits, 100 per class;
judged_acc is the share it labels as the class asked for. `diversity` is the mean pairwise distance of
generated digits of one class over that of real digits of the class (1 = as varied as MNIST; a model that
draws the same digit every time scores near 0, whatever the judge says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import catalog, prior_runs
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator, load_image_dataset
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_digit_rows
from dlnotes.rl import save_gif
from dlnotes.tracking import Run
from dlnotes.transforms import standardize

TAGS = ("vision", "generative", "diffusion")
DATASET = "MNIST-10k (offline)"
TARGET = ("judged_acc", 0.90)  # share of 1,000 generated digits that a cnn-mnist classifier labels as asked
SMOKE = {"epochs": 1, "limit_batches": 3, "sample_steps": 4, "judge_samples": 0}


@dataclass
class Config:
    epochs: int = 15  # passes over 8,500 digits; fewer leave blobs that the judge rightly rejects
    batch_size: int = 64  # more, smaller steps: what a small dataset and a short run need
    lr: float = 2e-3  # one-cycle peak for AdamW; the decay to ~0 at the end steadies the samples
    channels: int = 32  # U-Net width C at 14x14 (C/2 at 28x28, 2C at 7x7): small enough for a few CPU cores
    timesteps: int = 1000  # T, the noise levels of the forward process
    p_uncond: float = 0.1  # share of training digits whose class is dropped: the unconditional half of guidance
    guidance: float = 2.0  # w in eps = (1 + w) eps_cond - w eps_uncond; 0 = plain conditional sampling
    sample_steps: int = 20  # DDIM steps from noise to digit (of the T levels)
    judge_samples: int = 1000  # generated digits the cnn-mnist judge labels at the end; 0 = no judging
    judge_run: str = ""  # a cnn-mnist run directory to judge with; default: the newest that met its target
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/diffusion/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "batch_size", "lr", "channels", "timesteps", "sample_steps")
        if self.judge_samples < 0 or self.sample_steps > self.timesteps:
            raise UserError("--judge-samples must be >= 0 and --sample-steps at most --timesteps.")


# --- the forward process: noise schedule --------------------------------------------------------------------


def alpha_bars(timesteps: int) -> torch.Tensor:
    """a_t for t = 1..T on the cosine schedule (Nichol & Dhariwal): a_t falls like cos^2 from 1 to 0, so fewer
    of the T levels are near-pure noise than with DDPM's linear betas, which matters for 28x28 images. (T,)"""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # beta_t = 1 - a_t / a_{t-1}, capped so the last step is finite
    return torch.cumprod(1 - betas, dim=0).float()


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, for a batch of steps t (B,)."""
    a = a_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# --- the model: a small U-Net conditioned on time and class ------------------------------------------------


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the step number, as for token positions in a transformer. (B,) -> (B, dim)"""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the conditioning vector on every channel, twice; a residual skip."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(cond_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.cond(cond)[:, :, None, None]  # the same shift on every pixel of a channel
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class UNet(nn.Module):
    def __init__(self, c: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.c, self.null_class = c, classes  # class index `classes` means "no class" (guidance)
        self.time_mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, 4 * c))
        self.class_emb = nn.Embedding(classes + 1, 4 * c)
        # Only one conv at 28x28 on each side: residual blocks there would cost 4 times those at 14x14.
        self.inp = nn.Conv2d(1, c // 2, 3, padding=1)  # (B, C/2, 28, 28)
        self.down = ResBlock(c // 2, c, 4 * c)  # after a stride-2 conv: (B, C, 14, 14)
        self.shrink = nn.Conv2d(c // 2, c // 2, 4, stride=2, padding=1)  # (B, C/2, 14, 14)
        self.pool = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)  # (B, 2C, 7, 7)
        self.mid1 = ResBlock(2 * c, 2 * c, 4 * c)
        self.mid2 = ResBlock(2 * c, 2 * c, 4 * c)
        self.up = ResBlock(3 * c, c, 4 * c)  # upsampled (2C) + skip (C) at 14x14
        self.head = nn.Sequential(nn.GroupNorm(8, c + c // 2), nn.SiLU(), nn.Conv2d(c + c // 2, c // 2, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(c // 2, 1, 3, padding=1))  # upsampled (C) + skip (C/2) at 28

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.time_mlp(time_embedding(t, self.c)) + self.class_emb(labels)  # (B, 4C)
        full = self.inp(x)  # (B, C/2, 28, 28)
        skip = self.down(self.shrink(full), cond)  # (B, C, 14, 14)
        h = self.mid2(self.mid1(self.pool(skip), cond), cond)  # (B, 2C, 7, 7)
        h = self.up(torch.cat([F.interpolate(h, size=14), skip], dim=1), cond)  # (B, C, 14, 14)
        return self.head(torch.cat([F.interpolate(h, size=28), full], dim=1))  # (B, 1, 28, 28): predicted noise


# --- sampling: DDIM with classifier-free guidance -----------------------------------------------------------


@torch.no_grad()
def sample(model: UNet, labels: torch.Tensor, a_bar: torch.Tensor, steps: int, guidance: float,
           generator: torch.Generator, trajectory: list | None = None) -> torch.Tensor:
    """Digits of the given classes (B,), from pure noise in `steps` deterministic DDIM steps. -> (B, 1, 28, 28)
    in [-1, 1]. `trajectory`, when given, collects x after every step (for the GIF)."""
    model.eval()
    device = labels.device
    x = torch.randn(len(labels), 1, 28, 28, generator=generator).to(device)  # x_T ~ N(0, 1)
    times = torch.linspace(len(a_bar) - 1, 0, steps).round().long().tolist()  # e.g. 999, 946, ..., 0
    both = torch.cat([labels, torch.full_like(labels, model.null_class)])  # conditional and unconditional
    for i, t in enumerate(times):
        eps_c, eps_u = model(torch.cat([x, x]), torch.full_like(both, t), both).chunk(2)  # 2 x (B, 1, 28, 28)
        eps = (1 + guidance) * eps_c - guidance * eps_u
        a_t = a_bar[t]
        a_prev = a_bar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, device=device)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # the clean digit this noise implies
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clamped x0
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM (eta = 0): jump to the earlier level
        if trajectory is not None:
            trajectory.append(x.clamp(-1, 1).cpu())
    return x.clamp(-1, 1)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats (B, 1, 28, 28) -> uint8 digits (B, 28, 28), MNIST's format."""
    return ((x[:, 0].cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# --- the judge: a cnn-mnist classifier ----------------------------------------------------------------------


def load_judge(run_dir: Path) -> nn.Module:
    """The cnn-mnist model of a run, checked to be trained on MNIST digits."""
    state = load_checkpoint(run_dir, "cnn-mnist")
    if state["config"].get("dataset", "mnist") != "mnist":
        raise UserError(f"--judge-run {run_dir} was trained on {state['config']['dataset']}, not MNIST digits.")
    cnn = catalog.load_module(catalog.get("cnn-mnist"))
    model = cnn.SimpleCNN(len(state["classes"]))
    load_weights(model, state)
    return model.eval()


@torch.no_grad()
def judged_accuracy(judge: nn.Module, pixels: np.ndarray, requested: np.ndarray) -> float:
    """Share of uint8 digits (N, 28, 28) the judge labels as the requested classes (N,)."""
    logits = torch.cat([judge(standardize(torch.from_numpy(pixels[i : i + 500]))) for i in range(0, len(pixels), 500)])
    return float((logits.argmax(dim=1).numpy() == requested).mean())


def diversity(generated: np.ndarray, gen_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray) -> float:
    """Mean over classes of (mean pairwise distance of generated digits) / (the same for real digits)."""
    def spread(images: np.ndarray) -> float:
        flat = torch.from_numpy(images[:200].reshape(len(images[:200]), -1)).float() / 255
        return torch.pdist(flat).mean().item()

    return float(np.mean([spread(generated[gen_labels == c]) / spread(real[real_labels == c])
                          for c in np.unique(gen_labels)]))


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    generator = seed_everything(cfg.seed)  # every training draw (steps, noise, dropped classes) comes from here
    judge_used = None
    if cfg.judge_samples:  # before the Run: a judge trained first must not leave an empty run behind
        judge_used = (prior_runs.given_run(cfg.judge_run, "cnn-mnist", "--judge-run") if cfg.judge_run
                      else prior_runs.met_run_or_train("cnn-mnist", cfg.out, cfg.device))
        judge = load_judge(judge_used.dir)
    data = load_image_dataset("mnist")
    train_x = (torch.from_numpy(data.train_images).float() / 127.5 - 1).unsqueeze(1).to(device)  # (N, 1, 28, 28)
    train_y = torch.from_numpy(data.train_labels).long().to(device)
    a_bar = alpha_bars(cfg.timesteps).to(device)  # (T,)

    model = UNet(cfg.channels, len(data.classes)).to(device)
    run = Run(__file__, cfg, device)
    if judge_used:
        run.record("cnn-mnist", judge_used.as_record())
    print(f"data: {data.source}  device: {device}  U-Net: "
          f"{sum(p.numel() for p in model.parameters()):,} weights  run: {run.dir}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps_per_epoch = len(batch_indices(len(train_x), cfg.batch_size, limit=cfg.limit_batches, shuffle=False))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    (run.dir / "samples").mkdir(exist_ok=True)
    grid_labels = torch.arange(10, device=device).repeat_interleave(8)  # 8 of each digit

    start = run.attach(model, optimizer, scheduler, generator)
    for epoch in range(start.epoch, cfg.epochs + 1):
        batches = batch_indices(len(train_x), cfg.batch_size, epoch_generator(cfg.seed, epoch), limit=cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            model.train()
            x0, labels = train_x[batch.to(device)], train_y[batch.to(device)]  # (B, 1, 28, 28), (B,)
            t = torch.randint(0, cfg.timesteps, (len(batch),), generator=generator).to(device)  # (B,)
            noise = torch.randn(x0.shape, generator=generator).to(device)  # eps ~ N(0, 1)
            dropped = torch.rand(len(batch), generator=generator).to(device) < cfg.p_uncond
            labels = labels.masked_fill(dropped, model.null_class)  # "no class" for the unconditional model
            predicted = model(add_noise(x0, t, noise, a_bar), t, labels)  # (B, 1, 28, 28)
            loss = F.mse_loss(predicted, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.update(len(batch), loss=loss.detach())
        # A fixed noise draw per grid, so the grids of successive epochs show the same digits improving.
        grid = sample(model, grid_labels, a_bar, cfg.sample_steps, cfg.guidance,
                      torch.Generator().manual_seed(cfg.seed))
        plot_digit_rows(to_pixels(grid).reshape(10, 8, 28, 28), [str(c) for c in range(10)],
                        run.dir / "samples" / f"epoch-{epoch:03d}.png", f"epoch {epoch}: 8 samples of each digit")
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), samples_per_s=run.samples_per_s)

    save_checkpoint(run.dir, run.recipe, model, cfg)
    trajectory: list[torch.Tensor] = []
    sample(model, torch.arange(10, device=device), a_bar, cfg.sample_steps, cfg.guidance,
           torch.Generator().manual_seed(cfg.seed + 1), trajectory)
    frames = [np.repeat(np.repeat(np.hstack(to_pixels(x)), 3, 0), 3, 1) for x in trajectory]  # (84, 840) each
    save_gif([np.stack([f] * 3, axis=-1) for f in frames + frames[-1:] * 5], run.dir / "denoising.gif",
             fps=4, max_width=840)
    metrics = {"train_loss": run.history[-1]["train_loss"], "samples_per_s": run.samples_per_s}
    if cfg.judge_samples:
        requested = torch.arange(cfg.judge_samples, device=device) % 10  # as many of each digit
        chunks = [sample(model, requested[i : i + 250], a_bar, cfg.sample_steps, cfg.guidance,
                         torch.Generator().manual_seed(cfg.seed + 2 + i))
                  for i in range(0, cfg.judge_samples, 250)]
        pixels, wanted = to_pixels(torch.cat(chunks)), requested.cpu().numpy()
        metrics["judged_acc"] = judged_accuracy(judge, pixels, wanted)
        metrics["diversity"] = diversity(pixels, wanted, data.test_images, data.test_labels)
    return run.finish(metrics)


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str], per_digit: int = 8, output: str = "", seed: int = 0) -> list[dict]:
    """Generate the digits given (`4 2`): `per_digit` samples of each into one PNG (default: in the run)."""
    state = load_checkpoint(run_dir, catalog.recipe_id(__file__))  # first: is it a diffusion run at all?
    for digit in inputs:
        if digit not in [str(c) for c in range(10)]:
            raise UserError(f"Unknown digit class '{digit}': give digits 0-9, e.g. `4 2`.")
    cfg = restore_config(Config, state)
    model = UNet(cfg.channels)
    load_weights(model, state)
    labels = torch.tensor([int(d) for d in inputs]).repeat_interleave(per_digit)  # (len(inputs) * per_digit,)
    x = sample(model, labels, alpha_bars(cfg.timesteps), cfg.sample_steps, cfg.guidance,
               torch.Generator().manual_seed(seed))
    path = Path(output) if output else Path(run_dir) / f"generated-{'-'.join(inputs)}.png"
    plot_digit_rows(to_pixels(x).reshape(len(inputs), per_digit, 28, 28), inputs, path, "generated digits")
    return [{"input": " ".join(inputs), "output": str(path)}]


if __name__ == "__main__":
    cli(Config, main)
