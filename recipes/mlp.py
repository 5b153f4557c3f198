"""MLP on MNIST: the two-layer perceptron, 784 -> 64 -> 10, with dropout.

The classic first network: flatten each 28x28 image into a 784-vector, one hidden layer with a ReLU, one
output layer of 10 logits. Every hidden unit sees every pixel, so the model has no idea that neighbouring
pixels belong together (the CNN recipe adds that); it still reaches about 97 % on held-out digits.

    input       (B, 1, 28, 28)   standardised pixels
    flatten     (B, 784)         row-major: pixel (r, c) lands at index 28 * r + c
    linear      (B, 64)          784 * 64 + 64 = 50,240 weights: almost all of the model
    ReLU, dropout                dropout zeroes 10 % of the hidden units while training only
    linear      (B, 10)          logits; `cross_entropy` applies log-softmax itself

`model.train()` / `model.eval()` switch dropout on and off: forgetting `eval()` makes held-out accuracy
noisy and low. The same small random shifts and rotations as in cnn-mnist make up for having only
8,500 training digits; a model this tiny can afford many epochs.

`--nproc 2` trains the same model with 2 processes (DistributedDataParallel): each computes the gradient
of half of every batch and DDP averages them, so the steps equal one process's with the whole batch. A
model this small gains nothing from it (the gradient exchange costs more than the half batch saves);
it is the smallest place to see the mechanics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import distributed
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import IMAGE_DATASETS, batch_indices, epoch_generator, load_image_dataset
from dlnotes.device import pick_device, seed_everything
from dlnotes.flags import require_choice, require_positive
from dlnotes.images import read_image_like_mnist
from dlnotes.launch import cli
from dlnotes.plots import plot_image_grid
from dlnotes.speedups import autocast, compile_model, grad_scaler, resolve_precision
from dlnotes.tracking import Run
from dlnotes.transforms import random_affine, standardize

TAGS = ("vision", "classification", "mlp")
DATASET = "MNIST-10k (offline) | Fashion-MNIST | full MNIST"
TARGET = ("test_acc", 0.96)
SMOKE = {"epochs": 2, "limit_batches": 5}
DISTRIBUTED = True  # dlnotes run mlp --nproc N


@dataclass
class Config:
    epochs: int = 30  # a 50k-weight model: epochs are cheap, and 30 keep improving accuracy
    batch_size: int = 64
    lr: float = 2e-3  # one-cycle peak learning rate for AdamW
    hidden: int = 64  # the notes' hidden width
    dropout: float = 0.1  # more dropout plus augmentation underfits a layer this narrow
    augment: bool = True  # random shift/rotate/scale of each training batch
    dataset: str = "mnist"  # mnist | fashion-mnist
    data_dir: str = ""  # a folder with the four IDX files (full MNIST or Fashion-MNIST)
    download: bool = False  # fetch the full dataset with torchvision (needs a network)
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 on GPUs, fp32 on CPUs (casting costs more)
    compile: bool = False  # torch.compile the model: nothing to gain for 2 small matrix multiplies
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/mlp/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "batch_size", "lr", "hidden")
        require_choice(self, "dataset", IMAGE_DATASETS)


class MLP(nn.Module):
    def __init__(self, hidden: int, dropout: float, num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),  # (B, 1, 28, 28) -> (B, 784)
            nn.Linear(28 * 28, hidden),  # (B, hidden)
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),  # (B, 10) logits
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32"):
    model.eval()  # dropout off
    with autocast(images.device, precision):
        logits = model(images).float()  # (N, 10): the whole held-out set fits in one batch
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item(), logits.argmax(1)


def main(cfg: Config) -> dict[str, float]:
    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    precision = resolve_precision(cfg.precision, device)
    generator = seed_everything(cfg.seed + distributed.rank())  # each process its own augmentation draws
    data = load_image_dataset(cfg.dataset, cfg.data_dir, cfg.download)

    train_x = standardize(torch.from_numpy(data.train_images)).to(device)  # (N, 1, 28, 28)
    train_y = torch.from_numpy(data.train_labels).to(device)
    test_x = standardize(torch.from_numpy(data.test_images)).to(device)
    test_y = torch.from_numpy(data.test_labels).to(device)

    model = MLP(cfg.hidden, cfg.dropout, len(data.classes)).to(device)
    # What the training step calls: compiled and/or wrapped in DDP; `model` itself shares its weights.
    train_model = distributed.wrap(compile_model(model, cfg.compile, device))
    scaler = grad_scaler(device, precision)  # scales the loss for fp16 only; a no-op otherwise
    run = Run(__file__, cfg, device)  # after everything that can refuse the flags: no empty run directories
    print(f"data: {data.source}  device: {device}  precision: {precision}  processes: {run.world_size}  "
          f"run: {run.dir}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = len(batch_indices(len(train_x), cfg.batch_size, limit=cfg.limit_batches, shuffle=False))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                    total_steps=cfg.epochs * steps_per_epoch)

    start = run.attach(model, optimizer, scheduler, generator)  # on --resume, restores all four
    for epoch in range(start.epoch, cfg.epochs + 1):
        model.train()  # dropout on
        # The order depends on (seed, epoch) only, so a run resumed mid-epoch redraws the same batches.
        order = epoch_generator(cfg.seed, epoch)
        batches = batch_indices(len(train_x), cfg.batch_size, order, limit=cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            idx = distributed.shard(batch).to(device)  # this process's part of the global batch
            images, labels = train_x[idx], train_y[idx]  # (B, 1, 28, 28), (B,)
            if cfg.augment:
                images = random_affine(images, generator)
            with autocast(device, precision):
                loss = F.cross_entropy(train_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # with DDP, backward also averages the gradients of all processes
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.update(len(batch), loss=loss.detach())
        # Rank 0 alone evaluates (the replicas hold the same weights) and tells the others the result.
        test_loss, test_acc, _ = distributed.on_main(evaluate, model, test_x, test_y, precision)
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), test_loss=test_loss, test_acc=test_acc)

    test_loss, test_acc, predicted = distributed.on_main(evaluate, model, test_x, test_y, precision)
    save_checkpoint(run.dir, run.recipe, model, cfg, classes=list(data.classes))
    plot_image_grid(data.test_images, data.test_labels, predicted.cpu().numpy(), data.classes,
                    run.dir / "samples.png")
    return run.finish({"test_acc": test_acc, "test_loss": test_loss, "samples_per_s": run.samples_per_s})


def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """Top-3 classes with probabilities for each image file (any size or colour)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    model = MLP(cfg.hidden, cfg.dropout, len(state["classes"]))
    load_weights(model, state)
    model.eval()
    style = "fashion" if cfg.dataset == "fashion-mnist" else "digit"
    pixels = torch.stack([torch.from_numpy(read_image_like_mnist(p, style)) for p in inputs])  # (B, 28, 28)
    with torch.no_grad():
        top = model(standardize(pixels)).softmax(dim=1).topk(3, dim=1)  # (B, 3)
    return [
        {"input": str(path), "top": [(state["classes"][i], p) for p, i in zip(values.tolist(), indices.tolist())]}
        for path, values, indices in zip(inputs, top.values, top.indices)
    ]


if __name__ == "__main__":
    cli(Config, main)
