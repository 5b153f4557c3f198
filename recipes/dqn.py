"""DQN on CartPole: Q-network, experience replay, target network, ε-greedy, until 100 greedy episodes average 475.

Q(s, a) is the return expected after taking action a in state s and acting well afterwards. It obeys
Q(s, a) = r + γ max_a' Q(s', a'), so a network can learn it by regression onto that right-hand side, the
TD target. Three tricks make this stable enough to work:

    experience replay   every transition (s, a, r, s', terminated) goes into a ring buffer; updates use
                        random minibatches from it, which breaks the correlation of consecutive steps
    target network      the TD target uses a slowly-updated copy of the network, so the regression target
                        does not move with every gradient step
    ε-greedy            act at random with probability ε, falling linearly from 1 to 0.05 over the first
                        10,000 steps; otherwise take the action with the highest Q-value

    observation s       (B, D)        D = 4 for CartPole: cart position, velocity, pole angle, angular velocity
    Q-network           (B, D) -> (B, 128) -> (B, 128) -> (B, A)     one Q-value per action, A = 2
    Q(s, a)             (B,)          the taken action's value, `gather`ed from (B, A)
    TD target           (B,)          r + γ (1 - terminated) Q_target(s', argmax_a' Q(s', a'))   (Double DQN)

Terminated is not the same as truncated. CartPole ends when the pole falls (terminated: no future reward,
the target is just r) or after 500 steps (truncated: the time limit of the experiment, not of the task; the
state still has a future, so the target bootstraps). The observation holds no clock: treating both as "done"
would make the same upright state worth 1 at step 500 and about 100 anywhere else. Double DQN lets the online
network pick a' and the target network value it, which curbs the max operator's over-estimation. The Huber
loss and gradient-norm clipping keep a few large TD errors from blowing the network up.

Every `eval_every` steps the greedy policy (ε = 0) plays 10 episodes; when they average the environment's
reward threshold (475 for CartPole-v1), 100 episodes decide, and the run stops once solved.
`--env Acrobot-v1` (solved at -100) or `--env MountainCar-v0` (-110, rarely reached by plain ε-greedy
exploration) trains the same agent on another classic-control task.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.device import cpu_threads, pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.rl import make_env, plot_returns, save_gif
from dlnotes.tracking import Run

TAGS = ("reinforcement-learning", "dqn", "control")
DATASET = "gymnasium CartPole-v1 (simulated, no download)"
TARGET = ("eval_return", 475.0)  # mean return of 100 greedy episodes: CartPole-v1's own "solved" threshold
SMOKE = {"total_steps": 300, "learning_starts": 100, "eval_every": 150, "solve_episodes": 5}
EVAL_SEED = 10_000  # evaluation episodes use seeds EVAL_SEED, EVAL_SEED + 1, ...: never the training seed


@dataclass
class Config:
    env: str = "CartPole-v1"  # any gymnasium env with discrete actions and a vector observation
    total_steps: int = 100_000  # environment-step budget; the run stops earlier once solved
    hidden: int = 128  # width of both hidden layers (the notes use 64)
    lr: float = 5e-4  # Adam, the notes' rate
    batch_size: int = 128  # transitions per gradient step
    buffer_size: int = 50_000  # transitions; the oldest (from the random early policy) are overwritten
    learning_starts: int = 1_000  # random-policy transitions collected before the first update
    train_every: int = 2  # env steps per gradient step: each transition is replayed ~batch_size / 2 = 64 times
    gamma: float = 0.99  # discount: rewards 100 steps ahead still count 37 %
    tau: float = 1.0  # target update: 1 = hard copy every target_every steps, < 1 = soft (Polyak) update
    target_every: int = 500  # env steps between target updates: the TD target holds still for 250 updates
    double: bool = True  # Double DQN: the online net picks a', the target net values it
    loss: str = "huber"  # huber | mse
    max_grad_norm: float = 10.0  # clip the gradient's global norm
    eps_start: float = 1.0
    eps_end: float = 0.05  # keep exploring a little for good
    eps_steps: int = 10_000  # ε falls linearly from eps_start to eps_end over this many steps
    eval_every: int = 2_500  # the greedy return swings a lot during training: check often, stop when solved
    eval_episodes: int = 10  # episodes of the quick periodic check
    solve_episodes: int = 100  # episodes of the deciding evaluation (100 is CartPole's definition)
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/dqn/

    def __post_init__(self) -> None:
        require_positive(self, "total_steps", "hidden", "lr", "batch_size", "buffer_size", "train_every", "tau",
                         "target_every", "max_grad_norm", "eps_steps", "eval_every", "eval_episodes", "solve_episodes")
        require_choice(self, "loss", ("huber", "mse"))
        if not (0 <= self.eps_end <= self.eps_start <= 1 and 0 < self.gamma <= 1 and self.tau <= 1):
            raise UserError("Need 0 <= --eps-end <= --eps-start <= 1, 0 < --gamma <= 1 and --tau <= 1.")


# --- Q-network and replay buffer --------------------------------------------------------------------------


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(),  # (B, hidden)
            nn.Linear(hidden, hidden), nn.ReLU(),  # (B, hidden)
            nn.Linear(hidden, n_actions),  # (B, A) one Q-value per action
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.layers(obs)


class ReplayBuffer:
    """A ring buffer of transitions in preallocated tensors (on the training device); uniform sampling."""

    def __init__(self, capacity: int, obs_dim: int, device: torch.device) -> None:
        self.obs = torch.zeros(capacity, obs_dim, device=device)  # (C, D)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)  # (C, D)
        self.actions = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,)
        self.rewards = torch.zeros(capacity, device=device)  # (C,)
        self.terminated = torch.zeros(capacity, device=device)  # (C,) 1.0 where s' ended the task itself
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs)
        self.next_obs[i] = torch.as_tensor(next_obs)
        self.actions[i], self.rewards[i], self.terminated[i] = action, reward, float(terminated)
        self.pos = (i + 1) % self.capacity  # when full, overwrite the oldest transition
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        names = ("obs", "next_obs", "actions", "rewards", "terminated")
        return {name: getattr(self, name)[: self.size].cpu() for name in names} | {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            self.size = len(state[name])
            getattr(self, name)[: self.size] = state[name]
        self.pos = state["pos"]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(self.size, (batch_size,), device=self.obs.device)  # (B,) with replacement
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx]


# --- the algorithm ----------------------------------------------------------------------------------------


@torch.no_grad()
def td_target(rewards: torch.Tensor, next_obs: torch.Tensor, terminated: torch.Tensor, q: nn.Module,
              q_target: nn.Module, gamma: float, double: bool) -> torch.Tensor:
    """r + γ (1 - terminated) Q_target(s', a'): a' = argmax of the online net (Double DQN) or of the target net."""
    next_q = q_target(next_obs)  # (B, A)
    if double:
        best = q(next_obs).argmax(dim=1, keepdim=True)  # (B, 1) chosen by the online network
        next_value = next_q.gather(1, best).squeeze(1)  # (B,) valued by the target network
    else:
        next_value = next_q.max(dim=1).values  # (B,)
    return rewards + gamma * (1.0 - terminated) * next_value  # (B,) truncated transitions bootstrap


