"""`dlnotes bench`: run recipes' default configurations and report what they reach, how fast, with what.

A recipe is benched when it declares a TARGET, or a BENCH configuration (a default run that waits for a person,
llm-chat's chat, gets a fixed prompt instead); one with BENCH and no TARGET is benched for speed alone.

Each recipe runs in a fresh worker process (`python -c "...bench_worker()"`), so one recipe's memory or
threads never colour the next one's numbers, and peak memory is that process's own. The worker calls the
recipe's `main` in-process, then reads the run directory it wrote:

    time to target   `time_s` of the first metrics.jsonl row where the catalog TARGET holds (the run's
                     wall time when only the final evaluation has the metric)
    final metric     the TARGET metric main returned, and whether the target holds
    throughput       samples/s, tokens/s or env steps/s, as the recipe reports it
    peak memory      the worker's maximum resident set (and CUDA's peak allocation on a GPU)
    ceiling          recipes with a `training_ceiling(cfg)` (cnn-mnist) also time their bare training step on
                     random in-memory batches in the same process; throughput / ceiling says how much the
                     data pipeline, augmentation and bookkeeping cost
    baselines        a recipe's baselines (`dlnotes.baselines`: the notes' own code for the same task) run
                     right after it, each in its own worker; their rows say how many times the recipe's
                     throughput theirs is (and how many times sooner the recipe met the target, when both did);
                     one on a setup of its own (seq2seq's on the notes' toy pairs) times the recipe's way there too;
                     an `after_recipe` baseline is handed the recipe's run directory, to match its training time

`--repeat N` runs each recipe N times, run k with seed k - 1 (its baselines too, where they take a seed), and
reports medians: over seeds, so one lucky or unlucky seed does not decide a ratio. Results go to
OUT/bench/STAMP/bench.json and bench.md (the Markdown table), with every run directory and log beside them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dlnotes import baselines, catalog
from dlnotes.errors import UserError
from dlnotes.launch import environment_choosing_its_own_wait
from dlnotes.speedups import cpu_features
from dlnotes.tracking import list_runs, new_run_dir

THROUGHPUT_KEYS = (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("env_steps_per_s", "env steps/s"))
PACKAGES = ("torch", "torchvision", "transformers", "numpy", "gymnasium")


def benchable(ids: list[str] | None) -> list[catalog.RecipeInfo]:
    """The recipes to run: the given ids (each must declare a TARGET or a BENCH configuration), or every recipe
    that declares one."""
    if not ids:
        return [info for info in catalog.all_recipes().values() if info.target or info.bench]
    infos = [catalog.get(i) for i in ids]
    for info in infos:
        if not (info.target or info.bench):
            raise UserError(f"Recipe '{info.id}' declares no TARGET or BENCH, so there is nothing to bench it "
                            "against.")
    return infos


def run_bench(infos: list[catalog.RecipeInfo], repeat: int, device: str, out: Path,
              report: Any = print) -> tuple[Path, list[dict[str, Any]]]:
    """Run every recipe `repeat` times in worker processes; write bench.json and bench.md; return the folder
    and one summary row per recipe."""
    folder = new_run_dir(out, "bench")
    rows, baseline_rows = [], []
    for info in infos:
        bases = []
        for base in baselines.for_recipe(info.id):
            if why := base.missing():  # a measuring tool this machine lacks: no row, one line saying why
                report(f"{info.id} baseline '{base.name}': skipped: {why}")
            else:
                bases.append(base)
        # The recipe's k-th run and its baselines' k-th runs go back to back: each pair shares the machine's
        # conditions (another job starting, a warm cache), so the medians compare like with like. A baseline
        # that measures against the recipe's run (after_recipe) gets the k-th run's directory.
        recipe_attempts: list[dict[str, Any]] = []
        base_attempts: list[list[dict[str, Any]]] = [[] for _ in bases]
        for attempt in range(1, repeat + 1):
            recipe_attempts += run_attempts(info, "", repeat, device, folder, report, numbers=(attempt,))
            recipe_run = recipe_attempts[-1].get("run_dir", "") if "error" not in recipe_attempts[-1] else ""
            for number, base in enumerate(bases, 1):
                if base.after_recipe and not recipe_run:
                    continue  # it measures against the recipe's run, and there is none
                base_attempts[number - 1] += run_attempts(info, base.name, repeat, device, folder, report,
                                                          f"{info.id}-baseline{number}", numbers=(attempt,),
                                                          recipe_run=recipe_run if base.after_recipe else "")
        rows.append(summarize(info, recipe_attempts))
        for base, attempts in zip(bases, base_attempts):
            if not attempts:
                continue
            baseline_rows.append(compare(rows[-1], summarize(info, attempts, baseline=base.name)))
    machine = describe_machine(device)
    (folder / "bench.json").write_text(json.dumps({"machine": machine, "repeat": repeat, "recipes": rows,
                                                   "baselines": baseline_rows}, indent=2))
    (folder / "bench.md").write_text(markdown_table(rows + baseline_rows, machine, repeat))
    return folder, rows


def run_attempts(info: catalog.RecipeInfo, baseline: str, repeat: int, device: str, folder: Path, report: Any,
                 stem: str = "", numbers: tuple[int, ...] = (), recipe_run: str = "") -> list[dict[str, Any]]:
    """Worker runs `numbers` (default: all `repeat`) of the recipe, or of its baseline named `baseline` (given
    the recipe's `recipe_run` directory when it measures against it)."""
    label = f"{info.id} baseline '{baseline}'" if baseline else info.id
    attempts = []
    for attempt in numbers or range(1, repeat + 1):
        report(f"{label}: run {attempt}/{repeat} ...")
        extra = (recipe_run,) if recipe_run else ()  # only a baseline that measures against the recipe's run
        result = run_worker(info, device, folder, attempt, baseline, stem, *extra)
        attempts.append(result)
        if "error" in result:
            report(f"{label}: failed: {result['error']}")
        elif "metric" in result and info.target:
            report(f"{label}: {info.target.metric} {result['metric']:.4g} in {result['wall_s']:.0f} s")
        else:
            report(f"{label}: {result['throughput']:,.4g} {result['throughput_unit']} in {result['wall_s']:.0f} s")
    return attempts


def run_worker(info: catalog.RecipeInfo, device: str, folder: Path, attempt: int, baseline: str = "",
               stem: str = "", recipe_run: str = "") -> dict[str, Any]:
    result_file = folder / f"{stem or info.id}-{attempt}.json"
    log_file = folder / f"{stem or info.id}-{attempt}.log"
    # Run k uses seed k - 1, the recipe and its baselines alike: the medians are over seeds, not over reruns
    # of one seed (whose luck, good or bad, would then be in every run).
    command = [sys.executable, "-c", "from dlnotes.bench import bench_worker; bench_worker()",
               info.id, device, str(folder / "runs"), str(result_file), str(attempt - 1), baseline, recipe_run]
    # The worker chooses how its idle OpenMP threads wait when it starts, not this process at the bench's start:
    # the load may have changed since, and a serving recipe (llm-chat) chooses differently from a training one.
    with log_file.open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env=environment_choosing_its_own_wait()).returncode
    if code != 0 or not result_file.is_file():
        lines = [line for line in log_file.read_text().splitlines() if line.strip()]
        return {"error": f"exit code {code}: {lines[-1] if lines else 'no output'} (log: {log_file})"}
    return json.loads(result_file.read_text())


