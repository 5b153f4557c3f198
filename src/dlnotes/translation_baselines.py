"""Baselines of the translation recipes (seq2seq, transformer-mt), registered in `dlnotes.baselines`' table:
the notes' per-token training loop, on the recipe's setup and on the notes' own toy pairs, and the LSTM trained
for as long as a transformer-mt run trained. `dlnotes.baselines` imports this module, so bench finds them."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from dlnotes import catalog
from dlnotes.baselines import baseline

# --- seq2seq ----------------------------------------------------------------------------------------------


@baseline("seq2seq", "notes' per-token loop")
def seq2seq_per_token_loop(device: str, sentences: int = 64) -> dict[str, Any]:
    """The notes' training loop: one sentence at a time, one target word at a time, on the recipe's model at its
    default size, its training pairs and vocabularies, with the same optimizer and clipping. Trains on a fixed
    random sample of `sentences` pairs (a mix of lengths) and returns target tokens (words + <eos>) per second."""
    import torch

    setup = _seq2seq_setup(device)
    chosen = torch.randperm(len(setup.train), generator=torch.Generator().manual_seed(setup.cfg.seed))[:sentences]
    tokens, seconds = _per_token_training(setup, [setup.train[i] for i in chosen.tolist()])
    return {"throughput": tokens / seconds, "throughput_unit": "tokens/s", "sentences": len(chosen), "tokens": tokens}


@baseline("seq2seq", "notes' per-token loop, notes' toy setup")
def seq2seq_toy_setup(device: str, hidden: int = 64, rounds: int = 5, epochs: int = 100,
                      copies: int = 1) -> dict[str, Any]:
    """The notes' own setup: their 8 toy pairs (1-4 words a side, vocabularies of 12 and 11 words) at the hidden
    size of the recipe's toy configuration (its SMOKE: 64; the notes' own size is not recorded here). Both ways
    on it, each with its own model: the recipe's batched step (the 8 pairs, `copies` times over, in batches of
    the recipe's 32) and the notes' per-token loop, alternating for `rounds` rounds (`epochs` passes batched, a
    fifth of that one sentence at a time) after an untimed one, medians of the rounds: this VM's speed drifts by
    3x within seconds at times. Its row's ratio is between these two (`recipe_throughput`), not against the
    recipe's Bible run: on 24 target words an epoch, batching cannot gain more than one batch of 8 sentences
    gives."""
    import statistics

    batched, loop = (_seq2seq_setup(device, dataset="toy", hidden=hidden) for _ in range(2))  # a model each
    train = batched.train
    speeds: dict[str, list[float]] = {"batched": [], "per_token": []}
    for _ in range(rounds + 1):  # the first round warms up
        tokens, seconds = _batched_training(batched, train * copies, epochs)
        speeds["batched"].append(tokens / seconds)
        tokens, seconds = _per_token_training(loop, train * (epochs // 5))
        speeds["per_token"].append(tokens / seconds)
    return {"throughput": statistics.median(speeds["per_token"][1:]), "throughput_unit": "tokens/s",
            "recipe_throughput": statistics.median(speeds["batched"][1:]), "sentences": len(train), "hidden": hidden,
            "batched_sentences": len(train) * copies}


@baseline("seq2seq", "notes' per-token loop, notes' vocabulary, hidden size and lengths, batch of 32")
def seq2seq_toy_setup_full_batch(device: str, **sizes: Any) -> dict[str, Any]:
    """The same at the recipe's batch size: the notes' vocabularies, hidden size and sentence lengths, 32
    sentences a batch, which their 8 pairs fill only 4 times over. A throughput measurement (the same pair 4
    times in a batch teaches nothing more): what batching gains at the notes' sizes once there are sentences
    enough for the recipe's batch."""
    return seq2seq_toy_setup(device, copies=4, **sizes)


class Seq2seqSetup(NamedTuple):
    """What a seq2seq baseline trains with: the recipe's module and Config, the device, the text pairs by split,
    the vocabularies, the encoded training pairs, a fresh model in training mode and its optimizer."""
    recipe: Any
    cfg: Any
    where: Any
    pairs: dict[str, list]
    src_vocab: Any
    tgt_vocab: Any
    train: list
    model: Any
    optimizer: Any


def _seq2seq_setup(device: str, **changes: Any) -> Seq2seqSetup:
    """The seq2seq recipe's defaults, then `changes`, seeded."""
    import torch

    from dlnotes.device import pick_device, seed_everything

    info = catalog.get("seq2seq")
    recipe = catalog.load_module(info)
    cfg = recipe.Config(**catalog.config_values(info, device=device, **changes))
    where = pick_device(cfg.device)
    seed_everything(cfg.seed)
    pairs = recipe.load_pairs(cfg)
    src_vocab, tgt_vocab = recipe.build_vocabs(pairs["train"], cfg)
    train = recipe.encode_pairs(pairs["train"], src_vocab, tgt_vocab, cfg.max_len)
    model = recipe.Seq2Seq(len(src_vocab), len(tgt_vocab), cfg.hidden, cfg.dropout).to(where).train()
    return Seq2seqSetup(recipe, cfg, where, pairs, src_vocab, tgt_vocab, train, model,
                        torch.optim.Adam(model.parameters(), lr=cfg.lr))