def epsilon(step: int, cfg: Config) -> float:
    fraction = min(step / cfg.eps_steps, 1.0)
    return cfg.eps_start + fraction * (cfg.eps_end - cfg.eps_start)


@torch.no_grad()
def greedy_actions(q: nn.Module, obs: np.ndarray, device: torch.device) -> np.ndarray:
    x = torch.as_tensor(obs, dtype=torch.float32, device=device)  # (N, D)
    return q(x).argmax(dim=1).cpu().numpy()  # (N,)


def evaluate(q: nn.Module, env_id: str, episodes: int, device: torch.device) -> np.ndarray:
    """Returns of greedy (ε = 0) episodes, played side by side so the network sees one batch per step."""
    envs = [make_env(env_id) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=EVAL_SEED + i)[0] for i, env in enumerate(envs)])  # (N, D)
    returns, running = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while running.any():
        actions = greedy_actions(q, obs, device)  # (N,); finished episodes are ignored below
        for i in np.flatnonzero(running):
            obs[i], reward, terminated, truncated, _ = envs[i].step(int(actions[i]))
            returns[i] += reward
            running[i] = not (terminated or truncated)
    return returns


def record_episode(q: nn.Module, env_id: str, device: torch.device) -> tuple[list[np.ndarray], float]:
    """The (H, W, 3) frames of one greedy episode (the first evaluation episode) and the frame rate."""
    env = make_env(env_id, render=True)
    obs, _ = env.reset(seed=EVAL_SEED)
    frames, done = [env.render()], False
    while not done:
        obs, _, terminated, truncated, _ = env.step(int(greedy_actions(q, obs[None], device)[0]))
        frames.append(env.render())
        done = terminated or truncated
    env.close()
    return frames, env.metadata.get("render_fps", 30)


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    with cpu_threads(1):  # a 128-wide MLP is too small to split: more threads only wait for each other
        return train(cfg, pick_device(cfg.device))


