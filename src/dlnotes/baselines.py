"""Baselines for `dlnotes bench`: the plain code a recipe replaces, run in the same bench invocation so that a
speed claim is a ratio measured side by side, not a number from another day.

    BASELINES["seq2seq"] -> [Baseline("seq2seq", "notes' per-token loop", seq2seq_per_token_loop)]

A baseline is registered for a recipe id with `@baseline(recipe_id, name)`. It is a function
`run(device: str) -> dict` returning the result fields of a recipe run that apply to it:

    throughput, throughput_unit    required: the same unit as the recipe's, so the two divide
    metric, time_to_target_s       optional: the recipe's TARGET metric and when the baseline met it
    clock_s                        optional: the seconds its clock ran (start as the recipe's run clock does);
                                   with a target never met, the recipe's time to target divides it as a bound
    recipe_throughput              optional: a baseline on a setup of its own (the notes' toy data) times the
                                   recipe's way there too, and its ratio is taken against that

`@baseline(recipe_id, name, after_recipe=True)` makes it `run(device, recipe_run)`, given the run directory the
recipe's own bench run just wrote: to train for as long as the recipe did (transformer-mt's LSTM at equal time).
`@baseline(recipe_id, name, missing=why_not)`: a baseline that needs a tool this machine may lack (llama.cpp's
llama-bench) is skipped with one line when `why_not()` says why.

`bench` runs each baseline in its own worker process, like a recipe, and adds the ratios to its row. The
lesson stays in the recipe file; the slow way it improves on lives here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dlnotes import catalog


@dataclass(frozen=True)
class Baseline:
    recipe: str  # the recipe id it is compared with
    name: str  # shown in the bench table
    run: Callable[..., dict[str, Any]]  # device -> result fields; (device, recipe's run directory) with after_recipe
    after_recipe: bool = False  # it matches something the recipe's run just measured (its training time, say)
    missing: Callable[[], str] = lambda: ""  # why it cannot run on this machine ("" when it can)


BASELINES: dict[str, list[Baseline]] = {}


def baseline(recipe: str, name: str, after_recipe: bool = False, missing: Callable[[], str] = lambda: "",
             ) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register the decorated function as a baseline of `recipe`. With `after_recipe` it is called as
    run(device, recipe_run), the run directory the recipe's own bench run just wrote."""
    def register(function: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        BASELINES.setdefault(recipe, []).append(Baseline(recipe, name, function, after_recipe, missing))
        return function
    return register


def for_recipe(recipe: str) -> list[Baseline]:
    return list(BASELINES.get(recipe, []))


def find(recipe: str, name: str) -> Baseline:
    return next(b for b in for_recipe(recipe) if b.name == name)


# --- cnn-mnist --------------------------------------------------------------------------------------------


@baseline("cnn-mnist", "notes' loop")
def cnn_notes_loop(device: str, max_epochs: int = 15, seed: int = 0) -> dict[str, Any]:
    """The notes' CNN loop as they wrote it: two 16/32-channel conv blocks and a 128-unit head, Adam(1e-3),
    a DataLoader over a TensorDataset with batches of 64, fp32, no augmentation, the held-out split evaluated
    after each epoch. Stops at the first epoch that meets cnn-mnist's TARGET, or after `max_epochs`. The clock
    starts where the recipe's does: data in memory and standardised, before the model is built."""
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    from dlnotes.datasets import load_image_dataset
    from dlnotes.device import pick_device
    from dlnotes.transforms import standardize

    target = catalog.get("cnn-mnist").target
    where = pick_device(device)
    torch.manual_seed(seed)
    data = load_image_dataset("mnist")
    train_x, train_y = standardize(torch.from_numpy(data.train_images)), torch.from_numpy(data.train_labels).long()
    test_x, test_y = standardize(torch.from_numpy(data.test_images)), torch.from_numpy(data.test_labels).long()

    start = time.perf_counter()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    ).to(where)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=1000)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_s, accuracy, time_to_target, epochs = 0.0, 0.0, None, 0
    while epochs < max_epochs:
        epochs += 1
        model.train()
        epoch_start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(where), labels.to(where)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        train_s += time.perf_counter() - epoch_start
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images.to(where)).argmax(1) == labels.to(where)).sum().item()
        accuracy = correct / len(test_y)
        if target.met(accuracy):
            time_to_target = time.perf_counter() - start
            break
    return {"metric": accuracy, "time_to_target_s": time_to_target, "clock_s": time.perf_counter() - start,
            "epochs": epochs,
            "throughput": epochs * len(train_y) / train_s, "throughput_unit": "samples/s"}


# --- dqn --------------------------------------------------------------------------------------------------


