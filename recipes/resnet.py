"""ResNet from scratch on Fashion-MNIST: why the skip connection lets a deep network train.

Stack more conv layers and a network should do at least as well: the extra layers could learn the identity.
In practice a deep plain stack trains *worse* (higher training loss, not just test loss): gradient descent
does not find that identity easily. A residual block makes it the default. It computes a correction z and
adds its input back, `relu(z + x)`, so with z = 0 the block passes x through unchanged (x >= 0 here: it comes
out of a ReLU) and a deep ResNet starts as the shallow network its stem and head make. The notes' block:

    x ─┬─ conv3x3 ─ BN ─ ReLU ─ conv3x3 ─ BN ── z ─(+)─ ReLU ─>      z + x
       └──────────── (1x1 conv + BN when the shape changes) ──┘      the shortcut

`--zero-init` sets the last BN's scale to 0 in every block (Goyal et al., 2017), so every block starts as
exactly that identity. With SGD that costs nothing; Adam moves each weight by about lr per step, so a scale
starting at 0 keeps its block nearly silent for hundreds of steps: off by default here.

The network for 28x28 images, with the defaults `--width 32 --blocks 1` (8 weight layers: 1 + 3 x 1 x 2 + 1):

    input            (B, 1, 28, 28)
    stem             (B, 32, 28, 28)   conv3x3 + BN + ReLU
    stage 1          (B, 32, 28, 28)   `--blocks` residual blocks each
    stage 2          (B, 64, 14, 14)   the first block halves H, W (stride 2) and doubles channels (1x1 shortcut)
    stage 3          (B, 128, 7, 7)
    avg pool + flat  (B, 128)          AdaptiveAvgPool2d(1): one number per channel, any input size
    linear           (B, 10)           logits

`--arch plain` is the same network without the `+ x` (the shortcut convs go too); `--arch vgg` is VGG's
design at the same depth and width: stacks of conv3x3-BN-ReLU, 2x2 max-pool between stages, no shortcut.
At the default 8 layers all three train alike; at 26 (`--blocks 4`) the two without shortcuts fall behind in
training loss, not just on the test set (README: measured numbers).

Data: Fashion-MNIST (Zalando's clothing images, 10 classes). The full 60k/10k set is read from Debian's
`dataset-fashion-mnist` (or $DLNOTES_DATA/fashion-mnist) where installed; otherwise the stratified 6,000 /
2,000 subset that ships in data/fashion-mnist-subset. `--data full|subset` chooses; summary and config.json
say which test set `test_acc` is on. `--train-labels N` trains on a fixed stratified N of the training images
(the transfer recipe compares against it). Training batches are shifted by up to 2 px, never flipped: every
shoe in Fashion-MNIST points left (an ankle boot correlates 0.81 with its class's mean image, mirrored 0.06),
so a mirrored shoe is a picture the test set never shows and a lesson the network must unlearn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import distributed
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator, labelled_subset, load_fashion_mnist
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.images import read_image_like_mnist
from dlnotes.launch import cli
from dlnotes.plots import plot_confusion_matrix, plot_image_grid
from dlnotes.speedups import autocast, compile_model, grad_scaler, resolve_precision
from dlnotes.tracking import Run
from dlnotes.transforms import MNIST_MEAN, MNIST_STD, standardize

TAGS = ("vision", "classification", "cnn", "resnet")
DATASET = "Fashion-MNIST (60k/10k from Debian's package, else the shipped 6k/2k subset)"
TARGET = ("test_acc", 0.92)  # on the full 10k test set; the default run: 0.928 in 20 min on 2 cores (README)
SMOKE = {"epochs": 1, "limit_batches": 3, "data": "subset", "width": 8, "blocks": 1}
DISTRIBUTED = True  # dlnotes run resnet --nproc N
ARCHS = ("resnet", "plain", "vgg")


@dataclass
class Config:
    arch: str = "resnet"  # resnet | plain | vgg: the same depth and width, with or without the skip connection
    blocks: int = 1  # blocks per stage; weight layers = 6 * blocks + 2 (8 here: ResNet-8)
    width: int = 32  # channels of stage 1, doubled at stages 2 and 3 (16 underfits: README)
    zero_init: bool = False  # last BN scale = 0 in each block: each starts as the identity (slow with Adam: notes)
    epochs: int = 8  # one-cycle over 8 passes of the full 60k (README: what fewer epochs reach)
    batch_size: int = 128  # fewer Python steps per epoch than 64 on a CPU
    lr: float = 3e-3  # one-cycle peak learning rate for AdamW
    weight_decay: float = 5e-4  # AdamW's decoupled decay: a light pull on the weights
    augment: bool = True  # random shifts of up to 2 px of each training batch (no flips: docstring)
    data: str = "auto"  # auto | full | subset; auto = the full set where installed, else the shipped subset
    train_labels: int = 0  # train on a fixed stratified subset of this many training images; 0 = all
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = fp32 on CPUs (bf16 was slower for convs this small)
    compile: bool = False  # torch.compile the model: pays on GPUs, not for a model this small on few CPU cores
    channels_last: bool = True  # NHWC memory layout: the one oneDNN and cuDNN convolve fastest
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/resnet/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "batch_size", "lr", "blocks", "width")
        require_choice(self, "arch", ARCHS)
        require_choice(self, "data", ("auto", "full", "subset"))
        if self.train_labels < 0:
            raise UserError(f"--train-labels must be 0 (all) or positive, not {self.train_labels}.")


# --- model ------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, then `relu(z + x)`; `skip=False` drops the `+ x` (the plain block)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)  # BN has the bias
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = skip
        self.shortcut = nn.Identity()
        if skip and (stride != 1 or c_in != c_out):  # x must have z's shape to be added: a 1x1 conv makes it so
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn1(self.conv1(x)))  # (B, c_out, H / stride, W / stride)
        z = self.bn2(self.conv2(z))
        if self.skip:
            z = z + self.shortcut(x)  # the residual connection: the block learns a correction to x
        return F.relu(z)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def build_model(arch: str = "resnet", width: int = 16, blocks: int = 2, num_classes: int = 10,
                zero_init: bool = True) -> nn.Sequential:
    """(B, 1, 28, 28) -> (B, num_classes) logits; 6 * blocks + 2 weight layers whatever the arch."""
    if arch not in ARCHS:
        raise UserError(f"Unknown arch '{arch}': use one of {', '.join(ARCHS)}.")
    layers: list[nn.Module] = [conv_bn_relu(1, width)]  # stem: (B, width, 28, 28)
    c_in = width
    for stage in range(3):
        c_out = width * 2**stage  # 32, 64, 128 channels at 28, 14, 7 pixels (the default width)
        for block in range(blocks):
            downsample = stage > 0 and block == 0
            if arch == "vgg":
                if downsample:
                    layers.append(nn.MaxPool2d(2))  # (B, c_in, H/2, W/2)
                layers += [conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out)]
            else:
                layers.append(ResidualBlock(c_in, c_out, stride=2 if downsample else 1, skip=arch == "resnet"))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]  # (B, 4w) -> (B, classes)
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init and isinstance(module, ResidualBlock) and module.skip:
            nn.init.zeros_(module.bn2.weight)  # z = 0 at the start: the block is relu(x + 0) = x
    return model


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Shift each image by up to `shift` whole pixels (pad with background, crop back to 28x28): whole pixels, so
    no interpolation blurs the edges."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (shift,) * 4, value=-MNIST_MEAN / MNIST_STD)  # (B, 1, H + 4, W + 4); 0 standardised
    dy, dx = torch.randint(0, 2 * shift + 1, (2, batch, 1), generator=generator).to(images.device)  # (B, 1) each
    rows = (dy + torch.arange(height, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(width, device=images.device))[:, None, :]  # (B, 1, W)
    batch_idx = torch.arange(batch, device=images.device)[:, None, None]
    return padded[batch_idx, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, 1) -> (B, 1, H, W)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
             batch_size: int = 1000):
    """Mean loss, accuracy and the predictions, on in-memory tensors."""
    model.eval()
    with autocast(images.device, precision):
        logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).float()
    predicted = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels).item(), (predicted == labels).float().mean().item(), predicted


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    precision = resolve_precision(cfg.precision, device)
    generator = seed_everything(cfg.seed + distributed.rank())  # each process its own augmentation draws
    data = load_fashion_mnist(cfg.data)
    keep = labelled_subset(data.train_labels, cfg.train_labels, len(data.classes)) if cfg.train_labels else None
    train_images = data.train_images if keep is None else data.train_images[keep]
    train_labels = data.train_labels if keep is None else data.train_labels[keep]
    test_set = f"{'full' if len(data.test_labels) == 10_000 else 'subset'} test set ({len(data.test_labels):,})"

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    train_x = standardize(torch.from_numpy(train_images)).to(device)  # (N, 1, 28, 28)
    train_y = torch.from_numpy(train_labels).to(device)  # (N,)
    test_x = standardize(torch.from_numpy(data.test_images)).to(device, memory_format=memory_format)
    test_y = torch.from_numpy(data.test_labels).to(device)

    model = build_model(cfg.arch, cfg.width, cfg.blocks, len(data.classes), cfg.zero_init)
    model = model.to(device, memory_format=memory_format)
    train_model = distributed.wrap(compile_model(model, cfg.compile, device))  # shares `model`'s weights
    scaler = grad_scaler(device, precision)  # scales the loss for fp16 only; a no-op otherwise
    run = Run(__file__, cfg, device)  # after everything that can refuse the flags: no empty run directories
    run.record("data", {"source": data.source, "train_images": len(train_x), "test_set": test_set})
    weights = sum(p.numel() for p in model.parameters())
    print(f"data: {data.source}, training on {len(train_x):,}, testing on the {test_set}  device: {device}  "
          f"precision: {precision}  processes: {run.world_size}  weights: {weights:,}  run: {run.dir}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batch_indices(len(train_x), cfg.batch_size, limit=cfg.limit_batches, shuffle=False))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                    total_steps=cfg.epochs * steps_per_epoch)

    start = run.attach(model, optimizer, scheduler, generator)  # on --resume, restores all four
    for epoch in range(start.epoch, cfg.epochs + 1):
        model.train()
        order = epoch_generator(cfg.seed, epoch)  # (seed, epoch) only: a resumed run redraws the same batches
        batches = batch_indices(len(train_x), cfg.batch_size, order, limit=cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            idx = distributed.shard(batch).to(device)  # this process's part of the global batch
            images, labels = train_x[idx], train_y[idx]  # (B, 1, 28, 28), (B,)
            if cfg.augment:
                images = augment(images, generator)
            images = images.contiguous(memory_format=memory_format)
            with autocast(device, precision):  # bf16/fp16 convolutions; the loss itself is fp32
                loss = F.cross_entropy(train_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # with DDP, backward also averages the gradients of all processes
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.update(len(batch), loss=loss.detach())
        # Nothing is chosen by these per-epoch test numbers (a fixed schedule, the final model): they only draw
        # the curve. Rank 0 alone evaluates and tells the others.
        test_loss, test_acc, _ = distributed.on_main(evaluate, model, test_x, test_y, precision)
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), test_loss=test_loss, test_acc=test_acc,
                      samples_per_s=run.samples_per_s)

    test_loss, test_acc, predicted = distributed.on_main(evaluate, model, test_x, test_y, precision)
    predicted = predicted.cpu().numpy()
    save_checkpoint(run.dir, run.recipe, model, cfg, classes=list(data.classes))
    wrong = np.flatnonzero(predicted != data.test_labels)
    plot_image_grid(data.test_images[wrong], data.test_labels[wrong], predicted[wrong], data.classes,
                    run.dir / "mistakes.png")  # only misclassified images: what the model confuses
    matrix = np.bincount(data.test_labels * len(data.classes) + predicted, minlength=len(data.classes) ** 2)
    plot_confusion_matrix(matrix.reshape(len(data.classes), -1), list(data.classes), run.dir / "confusion.png",
                          title=f"{cfg.arch}, {test_set}: accuracy {test_acc:.4f}")
    return run.finish({"test_acc": test_acc, "test_loss": test_loss, "train_loss": run.history[-1]["train_loss"],
                       "samples_per_s": run.samples_per_s})


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """Top-3 classes with probabilities for each image file (any size or colour)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    model = build_model(cfg.arch, cfg.width, cfg.blocks, len(state["classes"]), zero_init=False)
    load_weights(model, state)
    model.eval()
    pixels = torch.stack([torch.from_numpy(read_image_like_mnist(p, "fashion")) for p in inputs])  # (B, 28, 28)
    with torch.no_grad():
        probs = model(standardize(pixels)).softmax(dim=1)  # (B, C)
    top = probs.topk(3, dim=1)
    return [
        {"input": str(path), "top": [(state["classes"][i], p) for p, i in zip(values.tolist(), indices.tolist())]}
        for path, values, indices in zip(inputs, top.values, top.indices)
    ]


if __name__ == "__main__":
    cli(Config, main)