def bench_worker() -> None:
    """In the worker process: argv = recipe id, device, runs folder, result file, seed, the name of one of the
    recipe's baselines to run instead of the recipe (empty: the recipe), and the recipe's run directory for a
    baseline that measures against it."""
    import resource

    from dlnotes.launch import quiet_idle_threads

    recipe, device, runs, result_file = sys.argv[1:5]
    seed = int(sys.argv[5])
    baseline = sys.argv[6] if len(sys.argv) > 6 else ""
    recipe_run = sys.argv[7] if len(sys.argv) > 7 else ""
    quiet_idle_threads()
    info = catalog.get(recipe)
    result = (baseline_result(info, baseline, device, recipe_run, seed) if baseline
              else recipe_result(info, device, runs, seed))
    result["seed"] = seed
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    Path(result_file).write_text(json.dumps(result))


def recipe_result(info: catalog.RecipeInfo, device: str, runs: str, seed: int = 0) -> dict[str, Any]:
    """Run the recipe's default configuration, or its BENCH one (with `seed`, where it has one), in this process
    and read what it reached from its run directory."""
    module = catalog.load_module(info)
    cfg = module.Config(**catalog.config_values(info, bench=True, device=device, out=runs, seed=seed))
    start = time.perf_counter()
    metrics = module.main(cfg)
    wall = time.perf_counter() - start
    run_dir = list_runs(Path(runs), info.id)[-1]
    result: dict[str, Any] = {"wall_s": wall, "run_dir": str(run_dir)}
    if target := info.target:
        result |= {"metric": float(metrics[target.metric]), "target_met": target.met(float(metrics[target.metric])),
                   "time_to_target_s": time_to_target(run_dir, target, metrics, wall)}
    for key, unit in THROUGHPUT_KEYS:
        if key in metrics:
            result["throughput"], result["throughput_unit"] = float(metrics[key]), unit
            break
    import torch

    if torch.cuda.is_available() and device != "cpu":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if hasattr(module, "training_ceiling") and "throughput" in result:
        result["ceiling"] = float(module.training_ceiling(cfg))
        result["ceiling_fraction"] = result["throughput"] / result["ceiling"]
    return result