@baseline("dqn", "notes' DQN")
def dqn_notes_loop(device: str, total_steps: int = 100_000, seed: int = 0) -> dict[str, Any]:
    """The notes' DQN on CartPole-v1 as the recipe's docs describe what it improves on: a 64-wide Q-network,
    Adam(5e-4), a deque of transition tuples sampled with `random.sample` and stacked with numpy at every step,
    one gradient step of 64 per environment step, MSE on the plain max target with `done = terminated or
    truncated`, a hard target copy every 500 steps, no clipping. Exploration (ε 1 -> 0.05 over 10,000 steps) and
    judging (10 greedy episodes every 2,500 steps; 100 decide once 10 reach 475) are the recipe's own, so the
    two stop on the same rule. Returns env steps/s and, when solved, the seconds it took."""
    import collections
    import copy
    import random

    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from dlnotes.device import pick_device
    from dlnotes.rl import make_env

    info = catalog.get("dqn")
    recipe = catalog.load_module(info)
    cfg = recipe.Config(**catalog.config_values(info, device=device, seed=seed))
    where = pick_device(device)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    env = make_env(cfg.env)
    threshold = env.spec.reward_threshold

    start = time.perf_counter()
    q = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).to(where)
    q_target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=5e-4)
    memory: collections.deque = collections.deque(maxlen=cfg.buffer_size)
    obs, _ = env.reset(seed=seed)
    returns, time_to_target, step = np.zeros(1), None, 0
    for step in range(1, total_steps + 1):
        eps = recipe.epsilon(step, cfg)
        if random.random() < eps:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = int(q(torch.tensor(obs, dtype=torch.float32, device=where)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        memory.append((obs, action, reward, next_obs, done))
        obs = env.reset()[0] if done else next_obs
        if len(memory) >= cfg.learning_starts:
            batch = random.sample(memory, 64)
            states, actions, rewards, next_states, dones = (torch.tensor(np.array(x), dtype=torch.float32, device=where)
                                                            for x in zip(*batch))
            q_taken = q(states).gather(1, actions.long().unsqueeze(1)).squeeze(1)
            with torch.no_grad():
                target = rewards + cfg.gamma * q_target(next_states).max(1).values * (1 - dones)
            loss = F.mse_loss(q_taken, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % 500 == 0:
            q_target.load_state_dict(q.state_dict())
        if step % cfg.eval_every == 0:
            returns = recipe.evaluate(q, cfg.env, cfg.eval_episodes, where)
            if returns.mean() >= threshold:
                returns = recipe.evaluate(q, cfg.env, cfg.solve_episodes, where)
                if returns.mean() >= threshold:
                    time_to_target = time.perf_counter() - start
                    break
    env.close()
    if time_to_target is None:  # the final policy's deciding evaluation, as in the recipe
        returns = recipe.evaluate(q, cfg.env, cfg.solve_episodes, where)
    return {"metric": float(returns.mean()), "time_to_target_s": time_to_target, "clock_s": time.perf_counter() - start,
            "env_steps": step,
            "throughput": step / (time.perf_counter() - start), "throughput_unit": "env steps/s"}


# --- llm-chat ---------------------------------------------------------------------------------------------


def _llama_bench_missing() -> str:
    from dlnotes.llm import llama_bench

    return llama_bench.missing()


@baseline("llm-chat", "llama.cpp llama-bench", missing=_llama_bench_missing)
def llama_cpp_generation(device: str, repetitions: int = 3) -> dict[str, Any]:
    """llama.cpp generating from the same GGUF file the embedded server loads (SmolLM2-135M-Instruct, Q4_1),
    as the issue measured it: `llama-bench -p 64 -n 128` on as many threads as torch uses. Its generation
    tokens/s against the recipe's streamed tokens/s over HTTP; its prompt tokens/s alongside."""
    import torch

    from dlnotes.device import pick_device
    from dlnotes.errors import UserError
    from dlnotes.llm import llama_bench
    from dlnotes.llm.models import default_gguf

    if pick_device(device).type != "cpu":  # the recipe then serves from the GPU: no like-for-like ratio
        raise UserError("The llama.cpp baseline is built for the CPU: bench llm-chat with --device cpu.")
    threads = torch.get_num_threads()
    speeds = llama_bench.run(default_gguf(), threads, repetitions)
    return {"throughput": speeds["generation"], "throughput_unit": "tokens/s",
            "prompt_tokens_per_s": speeds["prompt"], "threads": threads}


# seq2seq's and transformer-mt's baselines live in a module of their own; importing it registers them
from dlnotes import translation_baselines  # noqa: E402, F401