def _per_token_training(setup: Seq2seqSetup, pairs: list) -> tuple[int, float]:
    """The notes' loop over `pairs`, one sentence and one target word at a time: (target tokens, seconds)."""
    import torch
    import torch.nn.functional as F

    recipe, cfg, where, model, optimizer = setup.recipe, setup.cfg, setup.where, setup.model, setup.optimizer
    tokens, start = 0, time.perf_counter()
    for src, tgt in pairs:
        memory, mask, state = model.encode(src[None].to(where), torch.tensor([len(src)]))  # one sentence: (1, S, H)
        loss, word = 0.0, torch.tensor([[recipe.BOS_ID]], device=where)
        for next_word in [*tgt.tolist(), recipe.EOS_ID]:  # one word at a time
            logits, state, _ = model.decode(word, state, memory, mask)  # (1, 1, V)
            loss = loss + F.cross_entropy(logits[0], torch.tensor([next_word], device=where))
            word = torch.tensor([[next_word]], device=where)  # teacher forcing, one step later
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        tokens += len(tgt) + 1
    if where.type == "cuda":
        torch.cuda.synchronize()  # the GPU may still be working on the last steps
    return tokens, time.perf_counter() - start


def _batched_training(setup: Seq2seqSetup, train: list, epochs: int) -> tuple[int, float]:
    """The recipe's training step (length-sorted padded batches, every position at once) for `epochs` passes
    over `train`: (target tokens, seconds)."""
    import torch

    tokens, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in setup.recipe.length_batches(train, setup.cfg.batch_size, torch.Generator().manual_seed(epoch)):
            tokens += _seq2seq_step(setup, train, batch)
    if setup.where.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def _seq2seq_step(setup: Seq2seqSetup, train: list, batch: list) -> int:
    """One of the seq2seq recipe's training steps on `batch` (indices into `train`): its target tokens."""
    import torch
    import torch.nn.functional as F

    recipe, cfg, model, optimizer = setup.recipe, setup.cfg, setup.model, setup.optimizer
    source, lengths, decoder_in, target = recipe.collate(train, batch, setup.where)  # (B, S), (B,), (B, T), (B, T)
    logits = model(source, lengths, decoder_in)  # (B, T, V): every position's next word at once
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=recipe.PAD_ID,
                           label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    optimizer.step()
    return sum(len(train[i][1]) + 1 for i in batch)  # target words + <eos>


# --- transformer-mt ---------------------------------------------------------------------------------------


@baseline("transformer-mt", "LSTM seq2seq, same training time", after_recipe=True)
def seq2seq_same_training_time(device: str, recipe_run: str, dataset: str = "bible") -> dict[str, Any]:
    """The seq2seq recipe's LSTM at its default settings, trained for as many seconds as the transformer-mt run
    `recipe_run` (this bench invocation's) trained, on the same pairs, batches and machine; its learning rate
    decays linearly to 0 over that time instead of over a step count. Then the same held-out BLEU (beam search,
    the same decoding guards) and the same slices by length and rare words as the transformer's summary."""
    import json
    from pathlib import Path

    import torch

    from dlnotes.datasets import epoch_generator
    from dlnotes.text import corpus_bleu
    from dlnotes.translation import bleu_by_group, group_metrics

    rows = [json.loads(line) for line in (Path(recipe_run) / "metrics.jsonl").read_text().splitlines()]
    budget = max(row["time_s"] for row in rows if "epoch" in row)  # the transformer's training, with validation
    setup = _seq2seq_setup(device, dataset=dataset)  # toy: for the tests
    recipe, cfg, where, pairs, train, optimizer = (setup.recipe, setup.cfg, setup.where, setup.pairs, setup.train,
                                                   setup.optimizer)

    steps = tokens = 0
    epoch, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        epoch += 1
        for batch in recipe.length_batches(train, cfg.batch_size, epoch_generator(cfg.seed, epoch)):
            if (elapsed := time.perf_counter() - start) >= budget:
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (1 - elapsed / budget)  # the recipe's linear decay, over time
            steps, tokens = steps + 1, tokens + _seq2seq_step(setup, train, batch)
    trained = time.perf_counter() - start
    test = [(en, es) for en, es in pairs["test"] if len(en.split()) <= cfg.eval_words]
    sources, references = [en for en, _ in test], [es for _, es in test]
    outputs, _ = recipe.translate(setup.model, sources, setup.src_vocab, setup.tgt_vocab, cfg, where, beam=cfg.beam)
    groups = bleu_by_group(sources, references, outputs, pairs["train"])
    summary = json.loads((Path(recipe_run) / "summary.json").read_text())["metrics"]
    return {"metric": corpus_bleu(outputs, references), "throughput": tokens / trained,
            "throughput_unit": "tokens/s", "training_s": trained, "steps": steps, "epochs": steps / len(
                recipe.length_batches(train, cfg.batch_size, torch.Generator())),
            **group_metrics(groups), "recipe_slices": {k: v for k, v in summary.items() if k.startswith("bleu_")}}