def baseline_result(info: catalog.RecipeInfo, name: str, device: str, recipe_run: str = "",
                    seed: int = 0) -> dict[str, Any]:
    """Run the recipe's baseline `name` in this process (with `seed`, where it takes one): its own fields, the
    wall time, and whether the target holds when it reports the metric."""
    start = time.perf_counter()
    base = baselines.find(info.id, name)
    args = (device, recipe_run) if base.after_recipe else (device,)
    seeded = "seed" in inspect.signature(base.run).parameters
    result = dict(base.run(*args, seed=seed) if seeded else base.run(*args))
    result["wall_s"] = time.perf_counter() - start
    if result.get("metric") is not None and info.target:
        result["target_met"] = info.target.met(float(result["metric"]))
    return result


def time_to_target(run_dir: Path, target: catalog.Target, metrics: dict[str, float], wall: float) -> float | None:
    """Seconds into the run of the first logged evaluation that meets the target; the whole run when only the
    final metrics have it; None when it was never met."""
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        value = row.get(target.metric)
        if isinstance(value, (int, float)) and target.met(value) and "time_s" in row:
            return float(row["time_s"])
    final = metrics.get(target.metric)
    return wall if final is not None and target.met(float(final)) else None


def summarize(info: catalog.RecipeInfo, attempts: list[dict[str, Any]], baseline: str = "") -> dict[str, Any]:
    """Medians over the successful attempts; how many met the target; the errors of the others. A baseline's
    row names it, and has `met` None when it does not report the target metric (as has a recipe without one)."""
    good = [a for a in attempts if "error" not in a]
    met = sum(bool(a.get("target_met")) for a in good)
    reports_metric = info.target and (not baseline or any("target_met" in a for a in good))
    row: dict[str, Any] = {"recipe": info.id, "target": info.target.as_list() if info.target else None,
                           "runs": len(attempts), "met": met if reports_metric else None,
                           "errors": [a["error"] for a in attempts if "error" in a]}
    if baseline:
        row["baseline"] = baseline
    for key in ("metric", "wall_s", "throughput", "recipe_throughput", "peak_rss_mib", "peak_cuda_mib", "ceiling",
                "ceiling_fraction", "clock_s"):
        values = [a[key] for a in good if a.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    # A run that never met the target counts as later than every run that did: dropping it would make a seed that
    # never gets there look like no seed at all. Medians that fall on such a run are None (never met).
    times = [a["time_to_target_s"] if a.get("time_to_target_s") is not None else math.inf for a in good]
    median_time = statistics.median(times) if times else math.inf
    row["time_to_target_s"] = median_time if median_time < math.inf else None
    # Where that median is None, a lower bound for it: a run that never met the target would have met it after
    # its whole clock at the earliest, so the median of (time to target, else clock) bounds it from below.
    bounds = [a.get("time_to_target_s") or a.get("clock_s") for a in good]
    row["time_to_target_at_least_s"] = (statistics.median(bounds) if row["time_to_target_s"] is None and bounds
                                        and all(b is not None for b in bounds) else None)
    row["throughput_unit"] = next((a["throughput_unit"] for a in good if "throughput_unit" in a), "")
    row["run_dirs"] = [a["run_dir"] for a in good if "run_dir" in a]  # baselines write no run directory
    return row


def compare(recipe_row: dict[str, Any], baseline_row: dict[str, Any]) -> dict[str, Any]:
    """The baseline's row with how many times the recipe's throughput theirs is, and how many times sooner the
    recipe met the target (None where either number is missing). A baseline on a setup of its own (the notes'
    toy data) measured the recipe's way on it too (`recipe_throughput`): its ratio is between those two."""
    def ratio(top: float | None, bottom: float | None) -> float | None:
        return top / bottom if top and bottom else None

    same_unit = recipe_row["throughput_unit"] == baseline_row["throughput_unit"]
    recipe_throughput = baseline_row.get("recipe_throughput") or (recipe_row["throughput"] if same_unit else None)
    return baseline_row | {
        "throughput_ratio": ratio(recipe_throughput, baseline_row["throughput"]),
        "own_setup": bool(baseline_row.get("recipe_throughput")),
        "time_to_target_ratio": ratio(baseline_row["time_to_target_s"], recipe_row["time_to_target_s"]),
        # a baseline whose median run never met the target ran its whole budget (`clock_s`, on the clock its time to
        # target would have been read from) without it: the recipe was at least this many times sooner
        "time_to_target_ratio_at_least": ratio(baseline_row.get("time_to_target_at_least_s"),
                                               recipe_row["time_to_target_s"])}


def describe_machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else None
    versions = {"python": platform.python_version(), "dlnotes": metadata.version("dlnotes")}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_features": cpu_features(), "gpu": gpu, "device": device,
            "versions": versions}


