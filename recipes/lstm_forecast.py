"""LSTM forecasting of Mauna Loa CO₂, walk-forward against seasonal-naive and SARIMA baselines.

A forecaster is judged against the forecasts anyone would try first, computed on the same held-out years:

    seasonal naive   next January = last January: ŷ[t+h] = y[t+h-m], m = 12 months (11 years for sunspots)
    SARIMA           (1,1,1)(0,1,1)12, the "airline" model: differences remove trend and season, an ARMA the
                     rest; statsmodels fits it on the training part only
    LSTM             reads the last `window` months, writes all `horizon` next months at once (direct multi-step)

Windowing and scaling. The series is cut into (input window, next `horizon` values) pairs that lie wholly
inside the training part; mean and std come from the training part only (the held-out years must not leak
into the scaler). CO₂ rises for good, so held-out values lie above anything seen in training: the network
predicts *changes from the window's last value* and sees, per month, the level and the change:

    window        (B, L, 2)   L = 48 months: standardised level, level minus the window's last level
    LSTM          (B, L, H)   H = hidden units; only the last step's state is used
    linear        (B, h)      h = 12 scaled changes; forecast = last value + change * std

Walk-forward evaluation: from every month of the held-out years that still has `horizon` months of truth
after it, each method forecasts the next 12 months from the data up to that month (no model is refitted;
SARIMA's state and the LSTM's window simply move on). MAE, RMSE and MASE (MAE divided by the in-sample MAE
of the seasonal-naive forecast on the training part: < 1 beats it) are over all those forecasts.

Data: statsmodels' weekly CO₂ record 1958–2001 (2,284 weeks, 59 missing). Gaps are filled by linear
interpolation in time, then the weeks are averaged into 526 months: a 52-week season gives SARIMA a state of
over 100 numbers and a fit that takes many minutes, while monthly means keep the season and make it seconds.
`--dataset sunspots`: yearly sunspot numbers 1700–2008, an 11-year cycle that is not strictly periodic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator
from dlnotes.device import cpu_threads, pick_device, seed_everything
from dlnotes.errors import DataError, UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_forecasts
from dlnotes.tracking import Run

TAGS = ("time-series", "forecasting", "lstm", "regression")
DATASET = "Mauna Loa CO₂ monthly (statsmodels) | yearly sunspots"
TARGET = ("rmse_ratio", 0.7, "<=")  # LSTM RMSE / seasonal-naive RMSE on the held-out years
SMOKE = {"epochs": 3, "sarima": False}
DATASETS = {"co2": 12, "sunspots": 11}  # name -> season length m in steps
SARIMA_ORDERS = {"co2": ((1, 1, 1), (0, 1, 1)), "sunspots": ((2, 0, 1), (1, 0, 0))}  # (p,d,q), (P,D,Q)


@dataclass
class Config:
    dataset: str = "co2"  # co2 | sunspots
    window: int = 48  # months the LSTM reads: four seasons show both the trend and the yearly swing
    horizon: int = 12  # steps forecast at once: a year ahead
    holdout: int = 36  # the last 36 steps (three years of co2) are never trained on
    hidden: int = 64  # LSTM units: plenty for a series of one number a step
    epochs: int = 60  # training windows are few (~430): epochs are cheap
    batch_size: int = 32
    lr: float = 3e-3  # Adam, cosine-decayed to zero
    sarima: bool = True  # fit the SARIMA baseline (seconds on monthly data; smoke runs skip it)
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/lstm-forecast/

    def __post_init__(self) -> None:
        require_positive(self, "window", "horizon", "holdout", "hidden", "epochs", "batch_size", "lr")
        require_choice(self, "dataset", DATASETS)


# --- data and the two baselines that need no training ---------------------------------------------------------


def load_series(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, times in decimal years) of a series that ships with statsmodels."""
    try:
        import statsmodels.api as sm
    except ImportError as err:
        raise DataError("The series are read from the PyPI package statsmodels, which is not installed: "
                        "pip install statsmodels.") from err
    if name == "co2":
        weekly = sm.datasets.co2.load_pandas().data["co2"]  # W-SAT index, 59 NaN
        monthly = weekly.interpolate("time").resample("MS").mean()  # gaps: straight lines between neighbours
        times = monthly.index.year + (monthly.index.month - 1) / 12
        return monthly.to_numpy(np.float64), np.asarray(times, np.float64)
    data = sm.datasets.sunspots.load_pandas().data
    return data["SUNACTIVITY"].to_numpy(np.float64), data["YEAR"].to_numpy(np.float64)


