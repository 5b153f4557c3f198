"""`dlnotes bench`: a real default run of the quickest recipe, and the pieces that turn runs into a table."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from dlnotes import baselines, bench, catalog, speedups
from dlnotes.bench import markdown_table, summarize, time_to_target
from dlnotes.catalog import Target

REPO = Path(__file__).resolve().parents[1]


def test_bench_runs_mlp_by_default_settings_and_writes_json_and_a_table(tmp_path: Path, invoke) -> None:
    result = invoke("bench", "mlp", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = next((tmp_path / "bench").iterdir())
    report = json.loads((folder / "bench.json").read_text())
    row = report["recipes"][0]
    assert row["recipe"] == "mlp" and row["met"] == 1 and row["metric"] >= 0.96  # the default run meets its target
    assert 0 < row["time_to_target_s"] <= row["wall_s"]
    assert row["throughput"] > 0 and row["throughput_unit"] == "samples/s"
    assert row["peak_rss_mib"] > 100  # torch alone is more than that
    assert report["machine"]["versions"]["torch"].startswith("2.")
    table = (folder / "bench.md").read_text()
    assert "| mlp | test_acc ≥ 0.96 |" in table and "| mlp |" in result.output
    run_dir = Path(row["run_dirs"][0])
    assert (run_dir / "checkpoint.pt").is_file()  # the benched run is a normal run directory


def test_time_to_target_is_the_first_evaluation_that_meets_it(tmp_path: Path) -> None:
    rows = [{"epoch": 1, "test_acc": 0.5, "time_s": 2.0}, {"epoch": 2, "test_acc": 0.97, "time_s": 4.0},
            {"epoch": 3, "test_acc": 0.98, "time_s": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to_target(tmp_path, Target("test_acc", 0.96), {"test_acc": 0.98}, wall=7.0) == 4.0
    assert time_to_target(tmp_path, Target("test_acc", 0.99), {"test_acc": 0.98}, wall=7.0) is None
    # a metric that only the final evaluation reports: the whole run
    assert time_to_target(tmp_path, Target("test_bleu", 15), {"test_bleu": 20.0}, wall=7.0) == 7.0


def test_time_to_a_lower_is_better_target(tmp_path: Path) -> None:
    rows = [{"step": 100, "val_loss": 2.9, "time_s": 2.0}, {"step": 200, "val_loss": 1.7, "time_s": 4.0},
            {"step": 300, "val_loss": 1.5, "time_s": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to_target(tmp_path, Target("val_loss", 1.6, "<="), {"val_loss": 1.5}, wall=7.0) == 6.0
    assert time_to_target(tmp_path, Target("val_loss", 1.0, "<="), {"val_loss": 1.5}, wall=7.0) is None
    assert time_to_target(tmp_path, Target("val_loss", 3.0, "<="), {"val_loss": 1.5}, wall=7.0) == 2.0


def test_lower_is_better_targets_in_the_table(tmp_path: Path) -> None:
    attempts = [{"metric": 1.5, "target_met": True, "wall_s": 9.0, "time_to_target_s": 6.0, "run_dir": "x"}]
    row = summarize(catalog.get("mlp"), attempts) | {"recipe": "lm", "target": ["val_loss", 1.6, "<="]}
    table = markdown_table([row], {"gpu": None, "cpu": "Some CPU", "cores": 2, "versions": {"torch": "2"}}, 1)
    assert "| lm | val_loss ≤ 1.6 | 1.5000 | 1/1 |" in table


def test_repeats_are_summarized_by_their_median_and_failures_are_kept() -> None:
    info = catalog.get("mlp")
    attempts = [{"metric": m, "target_met": m >= 0.96, "wall_s": w, "time_to_target_s": w / 2, "throughput": t,
                 "throughput_unit": "samples/s", "peak_rss_mib": 500.0, "run_dir": "x"}
                for m, w, t in ((0.97, 10.0, 100.0), (0.95, 30.0, 300.0), (0.98, 20.0, 200.0))]
    row = summarize(info, [*attempts, {"error": "exit code 1: boom"}])
    assert row["metric"] == 0.97 and row["wall_s"] == 20.0 and row["throughput"] == 200.0
    assert row["met"] == 2 and row["runs"] == 4 and row["errors"] == ["exit code 1: boom"]
    table = markdown_table([row], {"gpu": None, "cpu": "Some CPU", "cores": 2, "versions": {"torch": "2"}}, 3)
    assert "Median of 3 runs" in table and "| mlp | test_acc ≥ 0.96 | 0.9700 | 2/4 (errors) |" in table


def test_cnn_training_ceiling_is_a_positive_rate() -> None:
    module = catalog.load_module(catalog.get("cnn-mnist"))
    assert module.training_ceiling(module.Config(device="cpu", batch_size=16), seconds=0.3) > 0


def test_bench_refuses_a_recipe_without_a_target(invoke) -> None:
    assert_one_line_error(invoke("bench", "tensor-ops"), "tensor-ops", "no TARGET")


def test_bench_refuses_an_unknown_recipe_and_a_zero_repeat(invoke) -> None:
    assert_one_line_error(invoke("bench", "no-such-recipe"), "no-such-recipe")
    result = invoke("bench", "mlp", "--repeat", "0")
    assert result.exit_code == 2 and "--repeat" in result.output


def test_bench_refuses_an_unknown_device(invoke) -> None:
    assert_one_line_error(invoke("bench", "mlp", "--device", "tpu"), "Unknown device 'tpu'")


# --- baselines: the notes' own code, run in the same bench invocation -------------------------------------


def fake_worker(info: catalog.RecipeInfo, device: str, folder: Path, attempt: int, baseline: str = "",
                stem: str = "") -> dict:
    """What the worker processes would return: the recipe at 3,000 tokens/s, its baseline at 120."""
    if baseline:
        return {"throughput": 120.0, "throughput_unit": "tokens/s", "wall_s": 5.0, "peak_rss_mib": 300.0}
    return {"metric": 21.0, "target_met": True, "wall_s": 700.0, "time_to_target_s": 700.0, "throughput": 3000.0,
            "throughput_unit": "tokens/s", "peak_rss_mib": 1500.0, "run_dir": str(folder / "runs" / "x")}


def test_a_recipes_baseline_gets_a_row_with_the_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "run_worker", fake_worker)
    lines: list[str] = []
    folder, rows = bench.run_bench([catalog.get("seq2seq")], 1, "cpu", tmp_path, report=lines.append)
    report = json.loads((folder / "bench.json").read_text())
    assert [r["recipe"] for r in report["recipes"]] == ["seq2seq"] and rows == report["recipes"]
    base = report["baselines"][0]
    assert base["baseline"] == "notes' per-token loop" and base["throughput"] == 120.0
    assert base["throughput_ratio"] == 25.0 and base["met"] is None and base["time_to_target_ratio"] is None
    table = (folder / "bench.md").read_text()
    assert "| × baseline |" in table.splitlines()[2]
    recipe_line, baseline_line = table.splitlines()[4:6]
    assert recipe_line.startswith("| seq2seq | test_bleu ≥ 15 | 21.0000 | 1/1 |") and recipe_line.endswith("| — |")
    assert baseline_line.startswith("| seq2seq baseline: notes' per-token loop | — | — | — |")
    assert "| 120 tokens/s |" in baseline_line and baseline_line.endswith("| recipe 25.0× the throughput |")
    assert "seq2seq baseline 'notes' per-token loop': 120 tokens/s in 5 s" in lines


def test_baselines_that_meet_the_target_are_compared_by_time_too() -> None:
    info = catalog.get("cnn-mnist")
    recipe = bench.summarize(info, [{"metric": 0.986, "target_met": True, "wall_s": 30.0, "time_to_target_s": 10.0,
                                     "throughput": 4000.0, "throughput_unit": "samples/s", "run_dir": "x"}])
    base = bench.compare(recipe, bench.summarize(info, [
        {"metric": 0.985, "target_met": True, "wall_s": 40.0, "time_to_target_s": 35.0, "throughput": 8000.0,
         "throughput_unit": "samples/s"}], baseline="notes' loop"))
    assert base["met"] == 1 and base["throughput_ratio"] == 0.5 and base["time_to_target_ratio"] == 3.5
    table = markdown_table([recipe, base], {"gpu": None, "cpu": "Some CPU", "cores": 2, "versions": {}}, 1)
    assert "| cnn-mnist baseline: notes' loop | test_acc ≥ 0.985 | 0.9850 | 1/1 | 35.0 | 40.0 |" in table
    assert table.rstrip().endswith("| recipe 0.50× the throughput, 3.5× sooner to target |")


def test_the_worker_runs_a_registered_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's path for a baseline, in-process, with a fake that takes no time."""
    def fake(device: str) -> dict:
        return {"throughput": 50.0, "throughput_unit": "samples/s", "metric": 0.97, "device_seen": device}

    monkeypatch.setitem(baselines.BASELINES, "mlp", [baselines.Baseline("mlp", "fake loop", fake)])
    result_file = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["-c", "mlp", "cpu", str(tmp_path / "runs"), str(result_file), "0", "fake loop"])
    bench.bench_worker()
    result = json.loads(result_file.read_text())
    assert result["throughput"] == 50.0 and result["device_seen"] == "cpu" and result["target_met"] is True
    assert result["wall_s"] >= 0 and result["peak_rss_mib"] > 0
    assert not (tmp_path / "runs").exists()  # a baseline is not a recipe run: no run directory


