"""lora: answer-only loss, the adapter leaves the base alone until merged, merged = unmerged, the prefix cache
scores like a full forward, exact resume, predict and serve from RUN/merged, bad inputs. All on the tiny llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, ctrl_c_after_update

from dlnotes import catalog, options
from dlnotes.errors import TrainingInterrupted
from dlnotes.textdata import LABEL_NAMES
from dlnotes.tracking import latest_run

REVIEWS = ["A moving, funny film.", "Dull and lifeless; two hours of my life gone.", "Critics say it is fine."]


@pytest.fixture(scope="module")
def lora():
    return catalog.load_module(catalog.get("lora"))


@pytest.fixture
def tiny(lora):
    """A fresh tiny llama (random weights, its own tokenizer) and the task's prompts for it."""
    from dlnotes.llm.tiny import tiny_model

    loaded = tiny_model()
    return loaded.model, lora.Prompts(loaded.tokenizer, LABEL_NAMES, max_length=48)


@pytest.fixture(scope="module")
def smoke(lora, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("runs")
    values = catalog.config_values(catalog.get("lora"), smoke=True, device="cpu", out=str(out))
    return lora.main(lora.Config(**values)), latest_run(out, "lora")


def test_prompt_tokens_are_labelled_ignore_and_the_answer_is_the_label(tiny, lora) -> None:
    _, prompts = tiny
    ids, labels = prompts.example(REVIEWS[0], 1)
    answer = prompts.tokenizer.encode("positive", add_special_tokens=False) + [prompts.tokenizer.eos_token_id]
    prompt_len = len(ids) - len(answer)
    assert labels[:prompt_len] == [lora.IGNORE] * prompt_len
    assert ids[prompt_len:] == labels[prompt_len:] == answer
    text = prompts.tokenizer.decode(ids[:prompt_len])
    assert text.endswith("assistant\n") and REVIEWS[0] in text and lora.SYSTEM in text
    assert prompts.example(REVIEWS[0], 0)[1][prompt_len:][0] == prompts.label_tokens[0] != prompts.label_tokens[1]


def test_answer_loss_is_the_causal_lm_loss_on_answer_tokens_only(tiny, lora) -> None:
    lm, prompts = tiny
    rows = [prompts.example(text, label) for text, label in zip(REVIEWS, [1, 0, 1])]
    ids, mask = lora.pad([r[0] for r in rows], prompts.tokenizer.pad_token_id)
    labels, _ = lora.pad([r[1] for r in rows], lora.IGNORE)
    with torch.no_grad():
        ours = lora.answer_loss(lm, ids, mask, labels)
        reference = lm(input_ids=ids, attention_mask=mask, labels=labels).loss  # full logits, shifted, -100 ignored
        unmasked = lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert abs(ours - unmasked) > 1e-3  # the prompt tokens would change it: they really are left out


def test_prefix_cache_scores_exactly_like_one_full_forward(tiny, lora) -> None:
    lm, prompts = tiny
    shots = [(REVIEWS[0], 1), (REVIEWS[1], 0)]
    prefix, questions = prompts.prefix(shots), [prompts.question(shots, t) for t in REVIEWS]
    cached = lora.label_logits(lm, prompts, prefix, questions, torch.device("cpu"), "fp32", batch_size=2)
    with torch.no_grad():
        full = torch.stack([lm(input_ids=torch.tensor([prefix + q])).logits[0, -1, prompts.label_tokens]
                            for q in questions])
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_lora_leaves_base_weights_untouched_until_merge_and_merged_equals_unmerged(tiny, lora) -> None:
    lm, prompts = tiny
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    model = lora.add_lora(lm, lora.Config(dropout=0.0))
    rows = [prompts.example(text, label) for text, label in zip(REVIEWS, [1, 0, 1])]
    ids, mask = lora.pad([r[0] for r in rows], prompts.tokenizer.pad_token_id)
    labels, _ = lora.pad([r[1] for r in rows], lora.IGNORE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(15):
        loss = lora.answer_loss(model, ids, mask, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The adapter alone learns: the tiny model's final RMSNorm and 0.02-sized tied embeddings cap its logits near
    # +-1.3, so its loss cannot fall far below ln(vocabulary) - 2.6; falling by 0.3 in 15 steps is learning.
    assert losses[-1] < losses[0] - 0.3
    adapted = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
               if "lora_" not in k}
    assert adapted.keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(adapted[name], tensor), name  # every pretrained weight as it was

    prefix, questions = prompts.prefix([]), [prompts.question([], t) for t in REVIEWS]
    before = lora.label_logits(model, prompts, prefix, questions, torch.device("cpu"), "fp32")
    with model.disable_adapter():
        plain = lora.label_logits(model, prompts, prefix, questions, torch.device("cpu"), "fp32")
    merged = model.merge_and_unload()
    after = lora.label_logits(merged, prompts, prefix, questions, torch.device("cpu"), "fp32")
    assert (before - plain).abs().max() > 1e-2  # the adapter changed the answers ...
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # ... and merging keeps exactly that change
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert any("q_proj" in k for k in changed) and not any("embed" in k or "norm" in k for k in changed)


def test_smoke_run_writes_a_merged_model_that_predict_and_serve_load(smoke, lora, invoke) -> None:
    metrics, run_dir = smoke
    assert {"test_acc", "kshot_test_acc", "zeroshot_test_acc", "lora_test_acc_8"} <= set(metrics)
    assert metrics["merge_max_logit_diff"] < 1e-4 and metrics["test_reviews"] == 16
    assert (run_dir / "learning_curve.png").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_size"] for r in rows if "train_size" in r] == [8, 16]

    results = lora.predict(run_dir, REVIEWS[:2])
    assert [r["input"] for r in results] == REVIEWS[:2]
    for r in results:
        assert {label for label, _ in r["top"]} == set(LABEL_NAMES)
        assert sum(p for _, p in r["top"]) == pytest.approx(1.0) and r["top"][0][1] >= r["top"][1][1]
    shown = invoke("predict", "lora", "--run", run_dir, REVIEWS[0])
    assert shown.exit_code == 0 and REVIEWS[0] in shown.output and "positive" in shown.output

    from dlnotes.llm import models

    served = models.load(str(run_dir / "merged"))  # what `dlnotes serve --model RUN/merged` loads
    assert served.name == "merged" and served.tokenizer.chat_template


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(smoke, lora, tmp_path: Path) -> None:
    """Ctrl-C inside the second training size (step 5 of 3 + 4), then --resume: the metrics and merged weights of
    the uninterrupted smoke run with the same config."""
    from safetensors.torch import load_file

    info = catalog.get("lora")

    def config(out: Path):
        return lora.Config(**catalog.config_values(info, smoke=True, device="cpu", out=str(out)))

    _, reference = smoke
    with ctrl_c_after_update(5):
        with pytest.raises(TrainingInterrupted, match="Interrupted at step 5"):
            lora.main(config(tmp_path / "b"))
    run_dir = latest_run(tmp_path / "b", "lora")
    with options.using(options.RunOptions(resume=str(run_dir))):
        metrics = lora.main(config(tmp_path / "b"))

    saved = json.loads((reference / "summary.json").read_text())["metrics"]
    def same(m: dict) -> dict:  # not the timings, nor the float rounding noise of the merge check
        return {k: v for k, v in m.items() if not k.endswith("_s") and k != "merge_max_logit_diff"}

    assert same(metrics) == same(saved)
    ours, theirs = load_file(run_dir / "merged" / "model.safetensors"), load_file(reference / "merged" /
                                                                                  "model.safetensors")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


# --- bad inputs: one clear line -----------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--sizes", "128,16"], "--sizes must be positive and increasing"),
    (["--shots", "two"], "--shots must be comma-separated whole numbers"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--test-limit", "-1"], "--test-limit must be 0 (all) or positive"),
    (["--targets", "no_such_proj", "--tiny"], "--targets no_such_proj"),
])
def test_bad_flags_are_one_line(flags: list[str], fragment: str, invoke, out_dir: Path) -> None:
    assert_one_line_error(invoke("run", "lora", *flags, "--out", out_dir), fragment)


def test_predict_bad_inputs_are_one_line(smoke, invoke, tmp_path: Path) -> None:
    _, run_dir = smoke
    assert_one_line_error(invoke("predict", "lora", "--run", run_dir, "  "), "non-empty reviews")
    mlp_dir = tmp_path / "mlp-run"
    mlp_dir.mkdir()
    (mlp_dir / "config.json").write_text(json.dumps({"config": {"epochs": 1}, "meta": {"recipe": "mlp"}}))
    assert_one_line_error(invoke("predict", "lora", "--run", mlp_dir, "good"), "is a run of 'mlp', not 'lora'")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run_dir / "config.json").read_text())
    assert_one_line_error(invoke("predict", "lora", "--run", unfinished, "good"), "has no merged/ model")
