"""GPT from scratch: a decoder-only transformer writes Bible English one character at a time, next to an LSTM.

A language model predicts the next character from the ones before it; its loss is the cross-entropy of that
guess (nats per character: ln 67 = 4.2 for a uniform guess over the 67 English characters). Attention lets each
position read any earlier position directly. Every position t makes a query q_t, every position s a key k_s
and a value v_s; t takes the softmax-weighted mean of the values, weighted by how well q_t matches each k_s:

    characters      (B, T)          ids of T consecutive characters, T <= block_size
    embeddings      (B, T, C)       token embedding + position embedding (attention itself has no order)
    q, k, v         (B, H, T, C/H)  one linear layer makes all three, split into H heads of width C/H
    scores          (B, H, T, T)    q k^T / sqrt(C/H): the scaling keeps the softmax from saturating
    causal mask     (T, T)          position t may look at s <= t only: scores above the diagonal -> -inf
    weights         (B, H, T, T)    softmax over the last axis: each row sums to 1 (the heat map's rows)
    mixed values    (B, H, T, C/H)  weights @ v; heads side by side again -> (B, T, C), then a linear layer

A block is x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) (pre-LayerNorm: the residual path stays
an identity, so deep stacks train without a careful warm-up). The output layer shares the embedding matrix
(weight tying: the same vector for "reading" and "writing" a character, and fewer parameters). Training uses
AdamW (weight decay on matrices only), a linear warm-up then cosine decay, and gradient-norm clipping.

In the same run, on the same batches, for the same steps, an LSTM with about the same number of parameters
learns the same task: the notes' history rnn -> lstm -> attention made measurable (both validation curves
in gpt_vs_lstm.png). At this size and budget the LSTM wins, by a margin that shrinks as training goes on
(numbers in the README). Why, measured at equal steps: the LSTM is far ahead from the first steps, and the
gap is a matter of steps, not of a badly tuned GPT. The transformer starts with attention spread evenly
over every earlier character and position embeddings that mean nothing yet, so for its first hundred-odd
steps it knows little more than which character tends to follow which (a plateau near the bigram loss,
2.3); it must first learn heads that look at the last few characters, which an LSTM reads by construction.
Early on the GPT needs about four times the LSTM's steps to reach the same loss. The usual knobs each win
back a part of that gap and none closes it: a higher learning rate, GPT-2's scaled residual init, a shallower,
wider GPT (2 layers of 176 instead of 4 of 128: fewer layers to pass a signal through while the heads are
still useless) and - the largest - rotary positions (Llama's RoPE: "three characters back" is then one pattern
for every position); a longer context or a larger batch do not flip it either. What the transformer buys -
every position trained in parallel, direct access to any earlier character instead of one squeezed state,
better use of width and data - pays on GPUs, at larger sizes and with longer training than 10 CPU minutes.

Generation samples one character at a time (temperature, top-k). A KV cache keeps every layer's keys and
values, so each new character costs one position's work instead of re-running the whole context; when the
context is full, the cache restarts from the newest half. attention.png shows, for a validation verse,
which earlier characters each head of each layer looks at.

Data: the English side of the bible-en-es verses (shipped split files: train for training, the first
`eval_windows` windows of the validation split for validation), one verse a line; `--dataset
chinese-reviews` trains a Chinese character model on the review sentences the same way (validation
characters never seen in training are dropped: a character model cannot predict them). Batches are random
windows of the training text. `--nproc N` shards each batch over N processes (DistributedDataParallel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import distributed
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_curves, plot_heatmap_grid
from dlnotes.speedups import autocast, compile_model, grad_scaler, resolve_precision
from dlnotes.textdata import load_text_classification, load_translation_pairs
from dlnotes.tracking import Run

TAGS = ("text", "language-model", "transformer", "attention")
DATASET = "English Bible verses (bible-en-es) | Chinese reviews"
TARGET = ("val_loss", 1.35, "<=")  # nats per character on the held-out verses (the GPT's)
SMOKE = {"total_steps": 30, "eval_every": 15, "eval_windows": 16, "batch_size": 8, "block_size": 32,
         "n_layer": 1, "n_head": 2, "d_model": 32, "warmup_steps": 5}
DISTRIBUTED = True  # dlnotes run transformer --nproc N
DATASETS = ("bible-en", "chinese-reviews")


@dataclass
class Config:
    dataset: str = "bible-en"  # bible-en | chinese-reviews
    total_steps: int = 1500  # optimizer steps of each model; a step count, so quality does not depend on speed
    batch_size: int = 32  # windows per step
    block_size: int = 64  # context length: what the model may look back at (nanoGPT's CPU setting)
    n_layer: int = 4  # nanoGPT's CPU configuration: 4 layers, 4 heads, 128 wide (0.8M parameters)
    n_head: int = 4  # 4 heads of width 32: each can follow a different pattern (the heat map's columns)
    d_model: int = 128  # the residual stream's width C
    dropout: float = 0.0  # 1,500 x 32 x 64 = one pass over the training text: nothing to overfit yet
    lr: float = 2e-3  # peak AdamW rate; small models take a larger rate than nanoGPT's 6e-4 for GPT-2
    warmup_steps: int = 100  # linear warm-up: Adam's early, noisy moment estimates make large steps unsafe
    weight_decay: float = 0.1  # on matrices and embeddings only, not on biases and LayerNorm gains
    grad_clip: float = 1.0  # clip the global gradient norm: one bad batch cannot throw the weights away
    lstm_layers: int = 2  # the LSTM's width is chosen to give it the transformer's parameter count
    eval_every: int = 250  # steps between validation losses of both models
    eval_windows: int = 512  # validation windows of block_size characters: ~33k characters, about 250 verses
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 on GPUs, fp32 on CPUs
    compile: bool = False  # torch.compile both models: pays on GPUs, the first steps wait for the compiler
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/transformer/

    def __post_init__(self) -> None:
        require_choice(self, "dataset", DATASETS)
        require_positive(self, "total_steps", "batch_size", "block_size", "n_layer", "n_head", "d_model", "lr",
                         "grad_clip", "lstm_layers", "eval_every", "eval_windows")
        if self.d_model % self.n_head:
            raise UserError(f"--d-model {self.d_model} must be a multiple of --n-head {self.n_head}.")


# --- attention, written out -------------------------------------------------------------------------------


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v, where `mask` (True = may look) allows it. Returns the output and the weights."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, T, S) masked scores get no weight
    weights = scores.softmax(dim=-1)  # (B, H, T, S) each row sums to 1
    return weights @ v, weights  # (B, H, T, D), (B, H, T, S)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)  # queries, keys and values of all heads in one matrix multiply
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:  # generation: keys and values of the earlier positions were kept
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, S + T, D)
                v = torch.cat([cache["v"], v], dim=2)  # (B, H, S + T, D)
            cache["k"], cache["v"] = k, v
        past = k.size(2) - T  # S positions before this call's first one
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, S + T)
        y, weights = scaled_dot_product(q, k, v, mask)  # (B, H, T, D), (B, H, T, S + T)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C) the heads side by side
        return self.proj(y), weights


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attn(self.ln1(x), cache)  # (B, T, C)
        x = x + self.drop(attended)  # (B, T, C) residual: the block adds to x, never replaces it
        return x + self.drop(self.mlp(self.ln2(x))), weights  # (B, T, C); the MLP works on each position alone


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying: one (V, C) matrix reads and writes characters
        for module in self.modules():  # GPT-2's init: small weights, so the tied logits start near uniform
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, caches: list[dict] | None = None,
                with_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        past = caches[0]["k"].size(2) if caches and "k" in caches[0] else 0  # positions already in the cache
        positions = torch.arange(past, past + idx.size(1), device=idx.device)  # (T,)
        x = self.drop(self.tok(idx) + self.pos(positions))  # (B, T, C) + (T, C) -> (B, T, C)
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, caches[i] if caches else None)  # (B, T, C)
            maps.append(weights)
        logits = self.head(self.ln(x))  # (B, T, V)
        return (logits, maps) if with_attention else logits


class LSTMModel(nn.Module):
    """The same task for an LSTM: embedding, stacked LSTM, tied output layer."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        # PyTorch's N(0, 1) embedding init, kept on purpose: with the GPT's 0.02 the LSTM's gates see almost no
        # input and it sits at the unigram loss for hundreds of steps. A weak baseline would prove nothing.
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))  # (B, T, H): one state carried through T sequential steps
        return self.head(out)  # (B, T, V)


