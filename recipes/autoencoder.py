"""Autoencoder on MNIST in PyTorch Lightning: 784 pixels -> 3 numbers -> 784 pixels; `--variational` for a VAE.

The notes' LitAutoEncoder: an encoder squeezes each digit into a 3-D code, a decoder rebuilds the digit from
it, and the loss is the mean squared error between the two. No labels are used; the code still ends up
sorting digits by shape, which the k-nearest-neighbour accuracy on the codes measures.

    x         (B, 784)    pixels / 255 in [0, 1], flattened
    encoder   Linear(784, 128) -> ReLU -> Linear(128, 3)      z (B, 3)
    decoder   Linear(3, 128) -> ReLU -> Linear(128, 784)      x_hat (B, 784); loss = mse(x_hat, x)

Lightning: the model says what one step is (`training_step`, `configure_optimizers`, `self.log`) and
`L.Trainer` runs the loop: batches, backward, optimizer step, validation, logging, checkpoints, resuming.
`--trainer plain` trains the same LightningModule with the loop written out; with the same seed both end with
the same weights and loss (tested). Lightning's hooks write into the same run directory as every recipe
(`dlnotes.lightning_adapter`).

`--variational` (VAE): the encoder gives a mean and a log-variance per code dimension, the code is drawn as
z = mu + sigma * eps (the reparameterisation: eps is an input, so gradients reach mu and sigma), and the
loss adds beta * KL(N(mu, sigma) || N(0, 1)) to the summed squared error. The codes then fill a ball around
0, so decoding z ~ N(0, 1) draws new digits (prior_samples.png).

Pictures: reconstructions.png (originals over reconstructions), latent.png (the 3-D codes of held-out digits
coloured by digit), walk.png (decoding the straight line between the codes of two digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import lightning_adapter
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator, load_image_dataset
from dlnotes.device import pick_device, seed_everything
from dlnotes.flags import require_choice, require_positive
from dlnotes.images import read_image_like_mnist
from dlnotes.launch import cli
from dlnotes.plots import plot_codes_3d, plot_digit_rows
from dlnotes.tracking import Run

TAGS = ("vision", "generative", "autoencoder", "lightning")
DATASET = "MNIST-10k (offline)"
TARGET = ("test_psnr", 14.0)  # held-out reconstruction PSNR in dB from 3 numbers
ALSO_TARGETS = (("knn_acc", 0.70),)  # a 5-NN classifier on the 3-D test codes: how much the 3 numbers know of the digit
SMOKE = {"epochs": 1, "limit_batches": 5}
TRAINERS = ("lightning", "plain")


@dataclass
class Config:
    epochs: int = 20  # PSNR still creeps up after this; the codes' kNN accuracy has levelled off
    batch_size: int = 64
    lr: float = 1e-3  # Adam, as in the notes
    trainer: str = "lightning"  # lightning | plain: the same model and steps, Lightning's loop or one written out
    variational: bool = False  # a VAE: sampled codes, a KL term, digits drawn from the prior
    beta: float = 1.0  # weight of the KL term (VAE); more = smoother code space, blurrier digits
    knn: int = 5  # neighbours for the kNN classifier on the 3-D codes
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/autoencoder/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "batch_size", "lr", "knn")
        require_choice(self, "trainer", TRAINERS)


# --- model ------------------------------------------------------------------------------------------------


class LitAutoEncoder(L.LightningModule):
    def __init__(self, lr: float = 1e-3, variational: bool = False, beta: float = 1.0, latent: int = 3) -> None:
        super().__init__()
        self.lr, self.variational, self.beta = lr, variational, beta
        # A VAE's encoder gives a mean and a log-variance for each code dimension.
        self.encoder = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, latent * (2 if variational else 1)))
        self.decoder = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(), nn.Linear(128, 784))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The 3-D code of each image (a VAE's mean). (B, 784) -> (B, 3)"""
        z = self.encoder(x)
        return z.chunk(2, dim=1)[0] if self.variational else z

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codes(x)).clamp(0, 1)  # (B, 784)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if not self.variational:
            return F.mse_loss(self.decoder(self.encoder(x)), x)  # the notes' loss
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, 3) each
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterisation
        squared_error = F.mse_loss(self.decoder(z), x, reduction="none").sum(dim=1)  # (B,)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)  # KL(N(mu, sigma) || N(0, 1)), (B,)
        return (squared_error + self.beta * kl).mean()

    # What Lightning calls: one training step, one validation step, the optimizer.
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        loss = self.loss(x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, _ = batch  # the whole held-out set in one batch: the PSNR of all of it
        test_loss = F.mse_loss(self.reconstruct(x), x)
        self.log_dict({"test_loss": test_loss, "test_psnr": psnr(test_loss)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]: 20 dB = an error of 0.1 per pixel."""
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def evaluate(model: LitAutoEncoder, test_x: torch.Tensor) -> tuple[float, float]:
    model.eval()
    mse = F.mse_loss(model.reconstruct(test_x), test_x)
    return mse.item(), psnr(mse).item()


@torch.no_grad()
def knn_accuracy(model: LitAutoEncoder, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...],
                 k: int) -> float:
    """How much the 3 numbers know about the digit: label each held-out code by its k nearest training codes."""
    model.eval()
    distances = torch.cdist(model.codes(test[0]), model.codes(train[0]))  # (N_test, N_train)
    votes = train[1][distances.topk(k, largest=False).indices]  # (N_test, k) labels of the neighbours
    return (votes.mode(dim=1).values == test[1]).float().mean().item()


# --- training: Lightning's loop, or the same steps written out ----------------------------------------------


def train_lightning(model: LitAutoEncoder, cfg: Config, run: Run, device: torch.device, train, test) -> float:
    batches = lightning_adapter.EpochBatches(*train, batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit_batches)
    callback = lightning_adapter.RunCallback(run, cfg)
    trainer = L.Trainer(max_epochs=cfg.epochs, **callback.trainer_arguments(device, len(batches)))
    held_out = lightning_adapter.EpochBatches(*test, batch_size=len(test[0]), shuffle=False)
    callback.fit(trainer, model, batches, held_out)  # trainer.fit, resumed from the run's checkpoint; Ctrl-C ends it
    return callback.samples_per_s


def train_plain(model: LitAutoEncoder, cfg: Config, run: Run, generator: torch.Generator, train, test) -> float:
    optimizer = model.configure_optimizers()
    start = run.attach(model, optimizer, generator=generator)
    for epoch in range(start.epoch, cfg.epochs + 1):
        order = epoch_generator(cfg.seed, epoch)  # the same order EpochBatches gives Lightning
        batches = batch_indices(len(train[0]), cfg.batch_size, order, limit=cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            model.train()
            loss = model.loss(train[0][batch.to(train[0].device)])  # what training_step computes
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.update(len(batch), loss=loss.detach())
        test_loss, test_psnr = evaluate(model, test[0])
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), test_loss=test_loss, test_psnr=test_psnr)
    return run.samples_per_s


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    generator = seed_everything(cfg.seed)
    data = load_image_dataset("mnist")
    train = (torch.from_numpy(data.train_images).float().div(255).flatten(1).to(device),  # (N, 784) in [0, 1]
             torch.from_numpy(data.train_labels).long().to(device))
    test = (torch.from_numpy(data.test_images).float().div(255).flatten(1).to(device),
            torch.from_numpy(data.test_labels).long().to(device))
    model = LitAutoEncoder(cfg.lr, cfg.variational, cfg.beta).to(device)
    run = Run(__file__, cfg, device)
    print(f"data: {data.source}  device: {device}  trainer: {cfg.trainer}  run: {run.dir}")
    if cfg.trainer == "lightning":
        samples_per_s = train_lightning(model, cfg, run, device, train, test)
    else:
        samples_per_s = train_plain(model, cfg, run, generator, train, test)

    test_loss, test_psnr = evaluate(model, test[0])
    knn_acc = knn_accuracy(model, train, test, cfg.knn)
    save_checkpoint(run.dir, run.recipe, model, cfg)
    draw_pictures(model, data, test, run.dir, cfg.variational)
    return run.finish({"test_psnr": test_psnr, "test_loss": test_loss, "knn_acc": knn_acc,
                       "samples_per_s": samples_per_s})


@torch.no_grad()
def draw_pictures(model: LitAutoEncoder, data, test, folder: Path, variational: bool) -> None:
    model.eval()
    x = test[0][:12]
    originals_and_reconstructions = torch.stack([x, model.reconstruct(x)]).view(2, 12, 28, 28)
    plot_digit_rows(originals_and_reconstructions.cpu().numpy(), ["original", "rebuilt"],
                    folder / "reconstructions.png", "held-out digits and their reconstructions from 3 numbers")
    plot_codes_3d(model.codes(test[0]).cpu().numpy(), data.test_labels, data.classes, folder / "latent.png",
                  "3-D codes of 1,500 held-out digits, coloured by digit (no labels were used in training)")
    pairs = [(0, 1), (2, 7), (4, 9), (3, 8)]  # walk from the first held-out digit of one class to another's
    ends = torch.stack([model.codes(test[0][(test[1] == a).nonzero()[0]]) for pair in pairs for a in pair])
    ends = ends.view(len(pairs), 2, 1, -1)  # (pairs, 2, 1, 3)
    weights = torch.linspace(0, 1, 10, device=ends.device)[None, :, None]  # (1, 10, 1)
    path = ends[:, 0] * (1 - weights) + ends[:, 1] * weights  # (pairs, 10, 3) codes on the straight line
    plot_digit_rows(model.decoder(path).clamp(0, 1).view(len(pairs), 10, 28, 28).cpu().numpy(),
                    [f"{a} -> {b}" for a, b in pairs], folder / "walk.png", "decoding the line between two codes")
    if variational:
        z = torch.randn(8 * 8, model.decoder[0].in_features, generator=torch.Generator().manual_seed(0))
        digits = model.decoder(z.to(x.device)).clamp(0, 1).view(8, 8, 28, 28).cpu().numpy()
        plot_digit_rows(digits, [""] * 8, folder / "prior_samples.png", "decoded codes z ~ N(0, 1)")


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str], output: str = "") -> list[dict]:
    """The 3-D code of each image file, and a PNG of the images over their reconstructions (default: in the run)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    model = LitAutoEncoder(cfg.lr, cfg.variational, cfg.beta)
    load_weights(model, state)
    model.eval()
    pixels = np.stack([read_image_like_mnist(p, "digit") for p in inputs])  # (B, 28, 28) uint8
    x = torch.from_numpy(pixels).float().div(255).flatten(1)  # (B, 784)
    with torch.no_grad():
        codes, rebuilt = model.codes(x), model.reconstruct(x)
    path = Path(output) if output else Path(run_dir) / "predicted-reconstructions.png"
    plot_digit_rows(torch.stack([x, rebuilt]).view(2, len(inputs), 28, 28).numpy(), ["input", "rebuilt"], path,
                    "inputs and their reconstructions")
    errors = F.mse_loss(rebuilt, x, reduction="none").mean(dim=1)  # (B,)
    return [{"input": p, "output": f"code ({', '.join(f'{v:.2f}' for v in z)})  PSNR "
             f"{10 * math.log10(1 / max(e, 1e-10)):.1f} dB  -> {path}"} for p, z, e in zip(inputs, codes.tolist(),
                                                                                    errors.tolist())]


if __name__ == "__main__":
    cli(Config, main)
