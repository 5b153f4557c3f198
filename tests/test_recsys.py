"""recsys: MF recovers a planted low-rank matrix, the metrics by hand, predict, exact resume, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from dlnotes import catalog, installed_data
from dlnotes.tracking import latest_run

RECIPE = "recsys"


def recipe():
    return catalog.load_module(catalog.get(RECIPE))


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def planted(n_users: int = 300, n_items: int = 200, rank: int = 3, share: float = 0.5, noise: float = 0.1):
    """Ratings μ + b_u + b_i + P Qᵀ + noise with P, Q of rank 3, half of the entries observed."""
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 0.6, (n_users, rank)), rng.normal(0, 0.6, (n_items, rank))
    full = 3.5 + rng.normal(0, 0.3, (n_users, 1)) + rng.normal(0, 0.3, (1, n_items)) + p @ q.T
    users, items = np.nonzero(rng.random((n_users, n_items)) < share)
    stars = (full[users, items] + rng.normal(0, noise, len(users))).astype(np.float32)
    return recipe().Ratings(users, items, stars, rng.random(len(users)), [str(u + 1) for u in range(n_users)],
                            [f"film {i}" for i in range(n_items)], {"planted": {"rank": rank}})


def test_mf_recovers_a_planted_low_rank_matrix(smoke_run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe(), "load_ratings", planted)
    metrics, run_dir = smoke_run(RECIPE, epochs=12, limit_batches=0, batch_size=256, factors=8, reg=0.01, lr=2e-2)
    assert metrics["bias_rmse"] > 0.5  # biases alone cannot explain P Qᵀ
    assert metrics["mf_rmse"] < 0.25  # MF gets close to the noise (0.1) on entries it never saw
    history = rows(run_dir)
    assert history[-1]["train_loss"] < 0.2 * history[0]["train_loss"]


def test_leave_last_out_and_ranking_by_hand() -> None:
    module = recipe()
    data = module.Ratings(np.array([1, 0, 0, 1, 1]), np.zeros(5, int), np.ones(5, np.float32),
                          np.array([5, 7, 3, 9, 9]), ["a", "b"], ["x"], {})
    assert module.leave_last_out(data).tolist() == [1, 4]  # user 0's latest; user 1's tie goes to the later row
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.9, 0.3, 0.1]])
    seen = torch.tensor([[True, False, False, False], [False, False, False, False]])
    # user 0: film 0 is seen, so film 3 (0.5) ranks 2nd; user 1: film 0 (0.2) ranks 3rd
    recall, ndcg = module.ranking(scores, seen, torch.tensor([3, 0]), k=2)
    assert recall == pytest.approx(0.5) and ndcg == pytest.approx((1 / np.log2(3)) / 2)


def test_smoke_on_movielens_learns_and_records_the_data(smoke_run) -> None:
    metrics, run_dir = smoke_run(RECIPE, epochs=2, limit_batches=40)
    history = rows(run_dir)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert metrics["bias_rmse"] < metrics["mean_rmse"] < 1.2
    assert metrics["pop_recall10"] > 0.05  # most-rated-first finds the next film for 1 user in 12: no training
    assert 0 <= metrics["mf_ndcg10"] <= metrics["mf_recall10"] <= 1
    source = json.loads((run_dir / "config.json").read_text())["data"]["ml-100k.inter"]
    assert source["package"] == "recbole" and source["sha256"] == installed_data.MOVIELENS_100K.sha256["ml-100k.inter"]


def test_checkpoint_predict_round_trip(smoke_run, invoke) -> None:
    _, run_dir = smoke_run(RECIPE, epochs=2, limit_batches=40)
    module = recipe()
    [result] = module.predict(run_dir, ["1"], k=5)
    titles = [title for title, _ in result["top"]]
    stars = [value for _, value in result["top"]]
    assert result["input"] == "user 1" and len(titles) == 5 and stars == sorted(stars, reverse=True)
    data = module.load_ratings()
    rated_by_user_1 = {data.titles[i] for i in data.items[data.users == data.user_ids.index("1")]}
    assert not rated_by_user_1 & set(titles)  # only films the user has not rated
    output = invoke("predict", RECIPE, "--run", run_dir, "942", "--k", "3").output
    assert output.startswith("user 942: ") and output.count("(19") >= 3, output  # "Title (1997) 4.123"


def test_an_interrupted_run_resumes_exactly(invoke, out_dir: Path, tmp_path: Path) -> None:
    flags = ["--epochs", "2", "--limit-batches", "6", "--device", "cpu", "--out"]
    assert invoke("run", RECIPE, *flags, out_dir / "a").exit_code == 0
    straight = latest_run(out_dir / "a", RECIPE)
    assert invoke("run", RECIPE, *flags, out_dir / "b", "--save-every", "3", "--keep", "100").exit_code == 0
    stopped = tmp_path / "stopped"  # as if the run had stopped after step 9 (inside epoch 2)
    shutil.copytree(latest_run(out_dir / "b", RECIPE), stopped)
    for path in (stopped / "checkpoints").glob("*.pt"):
        if path.name != "last-00000009.pt":
            path.unlink()
    (stopped / "checkpoint.pt").unlink()
    resumed = invoke("run", RECIPE, "--resume", stopped)
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    assert rows(stopped) == rows(straight)
    final = torch.load(stopped / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in torch.load(straight / "checkpoint.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(final[name], tensor)


def test_unknown_user_is_one_line(smoke_run, invoke) -> None:
    _, run_dir = smoke_run(RECIPE)
    assert_one_line_error(invoke("predict", RECIPE, "--run", run_dir, "1", "99999"), "Unknown user id 99999", "943")


def test_missing_recbole_is_one_line(invoke, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = installed_data.importlib.util.find_spec
    monkeypatch.setattr(installed_data.importlib.util, "find_spec",
                        lambda name, *args: None if name == "recbole" else real(name, *args))
    assert_one_line_error(invoke("run", RECIPE, "--smoke", "--out", out_dir), "pip install --no-deps recbole==1.2.1")
    assert not list(out_dir.glob("*/*"))
