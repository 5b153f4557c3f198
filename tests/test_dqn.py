"""The dqn recipe: replay buffer, TD target, truncation, learning, checkpoint -> predict, GIF, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from typer.testing import CliRunner

from dlnotes import catalog
from dlnotes.cli import app

dqn = catalog.load_module(catalog.get("dqn"))

# every episode of this CartPole is cut by its 5-step time limit (truncated) before the pole can fall (terminated)
gym.register("dlnotes-test/ShortCartPole-v0", entry_point="gymnasium.envs.classic_control:CartPoleEnv",
             max_episode_steps=5)


class PixelEnv(gym.Env):
    """Discrete actions but an image observation: the recipe must refuse it."""

    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), dtype=np.uint8)
    action_space = gym.spaces.Discrete(2)


gym.register("dlnotes-test/Pixels-v0", entry_point=PixelEnv)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """One smoke run shared by the tests that only read its outputs."""
    from dlnotes.tracking import latest_run

    out = tmp_path_factory.mktemp("runs")
    metrics = dqn.main(dqn.Config(**dqn.SMOKE, device="cpu", out=str(out)))
    return metrics, latest_run(out, "dqn")


def test_smoke_run_writes_everything(smoke: tuple[dict[str, float], Path]) -> None:
    metrics, run_dir = smoke
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["env_steps"] == dqn.SMOKE["total_steps"] and metrics["solved"] == 0.0
    for name in ("checkpoint.pt", "episode.gif", "returns.png", "curves.png", "summary.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name


# --- replay buffer and TD target ----------------------------------------------------------------------------


def test_replay_buffer_wraps_around_and_samples_shapes() -> None:
    buffer = dqn.ReplayBuffer(capacity=5, obs_dim=3, device=torch.device("cpu"))
    for i in range(7):  # 7 transitions into 5 slots: 0 and 1 are overwritten by 5 and 6
        buffer.add(np.full(3, i, np.float32), i % 2, float(i), np.full(3, i + 1, np.float32), i == 6)
    assert (buffer.size, buffer.pos) == (5, 2)
    assert buffer.obs[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert buffer.rewards.tolist() == [5, 6, 2, 3, 4]
    assert buffer.terminated.tolist() == [0, 1, 0, 0, 0]
    obs, actions, rewards, next_obs, terminated = buffer.sample(32)
    assert obs.shape == next_obs.shape == (32, 3) and obs.dtype == torch.float32
    assert actions.shape == rewards.shape == terminated.shape == (32,) and actions.dtype == torch.long
    assert set(rewards.tolist()) <= {2.0, 3.0, 4.0, 5.0, 6.0}
    assert torch.equal(next_obs, obs + 1) and torch.equal(actions, (obs[:, 0] % 2).long())  # rows stay together


class FixedQ(nn.Module):
    """Q(s, ·) = sign * s: hand-checkable Q-values for two actions."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.sign * obs


def test_td_target_on_a_hand_built_batch() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.5])
    next_obs = torch.tensor([[2.0, 3.0], [2.0, 3.0], [4.0, 1.0]])  # target-net Q(s', ·) = s'
    terminated = torch.tensor([1.0, 0.0, 0.0])  # row 0 terminated; row 1 is the same step merely truncated
    online, target_net = FixedQ(-1.0), FixedQ(1.0)  # the online net prefers the other action
    plain = dqn.td_target(rewards, next_obs, terminated, online, target_net, gamma=0.9, double=False)
    assert plain.tolist() == pytest.approx([1.0, 1.0 + 0.9 * 3.0, 0.5 + 0.9 * 4.0])
    double = dqn.td_target(rewards, next_obs, terminated, online, target_net, gamma=0.9, double=True)
    assert double.tolist() == pytest.approx([1.0, 1.0 + 0.9 * 2.0, 0.5 + 0.9 * 1.0])


