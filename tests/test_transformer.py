"""transformer: attention against SDPA, causality, KV cache, tying, learning, resume, predict, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app
from dlnotes.tracking import latest_run


@pytest.fixture(scope="module")
def tf():
    return catalog.load_module(catalog.get("transformer"))


@pytest.fixture(scope="module")
def smoke(tf, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """The SMOKE run on the Bible verses: a one-layer GPT and its LSTM, 30 steps, a few seconds."""
    out = tmp_path_factory.mktemp("runs")
    values = catalog.config_values(catalog.get("transformer"), smoke=True, device="cpu", out=str(out))
    return tf.main(tf.Config(**values)), latest_run(out, "transformer")


def tiny_gpt(tf, vocab: int = 11, block: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.GPT(vocab, block, n_layer=2, n_head=2, d_model=16, dropout=0.0).eval()


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the model's pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_written_out_attention_equals_sdpa(tf, causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))  # (B, H, T, D)
    mask = torch.ones(7, 7, dtype=torch.bool).tril() if causal else torch.rand(2, 1, 7, 7) > 0.3
    mask = mask | torch.eye(7, dtype=torch.bool)  # every row may look somewhere
    out, weights = tf.scaled_dot_product(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 7))
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()  # masked positions get no weight


def test_a_causal_model_cannot_see_the_future(tf) -> None:
    gpt = tiny_gpt(tf)
    idx = torch.randint(11, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11  # token t + 1 = 6
    before, after = gpt(idx), gpt(changed)  # (B, T, V)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)  # positions <= t: untouched
    assert not torch.allclose(before[:, 6:], after[:, 6:])  # and the change does reach the later positions


def test_cached_generation_gives_the_uncached_logits(tf) -> None:
    gpt = tiny_gpt(tf, block=16)
    prompt = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    ids, logits = tf.generate(gpt, prompt, length=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16) and logits.shape == (2, 12, 11)
    for step in range(12):  # each drawn character's logits, recomputed from the whole prefix without a cache
        torch.testing.assert_close(logits[:, step], gpt(ids[:, : 4 + step])[:, -1], rtol=1e-5, atol=1e-5)
    longer, _ = tf.generate(gpt, prompt, length=40, top_k=3, generator=torch.Generator().manual_seed(0))
    assert longer.shape == (2, 44) and longer.max() < 11  # past the block size the cache restarts


def test_weight_tying_shares_one_tensor_through_training_and_loading(tf) -> None:
    gpt = tiny_gpt(tf)
    assert gpt.head.weight is gpt.tok.weight
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=0.1)
    F.cross_entropy(gpt(torch.randint(11, (2, 8))).flatten(0, 1), torch.randint(11, (16,))).backward()
    optimizer.step()
    assert gpt.head.weight.data_ptr() == gpt.tok.weight.data_ptr()
    fresh = tiny_gpt(tf)
    fresh.load_state_dict(gpt.state_dict())
    assert fresh.head.weight is fresh.tok.weight and torch.equal(fresh.tok.weight, gpt.tok.weight)


def test_the_lstm_gets_about_the_transformers_parameter_count(tf) -> None:
    gpt = tf.GPT(67, 64, n_layer=4, n_head=4, d_model=128, dropout=0.0)  # the default model
    width = tf.lstm_width(67, 2, tf.count(gpt))
    lstm = tf.LSTMModel(67, width, 2, 0.0)
    assert 0.99 * tf.count(gpt) <= tf.count(lstm) <= tf.count(gpt)
    assert lstm.head.weight is lstm.embed.weight


def test_loss_falls_on_a_tiny_corpus(tf) -> None:
    data = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 20)  # a text that repeats: fully predictable
    gpt = tiny_gpt(tf).train()
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batch = tf.random_windows(data, 8, 16, generator)  # (8, 17)
        loss = F.cross_entropy(gpt(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.2, losses[::10]


def test_schedule_warms_up_then_decays_to_a_tenth(tf) -> None:
    cfg = tf.Config(total_steps=1000, warmup_steps=100, lr=1e-3)
    assert tf.learning_rate(0, cfg) == pytest.approx(1e-5)
    assert tf.learning_rate(99, cfg) == pytest.approx(1e-3)
    assert tf.learning_rate(550, cfg) == pytest.approx(0.55e-3)
    assert tf.learning_rate(1000, cfg) == pytest.approx(1e-4)


# --- a run ------------------------------------------------------------------------------------------------


def test_smoke_run_learns_and_compares_both_models(smoke) -> None:
    metrics, run_dir = smoke
    vocab = len(torch.load(run_dir / "checkpoint.pt", weights_only=True)["chars"])
    assert metrics["val_loss"] < math.log(vocab) - 0.5  # well below a uniform guess
    assert metrics["lstm_minus_gpt"] == pytest.approx(metrics["lstm_val_loss"] - metrics["gpt_val_loss"])
    logged = [r for r in rows(run_dir) if "val_loss" in r]
    assert [r["step"] for r in logged] == [15, 30] and all("lstm_val_loss" in r for r in logged)
    assert {"gpt_vs_lstm.png", "attention.png", "checkpoint.pt"} <= {p.name for p in run_dir.iterdir()}


def test_checkpoint_to_predict_round_trip(tf, smoke) -> None:
    _, run_dir = smoke
    first = tf.predict(run_dir, ["In the beginning"], length=25, seed=1)
    again = tf.predict(run_dir, ["In the beginning"], length=25, seed=1)
    assert first == again and first[0]["input"] == "In the beginning" and len(first[0]["output"]) == 25
    chars = torch.load(run_dir / "checkpoint.pt", weights_only=True)["chars"]
    assert set(first[0]["output"]) <= set(chars)
    result = invoke("predict", "transformer", "--run", run_dir, "In the", "--length", 10)
    assert result.exit_code == 0 and result.output.startswith("In the: "), result.output


def test_an_interrupted_run_resumes_exactly(out_dir: Path, tmp_path: Path) -> None:
    flags = ["run", "transformer", "--smoke", "--device", "cpu", "--save-every", 10, "--keep", 5, "--out", out_dir]
    assert invoke(*flags).exit_code == 0
    straight = latest_run(out_dir, "transformer")
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)  # as if the run had stopped right after the evaluation at step 15
    for name in ("checkpoints/last-00000020.pt", "checkpoints/last-00000030.pt", "checkpoint.pt", "summary.json"):
        (cut / name).unlink()
    resumed = invoke("run", "transformer", "--resume", cut)
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    assert rows(cut) == rows(straight)
    for name, tensor in torch.load(straight / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(torch.load(cut / "checkpoint.pt", weights_only=True)["model"][name], tensor)


# --- bad inputs: one line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    ([""], "non-empty prompt"),
    ([], "at least one input"),
    (["In the 日本"], "outside the model's vocabulary: '日本'"),
    (["x" * 40], "more than the block size 32"),
    (["In the", "--block-size", 64], "beyond the trained block size 32"),
    (["In the", "--temperature", 0], "--temperature > 0"),
])
def test_bad_predict_inputs_are_one_line(smoke, args: list, fragment: str) -> None:
    _, run_dir = smoke
    assert_one_line_error(invoke("predict", "transformer", "--run", run_dir, *args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--dataset", "shakespeare"], "Unknown --dataset 'shakespeare'"),
    (["--d-model", 30, "--n-head", 4], "multiple of --n-head"),
    (["--block-size", 0], "--block-size must be positive"),
])
def test_bad_training_flags_are_one_line(args: list, fragment: str, out_dir: Path) -> None:
    assert_one_line_error(invoke("run", "transformer", "--device", "cpu", "--out", out_dir, *args), fragment)