def test_run_k_gets_seed_k_minus_1_and_so_do_baselines_that_take_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Medians over seeds, not over reruns of seed 0: the worker passes its seed to a baseline with a `seed`
    parameter (and leaves one without it alone)."""
    seen: list[int] = []

    def seeded(device: str, seed: int = 0) -> dict:
        seen.append(seed)
        return {"throughput": 50.0, "throughput_unit": "samples/s"}

    monkeypatch.setitem(baselines.BASELINES, "mlp", [baselines.Baseline("mlp", "seeded", seeded),
                                                     baselines.Baseline("mlp", "plain", lambda device: {})])
    for seed, name in (("2", "seeded"), ("1", "plain")):
        result_file = tmp_path / f"{name}.json"
        monkeypatch.setattr(sys, "argv", ["-c", "mlp", "cpu", str(tmp_path / "runs"), str(result_file), seed, name])
        bench.bench_worker()
        assert json.loads(result_file.read_text())["seed"] == int(seed)
    assert seen == [2]
    commands: list[list[str]] = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kw: commands.append(command) or
                        type("Done", (), {"returncode": 1})())
    bench.run_worker(catalog.get("mlp"), "cpu", tmp_path, 3)
    assert commands[0][-3] == "2"  # run 3 -> seed 2 (then the baseline name and recipe run, empty here)


def test_a_baseline_that_never_met_the_target_bounds_the_ratio() -> None:
    info = catalog.get("dqn")
    recipe = bench.summarize(info, [{"metric": 500.0, "target_met": True, "wall_s": 40.0, "time_to_target_s": 20.0,
                                     "throughput": 900.0, "throughput_unit": "env steps/s", "run_dir": "x"}])
    base = bench.compare(recipe, bench.summarize(info, [
        {"metric": 180.0, "target_met": False, "time_to_target_s": None, "clock_s": 150.0, "wall_s": 155.0,
         "throughput": 600.0, "throughput_unit": "env steps/s"}], baseline="notes' DQN"))
    assert base["met"] == 0 and base["time_to_target_ratio"] is None and base["time_to_target_ratio_at_least"] == 7.5
    assert bench.times_baseline(base) == ("recipe 1.5× the throughput, over 7.5× sooner to target "
                                          "(baseline never met it)")
    met = bench.compare(recipe, bench.summarize(info, [
        {"metric": 480.0, "target_met": True, "time_to_target_s": 60.0, "clock_s": 60.0, "wall_s": 65.0,
         "throughput": 600.0, "throughput_unit": "env steps/s"}], baseline="notes' DQN"))
    assert met["time_to_target_ratio"] == 3.0 and met["time_to_target_ratio_at_least"] is None


def test_every_speed_claim_has_its_baseline_registered() -> None:
    assert [b.name for b in baselines.for_recipe("cnn-mnist")] == ["notes' loop"]
    assert [b.name for b in baselines.for_recipe("dqn")] == ["notes' DQN"]
    assert [b.name for b in baselines.for_recipe("seq2seq")][:1] == ["notes' per-token loop"]


def test_the_notes_dqn_runs_and_reports_what_bench_reads() -> None:
    result = baselines.dqn_notes_loop("cpu", total_steps=1_100)  # 100 gradient steps after the warm-up
    assert result["throughput"] > 0 and result["throughput_unit"] == "env steps/s"
    assert result["time_to_target_s"] is None and result["metric"] < 475  # 1,100 steps cannot solve CartPole
    assert result["env_steps"] == 1_100 and result["clock_s"] > 0


def test_the_machine_line_says_what_the_cpu_offers() -> None:
    machine = bench.describe_machine("cpu")
    features = machine["cpu_features"]
    assert features["torch_kernels"] in ("AVX2", "AVX512", "DEFAULT", "NO AVX", "ZVECTOR", "VSX", "SVE256")
    assert set(features["flags"]) <= set(speedups.VECTOR_FLAGS)
    line = markdown_table([], machine, 3).splitlines()[0]
    assert f"torch kernels {features['torch_kernels']}" in line and "bf16" in line


def test_the_readme_section_is_regenerated_from_a_bench_folder(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("readme_bench", REPO / "scripts" / "readme_bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path / "20261129-220000"
    folder.mkdir()
    (folder / "bench.json").write_text(json.dumps({"machine": {"device": "cpu"}, "repeat": 3, "recipes": [
        {"recipe": "cnn-mnist"}, {"recipe": "dqn"}]}))
    (folder / "bench.md").write_text("Machine: X.\n\n| recipe |\n|---|\n| cnn-mnist |\n")
    readme = "# Title\n\nprose before\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nprose after\n"
    new = script.replace_section(readme, script.section(folder, "quiet"))
    assert new.startswith("# Title\n\nprose before\n<!-- bench:begin -->\n")
    assert new.endswith("<!-- bench:end -->\nprose after\n")
    assert "`dlnotes bench cnn-mnist dqn --repeat 3 --device cpu`, 2026-11-29 (quiet):" in new
    assert "| cnn-mnist |" in new and "old table" not in new
    with pytest.raises(ValueError, match="exactly one"):
        script.replace_section("no markers", "x")


def test_recipe_and_baseline_runs_alternate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run k of the recipe, then run k of each baseline: under a changing load each pair shares the conditions."""
    order: list[tuple[str, int]] = []

    def worker(info: catalog.RecipeInfo, device: str, folder: Path, attempt: int, baseline: str = "",
               stem: str = "") -> dict:
        order.append((baseline or info.id, attempt))
        return fake_worker(info, device, folder, attempt, baseline, stem)

    monkeypatch.setattr(bench, "run_worker", worker)
    fakes = [baselines.Baseline("mlp", f"loop {c}", lambda device: {}) for c in "ab"]
    monkeypatch.setitem(baselines.BASELINES, "mlp", fakes)
    _, rows = bench.run_bench([catalog.get("mlp")], 2, "cpu", tmp_path, report=lambda line: None)
    assert order == [("mlp", 1), ("loop a", 1), ("loop b", 1), ("mlp", 2), ("loop a", 2), ("loop b", 2)]
    assert rows[0]["runs"] == 2