def markdown_table(rows: list[dict[str, Any]], machine: dict[str, Any], repeat: int) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    features = machine.get("cpu_features")
    simd = (f" ({', '.join(features['flags']) or 'no AVX2'}; torch kernels {features['torch_kernels']}, "
            f"{'native' if features['native_bf16'] else 'no native'} bf16)" if features else "")
    where = machine["gpu"] or f"{machine['cpu']}{simd}, {machine['cores']} cores, no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    lines = [f"Machine: {where}. {versions}. " + (f"Median of {repeat} runs." if repeat > 1 else "One run each."),
             "",
             "| recipe | target | final | met | time to target (s) | wall (s) | throughput | peak memory (MiB) "
             "| of training ceiling | × baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        target = catalog.Target(*row["target"]) if row["met"] is not None else "—"  # a baseline without the metric
        throughput = f"{number(row['throughput'])} {row['throughput_unit']}" if row["throughput"] else "—"
        memory = number(row["peak_rss_mib"]) + (f" (+{number(row['peak_cuda_mib'])} GPU)" if row["peak_cuda_mib"]
                                                 else "")
        ceiling = (f"{row['ceiling_fraction']:.2f} of {number(row['ceiling'])} {row['throughput_unit']}"
                   if row["ceiling_fraction"] is not None else "—")
        met = ("—" if row["met"] is None else f"{row['met']}/{row['runs']}") + (" (errors)" if row["errors"] else "")
        name = f"{row['recipe']} baseline: {row['baseline']}" if row.get("baseline") else row["recipe"]
        lines.append(f"| {name} | {target} | {number(row['metric'], 4)} | {met} | "
                     f"{number(row['time_to_target_s'], 1)} | {number(row['wall_s'], 1)} | {throughput} | {memory} | "
                     f"{ceiling} | {times_baseline(row)} |")
    return "\n".join(lines) + "\n"


def times_baseline(row: dict[str, Any]) -> str:
    """On a baseline's row: the recipe's throughput as a multiple of the baseline's (and the time-to-target
    ratio when both met the target); "—" on a recipe's own row."""
    parts = []
    if row.get("throughput_ratio"):
        on_its_setup = (f" (both on this setup: {row['recipe_throughput']:,.0f} vs {row['throughput']:,.0f})"
                        if row.get("own_setup") else "")
        digits = 2 if row["throughput_ratio"] < 1 else 1  # 0.62×, not 0.6×: a ratio below 1 is read against 0.5
        parts.append(f"recipe {row['throughput_ratio']:,.{digits}f}× the throughput{on_its_setup}")
    if row.get("time_to_target_ratio"):
        parts.append(f"{row['time_to_target_ratio']:,.1f}× sooner to target")
    elif row.get("time_to_target_ratio_at_least"):
        never = "baseline never met it" if row.get("met") == 0 else "the baseline's median run never met it"
        parts.append(f"over {row['time_to_target_ratio_at_least']:,.1f}× sooner to target ({never})")
    return ", ".join(parts) or "—"
