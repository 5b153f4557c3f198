"""Reinforcement-learning plumbing: checked gymnasium environments, episode GIFs, a returns plot.

gymnasium, Pillow and matplotlib are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dlnotes.errors import UserError
from dlnotes.plots import pyplot


def make_env(env_id: str, render: bool = False) -> Any:
    """`gym.make(env_id)` for an environment with discrete actions and a flat vector observation;
    anything else (unknown id, missing dependency, continuous actions, image observations) is a UserError."""
    import gymnasium as gym

    if render:
        # rgb_array frames need no window; without this SDL complains about the display on headless machines
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if ":" in env_id or env_id not in gym.registry:
        # "module:Env-v0" makes gymnasium import `module` first: an id read from a checkpoint or typed by a user
        # must not run code, so only environments already registered are made.
        raise UserError(f"Cannot make environment '{env_id}': not a registered gymnasium id (such as CartPole-v1 "
                        "or Acrobot-v1); ids of the form module:Name are refused: they import code.")
    try:
        env = gym.make(env_id, **({"render_mode": "rgb_array"} if render else {}))
    except gym.error.Error as err:  # unknown id or version, missing namespace, missing dependency
        message = " ".join(str(err).split())
        raise UserError(f"Cannot make environment '{env_id}': {message}") from err
    except ImportError as err:
        raise UserError(f"Environment '{env_id}' needs a package that is not installed: {err}") from err
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise UserError(f"Environment '{env_id}' has {type(env.action_space).__name__} actions; "
                        "this recipe needs a discrete action space (e.g. CartPole-v1, Acrobot-v1).")
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        env.close()
        raise UserError(f"Environment '{env_id}' observes {space}; this recipe needs a flat vector observation "
                        "(image observations need a convolutional Q-network).")
    return env


def save_gif(frames: list[np.ndarray], path: Path, fps: float, max_width: int = 300, max_fps: float = 25) -> Path:
    """Write (H, W, 3) uint8 frames as a looping GIF, scaled down to `max_width` and thinned to `max_fps`
    (a 500-step CartPole episode at full size would be tens of megabytes)."""
    from PIL import Image

    stride = max(1, round(fps / max_fps))
    images = []
    for frame in frames[::stride]:
        image = Image.fromarray(frame)
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.BILINEAR)
        images.append(image)
    duration_ms = 10 * round(100 * stride / fps)  # GIF delays are counted in hundredths of a second
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(duration_ms, 20), loop=0)
    return path


def plot_returns(history: list[dict[str, Any]], path: Path, threshold: float | None = None,
                 window: int = 100, title: str = "") -> None:
    """Two panels from a run's logged rows (keys `step`, `episode_return`, `eval_return`, `eval_std`, `epsilon`):
    training episode returns with their `window`-episode moving average, greedy evaluations (mean ± std) and
    the solved line; and the exploration rate ε, all against environment steps."""
    plt = pyplot()
    episodes = [(r["step"], r["episode_return"], r["epsilon"]) for r in history if "episode_return" in r]
    evals = [(r["step"], r["eval_return"], r.get("eval_std", 0.0)) for r in history if "eval_return" in r]
    fig, (ax, ax_eps) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    if episodes:
        steps, returns, epsilons = map(np.asarray, zip(*episodes))
        ax.plot(steps, returns, color="tab:blue", alpha=0.3, lw=0.8, label="episode return (training)")
        moving = np.convolve(returns, np.ones(window), "full")[: len(returns)] / np.minimum(
            np.arange(1, len(returns) + 1), window)  # mean of the last `window` episodes (fewer at the start)
        ax.plot(steps, moving, color="tab:blue", lw=2, label=f"moving average ({window} episodes)")
        ax_eps.plot(steps, epsilons, color="tab:green")
    if evals:
        steps, means, stds = map(np.asarray, zip(*evals))
        ax.errorbar(steps, means, yerr=stds, color="tab:orange", marker="o", ms=4, capsize=3,
                    label="greedy evaluation (mean ± std)")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"solved ({threshold:g})")
    ax.set(xlabel="environment steps", ylabel="return", title="returns")
    ax.legend(fontsize=8, loc="best")
    ax_eps.set(xlabel="environment steps", ylabel="ε", title="exploration rate ε", ylim=(0, 1.05))
    for a in (ax, ax_eps):
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