def test_truncated_episodes_are_stored_as_not_terminated(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored: list[bool] = []

    class Recording(dqn.ReplayBuffer):
        def add(self, obs, action, reward, next_obs, terminated) -> None:  # noqa: ANN001
            stored.append(bool(terminated))
            super().add(obs, action, reward, next_obs, terminated)

    monkeypatch.setattr(dqn, "ReplayBuffer", Recording)
    dqn.main(dqn.Config(env="dlnotes-test/ShortCartPole-v0", total_steps=40, learning_starts=10, eval_every=40,
                        eval_episodes=2, solve_episodes=2, device="cpu", out=str(out_dir)))
    assert len(stored) == 40 and not any(stored)  # 8 episodes ended, all by the time limit: all bootstrap


# --- learning ---------------------------------------------------------------------------------------------


def test_short_run_beats_a_random_policy(out_dir: Path) -> None:
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    random_returns = []
    for i in range(20):
        env.reset(seed=dqn.EVAL_SEED + i)
        done, total = False, 0.0
        while not done:
            _, reward, terminated, truncated, _ = env.step(int(rng.integers(2)))
            total, done = total + reward, terminated or truncated
        random_returns.append(total)
    metrics = dqn.main(dqn.Config(total_steps=5_000, eval_every=5_000, solve_episodes=20,
                                  device="cpu", out=str(out_dir)))
    assert np.mean(random_returns) < 40  # a random policy drops the pole after about 20 steps
    assert metrics["eval_return"] > 3 * np.mean(random_returns)


# --- checkpoint -> predict, GIF -----------------------------------------------------------------------------


def test_predict_replays_the_runs_evaluation(smoke: tuple[dict[str, float], Path], tmp_path: Path) -> None:
    metrics, run_dir = smoke
    gif = tmp_path / "played.gif"
    results = dqn.predict(run_dir, [], episodes=dqn.SMOKE["solve_episodes"], gif=str(gif))
    assert [r["input"] for r in results] == ["CartPole-v1"]
    match = re.fullmatch(r"mean return ([\d.]+) ± ([\d.]+) over 5 greedy episodes", results[0]["output"])
    assert match and float(match.group(1)) == pytest.approx(metrics["eval_return"], abs=0.05)  # same seeds
    with Image.open(gif) as image:
        assert image.n_frames > 1


def test_episode_gif_is_readable(smoke: tuple[dict[str, float], Path]) -> None:
    with Image.open(smoke[1] / "episode.gif") as image:
        assert image.format == "GIF" and image.n_frames > 1 and image.width <= 300


def test_predict_through_the_cli(smoke: tuple[dict[str, float], Path]) -> None:
    result = CliRunner().invoke(app, ["predict", "dqn", "--run", str(smoke[1]), "--episodes", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"CartPole-v1: mean return [\d.]+ ± [\d.]+ over 2 greedy episodes", result.output)


# --- bad input ----------------------------------------------------------------------------------------------


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--env", "Nope-v0"], "Cannot make environment 'Nope-v0'"),
    (["--env", "Pendulum-v1"], "needs a discrete action space"),
    (["--env", "dlnotes-test/Pixels-v0"], "needs a flat vector observation"),
    (["--total-steps", "0"], "--total-steps must be positive"),
    (["--eval-every", "-5"], "--eval-every must be positive"),
    (["--loss", "l1"], "Unknown --loss 'l1': use one of huber, mse"),
    (["--gamma", "1.5"], "0 < --gamma <= 1"),
])
def test_bad_run_flags(flags: list[str], message: str, out_dir: Path) -> None:
    assert message in one_line_error(["run", "dqn", *flags, "--out", str(out_dir)])
    assert not any(out_dir.iterdir())  # refused before a run directory was made


def test_predict_bad_options(smoke: tuple[dict[str, float], Path]) -> None:
    run = ["predict", "dqn", "--run", str(smoke[1])]
    assert "--episodes must be positive" in one_line_error([*run, "--episodes", "0"])
    assert "does not match the run's environment" in one_line_error([*run, "Acrobot-v1"])