def lstm_width(vocab: int, layers: int, budget: int) -> int:
    """The widest LSTM with at most `budget` parameters: V H (tied embedding) + layers (8 H^2 + 8 H)."""
    return max(h for h in range(4, 4096) if vocab * h + layers * (8 * h * h + 8 * h) <= budget)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied matrix once


# --- data, schedule, evaluation, sampling -----------------------------------------------------------------


def load_texts(dataset: str) -> tuple[str, str]:
    """Training and validation text: one verse (or review) a line, from the shipped split files."""
    if dataset == "bible-en":
        splits = {s: [en for en, _ in pairs] for s, pairs in load_translation_pairs("bible-en-es").items()}
    else:
        splits = {s: texts for s, (texts, _) in load_text_classification("chinese-reviews").splits.items()}
    return "\n".join(splits["train"]) + "\n", "\n".join(splits["validation"]) + "\n"


def random_windows(data: torch.Tensor, batch: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of block + 1 characters: inputs are [:-1], next-character targets [1:]."""
    starts = torch.randint(len(data) - block - 1, (batch,), generator=generator)  # (B,)
    return torch.stack([data[s: s + block + 1] for s in starts.tolist()])  # (B, T + 1)


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to a tenth of it at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, precision: str, batch: int = 64) -> float:
    """Mean next-character loss over the fixed validation windows (N, T + 1)."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        with autocast(chunk.device, precision):
            logits = model(chunk[:, :-1]).float()  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / windows[:, 1:].numel()


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, block_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `length` sampled characters to idx (B, T). Returns the ids (B, T + length) and the logits each
    character was drawn from (B, length, V). top_k = 0 samples from all characters."""
    block_size = block_size or model.block_size
    caches = [{} for _ in model.blocks]
    logits = model(idx[:, -block_size:], caches)[:, -1]  # (B, V) the whole prompt in one pass
    drawn = []
    for _ in range(length):
        drawn.append(logits)
        scaled = logits / temperature  # (B, V) < 1 sharpens, > 1 flattens the distribution
        if top_k:
            kth = scaled.topk(min(top_k, scaled.size(-1))).values[:, -1:]  # (B, 1) the k-th largest
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))  # (B, V) only the top k remain
        following = torch.multinomial(scaled.softmax(-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, following], dim=1)  # (B, T + 1)
        if caches[0]["k"].size(2) >= block_size:  # context full: restart the cache from the newest half
            caches = [{} for _ in model.blocks]
            logits = model(idx[:, -(block_size // 2):], caches)[:, -1]  # (B, V)
        else:
            logits = model(following, caches)[:, -1]  # (B, V) one new position, earlier keys from the cache
    return idx, torch.stack(drawn, dim=1) if drawn else logits.new_zeros(idx.size(0), 0, logits.size(-1))


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed + distributed.rank())  # dropout draws differ per process
    generator = torch.Generator().manual_seed(cfg.seed)  # batch windows: the same global batch on every rank
    train_text, val_text = load_texts(cfg.dataset)
    chars = sorted(set(train_text))
    stoi = {c: i for i, c in enumerate(chars)}
    train_data = torch.tensor([stoi[c] for c in train_text])  # (N,) the whole training text as ids
    val_ids = torch.tensor([stoi[c] for c in val_text if c in stoi])  # unseen characters dropped (Chinese only)
    usable = min(cfg.eval_windows, (len(val_ids) - 1) // cfg.block_size)
    val_windows = val_ids[: usable * cfg.block_size + 1].unfold(0, cfg.block_size + 1, cfg.block_size)  # (N, T+1)
    val_windows = val_windows.to(device)

    gpt = GPT(len(chars), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout).to(device)
    lstm = LSTMModel(len(chars), lstm_width(len(chars), cfg.lstm_layers, count(gpt)), cfg.lstm_layers,
                     cfg.dropout).to(device)
    models = nn.ModuleDict({"gpt": gpt, "lstm": lstm})  # one object to checkpoint and resume
    train_gpt = distributed.wrap(compile_model(gpt, cfg.compile, device))
    train_lstm = distributed.wrap(compile_model(lstm, cfg.compile, device))
    scaler = grad_scaler(device, precision)
    run = Run(__file__, cfg, device)
    print(f"data: {cfg.dataset}, {len(train_data):,} training characters, vocabulary {len(chars)}, "
          f"{val_windows.size(0)} validation windows  gpt: {count(gpt):,} parameters  lstm: {count(lstm):,} "
          f"(width {lstm.lstm.hidden_size})  device: {device}  precision: {precision}  run: {run.dir}")

    decay = [p for p in models.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in models.parameters() if p.dim() < 2]  # biases, LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    start = run.attach(models, optimizer, generator=generator)  # Ctrl-C saves; --resume restores all of it
    step = start.step
    # run.steps skips the steps a resumed run has done (the generator's state already moved past their batches)
    for step in run.steps(range(1, cfg.total_steps + 1), total=cfg.total_steps, desc=cfg.dataset):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, cfg)
        batch = distributed.shard(random_windows(train_data, cfg.batch_size, cfg.block_size, generator))
        batch = batch.to(device)  # (b, T + 1) this process's part of the global batch
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()  # (b, T), (b T,)
        with autocast(device, precision):  # the two models share nothing: one backward trains both
            gpt_loss = F.cross_entropy(train_gpt(inputs).flatten(0, 1).float(), targets)  # (b T, V) vs (b T,)
            lstm_loss = F.cross_entropy(train_lstm(inputs).flatten(0, 1).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(gpt_loss + lstm_loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(gpt.parameters(), cfg.grad_clip)  # each model's own norm
        nn.utils.clip_grad_norm_(lstm.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        run.update(cfg.batch_size * cfg.block_size, loss=gpt_loss.detach(), lstm_loss=lstm_loss.detach())
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            gpt_val = distributed.on_main(evaluate, gpt, val_windows, precision)
            lstm_val = distributed.on_main(evaluate, lstm, val_windows, precision)
            run.log(step=step, val_loss=gpt_val, lstm_val_loss=lstm_val, train_loss=gpt_loss.item(),
                    lstm_train_loss=lstm_loss.item(), lr=learning_rate(step - 1, cfg))
            run.save_checkpoints(val_loss=gpt_val)  # last-<step>.pt, and best.pt by the GPT's val_loss

    gpt_val = distributed.on_main(evaluate, gpt, val_windows, precision)
    lstm_val = distributed.on_main(evaluate, lstm, val_windows, precision)
    save_checkpoint(run.dir, run.recipe, gpt, cfg, chars="".join(chars), lstm=lstm.state_dict())
    curves = [{"step": r["step"], "gpt val_loss": r["val_loss"], "lstm val_loss": r["lstm_val_loss"]}
              for r in run.history if "lstm_val_loss" in r]
    plot_curves(curves, run.dir / "gpt_vs_lstm.png", title=f"{cfg.dataset}: same steps, same parameter count")
    plot_attention_maps(gpt, val_text, stoi, run.dir / "attention.png")
    if run.is_main:  # a taste of what it learned: 300 characters after a line break
        prompt = torch.tensor([[stoi["\n"]]], device=device)
        sample, _ = generate(gpt.eval(), prompt, 300, 0.8, 10, torch.Generator(device).manual_seed(cfg.seed))
        print("sample:\n" + "".join(chars[i] for i in sample[0].tolist()).strip())
    return run.finish({"val_loss": gpt_val, "gpt_val_loss": gpt_val, "lstm_val_loss": lstm_val,
                       "lstm_minus_gpt": lstm_val - gpt_val, "gpt_params": float(count(gpt)),
                       "lstm_params": float(count(lstm)), "steps": float(step), "tokens_per_s": run.samples_per_s})


def plot_attention_maps(gpt: GPT, val_text: str, stoi: dict[str, int], path: Path) -> None:
    """Every layer's and head's attention weights over the first validation line that fits the context."""
    lines = [line for line in val_text.splitlines() if 0 < len(line) <= min(gpt.block_size, 48)] or [val_text]
    text = "".join(c for c in lines[0] if c in stoi)[: gpt.block_size]
    idx = torch.tensor([[stoi[c] for c in text]], device=gpt.tok.weight.device)  # (1, T)
    with torch.no_grad():
        _, maps = gpt.eval()(idx, with_attention=True)  # n_layer x (1, H, T, T)
    panels = [[head.float().cpu().numpy() for head in layer[0]] for layer in maps]
    plot_heatmap_grid(panels, list(text), path, row_name="layer", column_name="head",
                      title=f"{text!r}: row = the character looking, column = where it looks")


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str], length: int = 200, temperature: float = 0.8, top_k: int = 10,
            block_size: int = 0, seed: int = 0) -> list[dict]:
    """Continue each prompt with `length` sampled characters (KV cache, temperature, top-k; top_k 0 = all).
    `--block-size` shortens the context the model looks back at (at most the trained one)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    chars = state["chars"]
    stoi = {c: i for i, c in enumerate(chars)}
    block_size = block_size or cfg.block_size
    if not inputs or any(not prompt for prompt in inputs):
        raise UserError('Give a non-empty prompt to continue, e.g. "In the beginning".')
    if length < 0 or temperature <= 0 or top_k < 0 or block_size < 0:
        raise UserError("Need --length >= 0, --temperature > 0, --top-k >= 0 and --block-size >= 0.")
    if block_size > cfg.block_size:
        raise UserError(f"--block-size {block_size} is beyond the trained block size {cfg.block_size}: the model "
                        "has no position embeddings past it.")
    for prompt in inputs:
        unknown = sorted(set(prompt) - set(stoi))
        if unknown:
            raise UserError(f"The prompt has characters outside the model's vocabulary: {''.join(unknown)!r}.")
        if len(prompt) > block_size:
            raise UserError(f"The prompt has {len(prompt)} characters, more than the block size {block_size}.")
    gpt = GPT(len(chars), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model, 0.0)
    load_weights(gpt, state)
    gpt.eval()
    generator = torch.Generator().manual_seed(seed)
    results = []
    for prompt in inputs:
        idx = torch.tensor([[stoi[c] for c in prompt]])  # (1, T)
        out, _ = generate(gpt, idx, length, temperature, top_k, generator, block_size)  # (1, T + length)
        results.append({"input": prompt, "output": "".join(chars[i] for i in out[0, len(prompt):].tolist())})
    return results


if __name__ == "__main__":
    cli(Config, main)
