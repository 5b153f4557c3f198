"""The resnet recipe: a zeroed residual block is the identity, the three archs have equal depth, the shipped
Fashion-MNIST subset is stratified and checked, training learns, resumes exactly and predicts; bad flags: one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, ctrl_c_after_update
from PIL import Image

from dlnotes import catalog
from dlnotes.datasets import DEBIAN_FASHION_MNIST, FASHION_CLASSES, data_root, labelled_subset, load_fashion_mnist
from dlnotes.errors import DataError, UserError

resnet = catalog.load_module(catalog.get("resnet"))


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "samples_per_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


# --- the residual block -----------------------------------------------------------------------------------


@pytest.mark.parametrize("zeroed", ["last_bn_scale", "conv_weights"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_a_residual_block_with_zero_weights_is_the_identity(zeroed: str, train_mode: bool) -> None:
    """z = 0, so the block returns relu(x + 0): x itself for the non-negative inputs a ReLU network feeds it."""
    torch.manual_seed(0)
    block = resnet.ResidualBlock(8, 8).train(train_mode)
    with torch.no_grad():
        if zeroed == "last_bn_scale":
            block.bn2.weight.zero_()
        else:
            block.conv2.weight.zero_()
    x = torch.randn(4, 8, 12, 12)
    torch.testing.assert_close(block(x), x.relu(), rtol=0, atol=0)
    torch.testing.assert_close(block(x.relu()), x.relu(), rtol=0, atol=0)

    plain = resnet.ResidualBlock(8, 8, skip=False).train(train_mode)  # the same block without `+ x`
    plain.load_state_dict(block.state_dict())
    assert plain(x.relu()).abs().max() == 0  # ... passes nothing on: the skip is what keeps x


def test_zero_init_makes_every_same_shape_block_of_a_new_resnet_the_identity() -> None:
    model = resnet.build_model("resnet", width=8, blocks=2, zero_init=True)
    seen = []

    def check(block, inputs, output) -> None:
        if isinstance(block.shortcut, torch.nn.Identity):
            torch.testing.assert_close(output, inputs[0].relu(), rtol=0, atol=0)
            seen.append(block)

    for module in model.modules():
        if isinstance(module, resnet.ResidualBlock):
            module.register_forward_hook(check)
    model(torch.randn(3, 1, 28, 28))
    assert len(seen) == 4  # 2 blocks a stage, the first of stages 2 and 3 changes the shape
    untouched = resnet.build_model("resnet", width=8, blocks=2, zero_init=False)
    assert all(m.bn2.weight.abs().min() > 0 for m in untouched.modules() if isinstance(m, resnet.ResidualBlock))


@pytest.mark.parametrize("blocks", [1, 3])
def test_the_three_archs_have_the_same_depth_width_and_output(blocks: int) -> None:
    x = torch.randn(2, 1, 28, 28)
    shapes = {}
    for arch in resnet.ARCHS:
        model = resnet.build_model(arch, width=8, blocks=blocks)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(convs) + len(linears) == 6 * blocks + 2, arch
        shapes[arch] = [c.out_channels for c in convs]
        assert model(x).shape == (2, 10)
    assert shapes["resnet"] == shapes["plain"] == shapes["vgg"]
    plain = resnet.build_model("plain", width=8, blocks=blocks)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in plain.modules())


# --- data ----------------------------------------------------------------------------------------------


def test_the_shipped_subset_is_stratified_disjoint_and_checked(tmp_path: Path) -> None:
    data = load_fashion_mnist("subset")
    assert data.train_images.shape == (6000, 28, 28) and data.test_images.shape == (2000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [600] * 10
    assert np.bincount(data.test_labels).tolist() == [200] * 10
    assert data.classes == FASHION_CLASSES
    train_rows = {image.tobytes() for image in data.train_images}
    assert not any(image.tobytes() in train_rows for image in data.test_images)
    folder = data_root() / "fashion-mnist-subset"
    assert (folder / "LICENSE").is_file() and "Zalando" in (folder / "LICENSE").read_text()


def test_an_altered_subset_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    copy = tmp_path / "fashion-mnist-subset"
    shutil.copytree(data_root() / "fashion-mnist-subset", copy)
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    damaged = bytearray(labels.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    labels.write_bytes(bytes(damaged))
    monkeypatch.setattr("dlnotes.datasets.data_root", lambda: tmp_path)
    with pytest.raises(DataError, match="does not match its sha256"):
        load_fashion_mnist("subset")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_the_subset_rebuilds_byte_identically_from_debians_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_fashion_subset.py"
    subprocess.run([sys.executable, script, "--out", tmp_path], check=True, capture_output=True, timeout=300)
    shipped = data_root() / "fashion-mnist-subset"
    for name in (tmp_path / "SHA256SUMS").read_text().split()[1::2]:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    assert load_fashion_mnist("auto").train_images.shape == (60000, 28, 28)  # auto prefers the full set


def test_train_labels_picks_a_fixed_stratified_subset() -> None:
    labels = load_fashion_mnist("subset").train_labels
    picked = labelled_subset(labels, 105, 10)
    assert len(picked) == len(set(picked.tolist())) == 105
    assert np.bincount(labels[picked]).tolist() == [11] * 5 + [10] * 5
    assert np.array_equal(picked, labelled_subset(labels, 105, 10))  # the same images every time
    with pytest.raises(UserError, match="more than this training set has"):
        labelled_subset(labels, 6001, 10)




def test_augment_shifts_whole_pixels_and_never_mirrors() -> None:
    images = torch.from_numpy(load_fashion_mnist("subset").test_images[:64]).float()[:, None]  # (64, 1, 28, 28)
    background = -resnet.MNIST_MEAN / resnet.MNIST_STD
    shifted = resnet.augment(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    padded = torch.nn.functional.pad(images, (2,) * 4, value=background)  # (64, 1, 32, 32)
    offsets = [(dy, dx) for dy in range(5) for dx in range(5)]
    for original, out in zip(padded, shifted):
        windows = [original[:, dy : dy + 28, dx : dx + 28] for dy, dx in offsets]
        assert any(torch.equal(out, w) for w in windows)  # a crop of the padded image: a pure shift
        mirrored = [w.flip(2) for w in windows]
        assert not any(torch.equal(out, m) for m in mirrored)  # shoes point left in every test image
    assert not torch.equal(shifted, images)  # it does move them
# --- training, resume, predict -------------------------------------------------------------------------


def test_loss_falls_and_the_run_says_which_test_set(smoke_run) -> None:
    metrics, run_dir = smoke_run("resnet", epochs=2, limit_batches=12, batch_size=64, train_labels=2000)
    rows = [r for r in _rows(run_dir) if "train_loss" in r]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < 2.4
    assert metrics["test_acc"] > 0.2  # 24 steps of a width-8 net on real clothing images; chance is 0.10
    record = json.loads((run_dir / "config.json").read_text())["data"]
    assert record["train_images"] == 2000 and record["test_set"] == "subset test set (2,000)"
    for picture in ("mistakes.png", "confusion.png"):
        assert (run_dir / picture).stat().st_size > 1000, picture


def test_interrupted_and_resumed_in_process_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from dlnotes import options
    from dlnotes.errors import TrainingInterrupted
    from dlnotes.tracking import latest_run

    def config(out: Path):
        values = catalog.config_values(catalog.get("resnet"), smoke=True, epochs=2, limit_batches=4, batch_size=32,
                                       device="cpu", out=str(out))
        return resnet.Config(**values)

    resnet.main(config(tmp_path / "a"))
    reference = latest_run(tmp_path / "a", "resnet")

    with ctrl_c_after_update(6):  # epoch 2, batch 2: the resumed run must redraw the same batches and augmentations
        with pytest.raises(TrainingInterrupted, match="Interrupted at step 6"):
            resnet.main(config(tmp_path / "b"))
    run_dir = latest_run(tmp_path / "b", "resnet")
    with options.using(options.RunOptions(resume=str(run_dir))):
        resnet.main(config(tmp_path / "b"))
    assert _rows(run_dir) == _rows(reference)
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(_weights(run_dir)[name], tensor, rtol=0, atol=0)


def test_predict_names_clothes_from_image_files(smoke_run, tmp_path: Path, invoke) -> None:
    _, run_dir = smoke_run("resnet", epochs=2, limit_batches=25, batch_size=64)
    data = load_fashion_mnist("subset")
    paths = []
    for i in range(6):
        path = tmp_path / f"item{i}.png"
        Image.fromarray(data.test_images[i]).convert("RGB").resize((112, 112)).save(path)
        paths.append(str(path))
    results = resnet.predict(run_dir, paths)
    assert [r["input"] for r in results] == paths
    for r in results:
        probs = [p for _, p in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(name in FASHION_CLASSES for name, _ in r["top"])
    correct = np.mean([r["top"][0][0] == data.classes[label] for r, label in zip(results, data.test_labels)])
    assert correct >= 0.5, f"only {correct:.0%} of re-saved test images recognised"
    printed = invoke("predict", "resnet", "--run", run_dir, paths[0])
    assert printed.exit_code == 0 and printed.output.startswith(f"{paths[0]}:"), printed.output


# --- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "fragment"), [
    (["--arch", "densenet"], "Unknown --arch 'densenet'"),
    (["--data", "cifar"], "Unknown --data 'cifar'"),
    (["--train-labels", "-5"], "--train-labels must be 0 (all) or positive"),
    (["--train-labels", "70000"], "--train-labels 70000 is more than this training set has"),
    (["--blocks", "0"], "--blocks"),
])
def test_bad_flags_are_one_line(args: list[str], fragment: str, invoke, out_dir: Path) -> None:
    assert_one_line_error(invoke("run", "resnet", "--smoke", "--out", out_dir, *args), fragment)
    assert not list(out_dir.glob("resnet/*")), "an error before training must not leave a run directory"