def seasonal_naive(series: np.ndarray, origins: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """(O, h) forecasts: step h from origin t repeats the value one season (or more) back, y[t+h-m(⌊(h-1)/m⌋+1)]."""
    steps = np.arange(1, horizon + 1)
    back = period * ((steps - 1) // period + 1)  # (h,) how far back the same season was last seen
    return series[origins[:, None] + steps[None, :] - 1 - back[None, :]]


def errors(forecast: np.ndarray, truth: np.ndarray, scale: float) -> dict[str, float]:
    """MAE, RMSE and MASE over every (origin, step) of a walk-forward evaluation."""
    diff = forecast - truth
    mae = float(np.abs(diff).mean())
    return {"mae": mae, "rmse": float(np.sqrt((diff**2).mean())), "mase": mae / scale}


def sarima_forecasts(series: np.ndarray, split: int, origins: np.ndarray, horizon: int, name: str) -> np.ndarray:
    """Fit on series[:split] once; from each origin, filter the data up to it with those parameters and forecast."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    order, seasonal = SARIMA_ORDERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the optimizer
        fitted = SARIMAX(series[:split], order=order, seasonal_order=(*seasonal, DATASETS[name])).fit(disp=False)
        return np.stack([fitted.apply(series[:t]).forecast(horizon) for t in origins])  # (O, h)


# --- the LSTM ------------------------------------------------------------------------------------------------


class Forecaster(nn.Module):
    def __init__(self, hidden: int, horizon: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        features = torch.stack([window, window - window[:, -1:]], dim=2)  # (B, L) -> (B, L, 2)
        states, _ = self.lstm(features)  # (B, L, H)
        return self.head(states[:, -1])  # (B, h) changes from the last value, in units of std


def windows(scaled: torch.Tensor, ends: np.ndarray, window: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, L) ending just before each of `ends`, targets (N, h): the next h values minus the last input."""
    idx = torch.as_tensor(ends)[:, None]
    x = scaled[idx + torch.arange(-window, 0)]  # (N, L)
    y = scaled[idx + torch.arange(horizon)] - x[:, -1:]  # (N, h)
    return x, y


@torch.no_grad()
def lstm_forecasts(model: Forecaster, scaled: torch.Tensor, origins: np.ndarray, window: int, mean: float,
                   std: float) -> np.ndarray:
    model.eval()
    x, _ = windows(scaled, origins, window, 0)  # (O, L)
    return ((x[:, -1:] + model(x)) * std + mean).cpu().numpy().astype(np.float64)  # (O, h) in the series' units


def main(cfg: Config) -> dict[str, float]:
    with cpu_threads(1):  # a 64-unit LSTM on batches of 32: more threads only wait for each other
        return train(cfg, pick_device(cfg.device))


def train(cfg: Config, device: torch.device) -> dict[str, float]:
    generator = seed_everything(cfg.seed)
    series, times = load_series(cfg.dataset)
    split, period = len(series) - cfg.holdout, DATASETS[cfg.dataset]
    if cfg.window + cfg.horizon > split or cfg.horizon > cfg.holdout or split <= period:
        raise UserError(f"--window {cfg.window} + --horizon {cfg.horizon} must fit in the training part and "
                        f"--horizon in --holdout {cfg.holdout}: {cfg.dataset} has {len(series)} points.")
    mean, std = float(series[:split].mean()), float(series[:split].std())  # the training part's only
    scaled = torch.tensor((series - mean) / std, dtype=torch.float32, device=device)  # (T,)
    train_x, train_y = windows(scaled, np.arange(cfg.window, split - cfg.horizon + 1), cfg.window, cfg.horizon)
    origins = np.arange(split, len(series) - cfg.horizon + 1)  # walk-forward: every step of the held-out years
    truth = series[origins[:, None] + np.arange(cfg.horizon)]  # (O, h)
    scale = float(np.abs(series[period:split] - series[:split - period]).mean())  # MASE's denominator
    run = Run(__file__, cfg, device)
    print(f"data: {cfg.dataset}, {len(series)} points, {len(train_x)} training windows, {len(origins)} walk-forward "
          f"origins  device: {device}  run: {run.dir}")

    baseline = {"snaive": seasonal_naive(series, origins, cfg.horizon, period)}
    if cfg.sarima:
        baseline["sarima"] = sarima_forecasts(series, split, origins, cfg.horizon, cfg.dataset)
    scores = {f"{name}_{k}": v for name, f in baseline.items() for k, v in errors(f, truth, scale).items()}

    model = Forecaster(cfg.hidden, cfg.horizon).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = len(batch_indices(len(train_x), cfg.batch_size, shuffle=False))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    start = run.attach(model, optimizer, scheduler, generator)  # on --resume, restores all four
    for epoch in range(start.epoch, cfg.epochs + 1):
        model.train()
        batches = batch_indices(len(train_x), cfg.batch_size, epoch_generator(cfg.seed, epoch))
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            idx = batch.to(device)
            loss = F.mse_loss(model(train_x[idx]), train_y[idx])  # (B, h) vs (B, h)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.update(len(batch), loss=loss.detach())
        forecast = lstm_forecasts(model, scaled, origins, cfg.window, mean, std)
        lstm_rmse = errors(forecast, truth, scale)["rmse"]
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), lstm_rmse=lstm_rmse,
                      rmse_ratio=lstm_rmse / scores["snaive_rmse"])

    forecast = lstm_forecasts(model, scaled, origins, cfg.window, mean, std)
    scores |= {f"lstm_{k}": v for k, v in errors(forecast, truth, scale).items()}
    scores["rmse_ratio"] = scores["lstm_rmse"] / scores["snaive_rmse"]
    save_checkpoint(run.dir, run.recipe, model, cfg, mean=mean, std=std, history=series[-cfg.window:].tolist(),
                    last_time=float(times[-1]), step_years=float(times[-1] - times[-2]))
    shown = origins[:: cfg.horizon]  # non-overlapping forecasts that tile the held-out years
    plot_forecasts(times[max(0, split - 4 * cfg.horizon):], series[max(0, split - 4 * cfg.horizon):],
                   {name: (times[shown[:, None] + np.arange(cfg.horizon)], f[:: cfg.horizon])
                    for name, f in (baseline | {"lstm": forecast}).items()},
                   run.dir / "forecasts.png", title=f"{cfg.dataset}: {cfg.horizon}-step forecasts, held-out part",
                   split=float(times[split]))
    return run.finish(scores)