def train(cfg: Config, device: torch.device) -> dict[str, float]:
    seed_everything(cfg.seed)
    env = make_env(cfg.env)
    obs_dim, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    threshold = env.spec.reward_threshold  # 475 for CartPole-v1; None = no early stop
    run = Run(__file__, cfg, device)
    print(f"env: {cfg.env} (obs {obs_dim}, actions {n_actions}, solved at {threshold})  device: {device}  "
          f"run: {run.dir}")

    q = QNetwork(obs_dim, n_actions, cfg.hidden).to(device)
    q_target = copy.deepcopy(q)  # only ever updated from q, never by the optimizer
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, device)
    rng = np.random.default_rng(cfg.seed)  # exploration's coin flips and random actions

    recent: collections.deque[float] = collections.deque(maxlen=100)  # returns of the last 100 episodes

    def resumable() -> dict:
        """What a checkpoint keeps beyond q and Adam. The replay buffer is saved, not rebuilt: it is the agent's
        memory (about 2 MB for CartPole), and refilling it with the current policy would change what is learned."""
        return {"q_target": q_target.state_dict(), "buffer": buffer.state_dict(), "rng": rng.bit_generator.state,
                "recent": list(recent)}

    start = run.attach(q, optimizer, extra=resumable)  # Ctrl-C saves; --resume restores here
    if run.restored_extra:
        q_target.load_state_dict(run.restored_extra["q_target"])
        buffer.load_state_dict(run.restored_extra["buffer"])
        rng.bit_generator.state = run.restored_extra["rng"]
        recent.extend(run.restored_extra["recent"])
    # A resumed run starts a fresh episode: the interrupted one's simulator state is not saved.
    obs, _ = env.reset(seed=cfg.seed + start.step)
    episode_return, solved, step = 0.0, False, start.step
    avg_return = float(np.mean(recent)) if recent else 0.0
    loss, loss_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for step in run.steps(range(1, cfg.total_steps + 1), total=cfg.total_steps, desc=cfg.env):
        # act ε-greedily and store the transition
        eps = epsilon(step, cfg)
        action = int(rng.integers(n_actions)) if rng.random() < eps else int(greedy_actions(q, obs[None], device)[0])
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, float(reward), next_obs, terminated)  # `truncated` is not stored: s' has a future
        obs, episode_return = next_obs, episode_return + float(reward)
        if terminated or truncated:
            run.log(step=step, episode_return=episode_return, epsilon=eps)
            recent.append(episode_return)
            avg_return = float(np.mean(recent))  # of the last 100 training episodes, shown in the progress
            obs, episode_return = env.reset()[0], 0.0

        # learn from a random minibatch of past transitions
        if step > cfg.learning_starts and step % cfg.train_every == 0:
            states, actions, rewards, next_states, dones = buffer.sample(cfg.batch_size)  # (B, D), (B,) ...
            target = td_target(rewards, next_states, dones, q, q_target, cfg.gamma, cfg.double)  # (B,)
            q_taken = q(states).gather(1, actions.unsqueeze(1)).squeeze(1)  # (B, A) -> (B,)
            loss = (F.smooth_l1_loss if cfg.loss == "huber" else F.mse_loss)(q_taken, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(q.parameters(), cfg.max_grad_norm)
            optimizer.step()
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1  # summed on the device: no sync
        if step % cfg.target_every == 0:
            with torch.no_grad():
                for target_param, param in zip(q_target.parameters(), q.parameters()):
                    target_param.lerp_(param, cfg.tau)  # θ' <- θ' + τ (θ - θ'); τ = 1 copies
        run.update(1, loss=loss.detach(), avg_return=avg_return, epsilon=eps)

        # greedy evaluation; 100 episodes decide once 10 look solved
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            returns = evaluate(q, cfg.env, cfg.eval_episodes, device)
            if threshold is not None and returns.mean() >= threshold:
                returns = evaluate(q, cfg.env, cfg.solve_episodes, device)
                solved = bool(returns.mean() >= threshold)
            run.log(step=step, eval_return=returns.mean(), eval_std=returns.std(),
                    loss=(loss_sum / max(loss_count, 1)).item())
            run.save_checkpoints(eval_return=returns.mean())  # last-<step>.pt, and best.pt by eval_return
            loss_sum, loss_count = torch.zeros((), device=device), 0
            if solved:
                print(f"solved after {step:,} environment steps: {returns.mean():.1f} ± {returns.std():.1f} "
                      f"over {len(returns)} greedy episodes")
                break
    env.close()

    if not solved:  # the final policy's deciding evaluation
        returns = evaluate(q, cfg.env, cfg.solve_episodes, device)
    save_checkpoint(run.dir, run.recipe, q, cfg, obs_dim=obs_dim, n_actions=n_actions)
    frames, fps = record_episode(q, cfg.env, device)
    save_gif(frames, run.dir / "episode.gif", fps)
    plot_returns(run.history, run.dir / "returns.png", threshold, title=f"{run.recipe} on {cfg.env}")
    return run.finish({"eval_return": float(returns.mean()), "eval_std": float(returns.std()),
                       "solved": float(solved), "env_steps": float(step), "env_steps_per_s": run.samples_per_s})


# --- using the trained policy -----------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: tuple[str, ...] = (), episodes: int = 10, gif: str = "") -> list[dict]:
    """Play greedy episodes with a trained Q-network: mean ± std return. Inputs are environment ids with the
    same observation and actions (default: the run's own); the episodes use the seeds of the run's own
    evaluation, so `--episodes 100` reproduces its eval_return. `--gif FILE` records the first episode."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    if episodes <= 0:
        raise UserError(f"--episodes must be positive, got {episodes}.")
    q = QNetwork(state["obs_dim"], state["n_actions"], cfg.hidden)
    load_weights(q, state)
    device = torch.device("cpu")  # one small MLP: the CPU is fastest
    results = []
    for env_id in inputs or [cfg.env]:
        env = make_env(env_id)
        if (env.observation_space.shape[0], env.action_space.n) != (state["obs_dim"], state["n_actions"]):
            raise UserError(f"{env_id} does not match the run's environment {cfg.env} (observation size and "
                            "number of actions differ).")
        returns = evaluate(q, env_id, episodes, device)
        results.append({"input": env_id, "output": f"mean return {returns.mean():.1f} ± {returns.std():.1f} "
                                                   f"over {episodes} greedy episodes"})
        if gif and len(results) == 1:
            frames, fps = record_episode(q, env_id, device)
            save_gif(frames, Path(gif), fps)
    return results


if __name__ == "__main__":
    cli(Config, main)