def test_a_run_that_never_met_the_target_counts_as_the_latest_in_the_median() -> None:
    """Three seeds of the notes' loop, one never there: the median is the slower seed that got there, not the
    mean of the two that did; with two never there, the median is None and its bound uses their clocks."""
    info = catalog.get("cnn-mnist")

    def run(time_to_target: float | None, clock: float) -> dict:
        return {"metric": 0.986 if time_to_target else 0.984, "target_met": bool(time_to_target),
                "time_to_target_s": time_to_target, "clock_s": clock, "wall_s": clock, "throughput": 4000.0,
                "throughput_unit": "samples/s"}

    one_never = bench.summarize(info, [run(16.8, 16.8), run(34.6, 34.6), run(None, 49.0)], baseline="loop")
    assert one_never["met"] == 2 and one_never["time_to_target_s"] == 34.6
    assert one_never["time_to_target_at_least_s"] is None
    two_never = bench.summarize(info, [run(16.8, 16.8), run(None, 40.0), run(None, 49.0)], baseline="loop")
    assert two_never["time_to_target_s"] is None and two_never["time_to_target_at_least_s"] == 40.0
    recipe = bench.summarize(info, [{**run(8.0, 12.0), "run_dir": "x"}])
    assert bench.compare(recipe, one_never)["time_to_target_ratio"] == pytest.approx(34.6 / 8.0)
    assert bench.compare(recipe, two_never)["time_to_target_ratio_at_least"] == 5.0