# --- forecasting beyond the data --------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: tuple[str, ...] = (), steps: int = 12) -> list[dict]:
    """Forecast the next STEPS points after the end of the series (beyond the horizon, forecasts are fed back)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    if inputs:
        raise UserError(f"lstm-forecast forecasts from the end of its own series and takes no inputs (got "
                        f"{inputs[0]!r}); ask for the number of steps with --steps N.")
    if steps <= 0 or steps > len(state["history"]) * 10:
        raise UserError(f"--steps must be between 1 and {len(state['history']) * 10}, got {steps}.")
    model = Forecaster(cfg.hidden, cfg.horizon)
    load_weights(model, state)
    mean, std = state["mean"], state["std"]
    scaled = torch.tensor((np.asarray(state["history"]) - mean) / std, dtype=torch.float32)  # (L,)
    while len(scaled) < len(state["history"]) + steps:
        ahead = lstm_forecasts(model, scaled, np.array([len(scaled)]), cfg.window, 0.0, 1.0)[0]  # (h,) scaled
        scaled = torch.cat([scaled, torch.as_tensor(ahead, dtype=torch.float32)])
    values = scaled[len(state["history"]):][:steps].numpy() * std + mean
    results = []
    for i, value in enumerate(values, 1):
        if state["step_years"] < 1:  # months: count them as integers, decimal years would round badly
            month = round(state["last_time"] * 12) + i
            label = f"{month // 12}-{month % 12 + 1:02d}"
        else:
            label = f"{state['last_time'] + i * state['step_years']:.0f}"
        results.append({"input": label, "output": f"{value:.2f}"})
    return results


if __name__ == "__main__":
    cli(Config, main)