# --- llm-chat: benched for speed, beside llama.cpp's own benchmark -----------------------------------------


def test_llm_chat_is_benched_with_its_fixed_question_for_speed_alone() -> None:
    info = catalog.get("llm-chat")
    assert info.target is None and info in bench.benchable(None)
    values = catalog.config_values(info, bench=True, device="cpu")
    assert values["prompt"] and values["temperature"] == 0 and values["max_tokens"] == 200  # greedy: repeatable
    assert catalog.config_values(info)["prompt"] == ""  # a plain run still chats
    for recipe in catalog.all_recipes().values():  # a misspelt BENCH key would be dropped without a word
        assert set(recipe.bench) <= {f.name for f in recipe.fields}, recipe.id


def test_a_recipe_without_a_target_gets_a_speed_row(tmp_path: Path) -> None:
    """The worker's recipe path, in-process, on the tiny chat model: throughput and a run directory, no metric."""
    info = catalog.get("llm-chat")
    info = dataclasses.replace(info, bench=info.bench | {"tiny": True, "max_tokens": 8})
    result = bench.recipe_result(info, "cpu", str(tmp_path / "runs"))
    assert result["throughput"] > 0 and result["throughput_unit"] == "tokens/s"
    assert "metric" not in result and Path(result["run_dir"]).is_dir()
    row = bench.summarize(info, [result])
    assert row["met"] is None and row["target"] is None and row["time_to_target_s"] is None
    line = markdown_table([row], {"gpu": None, "cpu": "Some CPU", "cores": 2, "versions": {}}, 1).splitlines()[4]
    assert line.startswith("| llm-chat | — | — | — | — |")


def fake_llm_worker(info: catalog.RecipeInfo, device: str, folder: Path, attempt: int, baseline: str = "",
                    stem: str = "") -> dict:
    if baseline:
        return {"throughput": 73.2, "throughput_unit": "tokens/s", "prompt_tokens_per_s": 210.0, "wall_s": 6.0}
    return {"wall_s": 30.0, "throughput": 45.4, "throughput_unit": "tokens/s", "run_dir": str(folder / "x")}


def test_llm_chat_against_llama_cpp_in_one_bench_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     invoke) -> None:
    monkeypatch.setattr(bench, "run_worker", fake_llm_worker)
    monkeypatch.setitem(baselines.BASELINES, "llm-chat", [baselines.Baseline(
        "llm-chat", "llama.cpp llama-bench", lambda device: {}, missing=lambda: "")])
    result = invoke("bench", "llm-chat", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output  # no target is not a missed target
    table = next((tmp_path / "bench").iterdir()) / "bench.md"
    recipe_line, baseline_line = table.read_text().splitlines()[4:6]
    assert recipe_line.startswith("| llm-chat | — | — | — | — | 30.0 | 45 tokens/s |")
    assert baseline_line.startswith("| llm-chat baseline: llama.cpp llama-bench | — |")
    assert baseline_line.endswith("| recipe 0.62× the throughput |")


def test_a_baseline_whose_tool_is_missing_is_skipped_with_one_line(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "run_worker", fake_llm_worker)
    monkeypatch.setitem(baselines.BASELINES, "llm-chat", [baselines.Baseline(
        "llm-chat", "llama.cpp llama-bench", lambda device: {}, missing=lambda: "no llama-bench here")])
    lines: list[str] = []
    folder, _ = bench.run_bench([catalog.get("llm-chat")], 1, "cpu", tmp_path, report=lines.append)
    assert "llm-chat baseline 'llama.cpp llama-bench': skipped: no llama-bench here" in lines
    assert json.loads((folder / "bench.json").read_text())["baselines"] == []


def fake_llama_bench(folder: Path, exit_code: int = 0) -> Path:
    """A stand-in for llama-bench: records its arguments and wait settings, prints what `-o json` prints."""
    script = folder / "llama-bench"
    script.write_text(f"""#!/bin/sh
echo "$@" > {folder}/args
echo "policy=${{OMP_WAIT_POLICY:-unset}} spin=${{GOMP_SPINCOUNT:-unset}}" > {folder}/env
[ {exit_code} -ne 0 ] && {{ echo "error: failed to load model" >&2; exit {exit_code}; }}
echo '[{{"n_prompt": 64, "n_gen": 0, "avg_ts": 210.5}}, {{"n_prompt": 0, "n_gen": 128, "avg_ts": 80.25}}]'
""")
    script.chmod(0o755)
    return script


def test_the_llama_cpp_baseline_runs_llama_bench_on_the_served_gguf(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dlnotes.llm.models import default_gguf

    monkeypatch.setenv("DLNOTES_LLAMA_BENCH", str(fake_llama_bench(tmp_path)))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # dlnotes' setting for torch, not llama.cpp's
    assert baselines.find("llm-chat", "llama.cpp llama-bench").missing() == ""
    result = baselines.llama_cpp_generation("cpu")
    assert result["throughput"] == 80.25 and result["throughput_unit"] == "tokens/s"
    assert result["prompt_tokens_per_s"] == 210.5
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-m") + 1] == str(default_gguf()) and args[args.index("-t") + 1] == str(
        torch.get_num_threads())
    assert args[args.index("-p") + 1] == "64" and args[args.index("-n") + 1] == "128"
    assert (tmp_path / "env").read_text().strip() == "policy=unset spin=unset"


def test_the_llama_cpp_baseline_says_why_it_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlnotes.errors import UserError
    from dlnotes.llm import llama_bench

    monkeypatch.setenv("DLNOTES_LLAMA_BENCH", str(fake_llama_bench(tmp_path, exit_code=3)))
    with pytest.raises(UserError, match="llama-bench failed \\(exit 3\\): error: failed to load model"):
        baselines.llama_cpp_generation("cpu")
    monkeypatch.setenv("DLNOTES_LLAMA_BENCH", str(tmp_path / "args"))  # exists, not executable
    assert "not an executable file" in llama_bench.missing()
    monkeypatch.delenv("DLNOTES_LLAMA_BENCH")
    monkeypatch.setattr(llama_bench, "BUILT", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "make llama-bench" in llama_bench.missing()


def test_a_baseline_on_a_setup_of_its_own_is_compared_with_the_recipes_way_on_it() -> None:
    """seq2seq's toy-setup baseline times both ways on the notes' 8 pairs: its ratio is between those, not
    against the recipe's Bible run."""
    info = catalog.get("seq2seq")
    recipe = bench.summarize(info, [{"metric": 21.0, "target_met": True, "wall_s": 600.0, "time_to_target_s": 600.0,
                                     "throughput": 3600.0, "throughput_unit": "tokens/s", "run_dir": "x"}])
    base = bench.compare(recipe, bench.summarize(info, [
        {"throughput": 350.0, "recipe_throughput": 3500.0, "throughput_unit": "tokens/s", "wall_s": 20.0}],
        baseline="notes' per-token loop, notes' toy setup"))
    assert base["throughput_ratio"] == 10.0 and base["own_setup"]
    assert bench.times_baseline(base) == "recipe 10.0× the throughput (both on this setup: 3,500 vs 350)"
