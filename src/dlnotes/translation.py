"""Translation plumbing shared by the seq2seq and transformer-mt recipes: the same English->Spanish pairs,
tokens, vocabularies and batches, so the two recipes' BLEU scores compare like for like.

    pairs = load_pairs(cfg)                          # {"train": [(en, es), ...], ...}; cfg.dataset bible | toy
    src_vocab, tgt_vocab = build_vocabs(pairs["train"], cfg)
    data = encode_pairs(pairs["train"], src_vocab, tgt_vocab, max_len=40)   # [(src ids, tgt ids), ...]
    for idx in length_batches(data, 32, generator):  # similar lengths together, batches in random order
        source, lengths, decoder_in, target = collate(data, idx, device)   # (B, S), (B,), (B, T), (B, T)
    groups = bleu_by_group(sources, references, outputs, pairs["train"])  # where a model wins: length, rare words
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dlnotes import distributed
from dlnotes.errors import UserError
from dlnotes.text import BOS, EOS, PAD, UNK, Vocab, corpus_bleu, detokenize, word_tokens
from dlnotes.textdata import load_translation_pairs

SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0..3 in both vocabularies
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
TOY_PAIRS = [("hello world", "bonjour monde"), ("hello", "bonjour"), ("world", "monde"),
             ("hello my friend", "bonjour mon ami"), ("my world", "mon monde"), ("thank you", "merci"),
             ("good night world", "bonne nuit monde"), ("thank you my friend", "merci mon ami")]


def load_pairs(cfg: Any) -> dict[str, list[tuple[str, str]]]:
    """`cfg.dataset` "toy": the notes' pairs in every split (the point is to learn them exactly); else the
    English-Spanish Bible verses."""
    if cfg.dataset == "toy":
        return {split: list(TOY_PAIRS) for split in ("train", "validation", "test")}
    return load_translation_pairs("bible-en-es")


def source_tokens(text: str) -> list[str]:
    return word_tokens(text, lower=True)  # English lower-cased: a smaller vocabulary for the same words


def target_tokens(text: str) -> list[str]:
    return word_tokens(text, lower=False)  # Spanish keeps its case: BLEU compares with cased references


def build_vocabs(train_pairs: list[tuple[str, str]], cfg: Any) -> tuple[Vocab, Vocab]:
    """English and Spanish vocabularies from the training split only, at most `cfg.max_vocab` each. In toy
    every word counts; in the Bible a word seen once is mostly a name or a typo and becomes <unk> (which
    then gets trained)."""
    min_count = 1 if cfg.dataset == "toy" else 2
    return (Vocab.build((source_tokens(en) for en, _ in train_pairs), min_count, cfg.max_vocab, SPECIALS),
            Vocab.build((target_tokens(es) for _, es in train_pairs), min_count, cfg.max_vocab, SPECIALS))


def encode_pairs(pairs, src_vocab: Vocab, tgt_vocab: Vocab, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source ids, target ids) for pairs whose two sides fit in max_len tokens."""
    encoded = []
    for en, es in pairs:
        src, tgt = source_tokens(en), target_tokens(es)
        if 0 < len(src) <= max_len and 0 < len(tgt) <= max_len:
            encoded.append((torch.tensor(src_vocab.encode(src)), torch.tensor(tgt_vocab.encode(tgt))))
    return encoded


def length_batches(data: list, batch_size: int, generator: torch.Generator, limit: int = 0) -> list[list[int]]:
    """Batches of sentences of similar length, in random order: almost no padding, still shuffled."""
    order = torch.randperm(len(data), generator=generator).tolist()  # random ties between equal lengths
    order.sort(key=lambda i: len(data[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches[:limit] if limit > 0 else batches


def collate(data: list, idx: list[int], device: torch.device):
    """Padded source (B, S) with its lengths (B,), decoder input <bos> y (B, T) and target y <eos> (B, T)."""
    src = [data[i][0] for i in idx]
    tgt = [data[i][1] for i in idx]
    bos, eos = torch.tensor([BOS_ID]), torch.tensor([EOS_ID])
    lengths = torch.tensor([len(s) for s in src])  # stays on the CPU: pack_padded_sequence wants it there
    source = pad_sequence(src, batch_first=True, padding_value=PAD_ID).to(device)
    decoder_in = pad_sequence([torch.cat([bos, t]) for t in tgt], batch_first=True, padding_value=PAD_ID)
    target = pad_sequence([torch.cat([t, eos]) for t in tgt], batch_first=True, padding_value=PAD_ID)
    return source, lengths, decoder_in.to(device), target.to(device)


LENGTH_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, 20))  # English words; the test set holds verses of <= 20
RARE_BELOW = 10  # a word seen fewer times than this in the training English is "rare"


def bleu_by_group(sources: list[str], references: list[str], outputs: list[list[str]],
                  train_pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """BLEU on slices of the held-out pairs, to see where a model wins: by English length (words), and by the
    rarest English word of the sentence. "unseen": a word seen fewer than twice in training (<unk> to both
    models); "rare": its rarest word seen 2 to RARE_BELOW - 1 times; "common": every word seen more often.
    {"words 1-5": {"pairs": n, "bleu": b}, ..., "rare": {...}}; slices without pairs are left out."""
    counts = Counter(token for en, _ in train_pairs for token in source_tokens(en))
    groups: dict[str, list[int]] = {}
    for n, en in enumerate(sources):
        words = len(en.split())  # the same count as the test set's <= 20 words filter
        for low, high in LENGTH_BUCKETS:
            if low <= words <= high:
                groups.setdefault(f"words {low}-{high}", []).append(n)
        rarest = min((counts[token] for token in source_tokens(en)), default=0)
        groups.setdefault("unseen" if rarest < 2 else "rare" if rarest < RARE_BELOW else "common", []).append(n)
    order = [f"words {low}-{high}" for low, high in LENGTH_BUCKETS] + ["unseen", "rare", "common"]
    return {name: {"pairs": float(len(groups[name])),
                   "bleu": corpus_bleu([outputs[n] for n in groups[name]], [references[n] for n in groups[name]])}
            for name in order if name in groups}


def group_metrics(groups: dict[str, dict[str, float]], prefix: str = "bleu") -> dict[str, float]:
    """The slices as flat summary metrics: {"bleu_words_1_5": 21.3, ..., "bleu_rare": 12.0}."""
    return {f"{prefix}_{name.replace(' ', '_').replace('-', '_')}": row["bleu"] for name, row in groups.items()}


@distributed.main_rank_only
def write_samples(path: Path, sources, references, greedy_out, beam_out, beam: int, count: int = 25,
                  groups: dict[str, dict[str, float]] | None = None) -> None:
    """samples.md: the first `count` held-out sentences with their reference, greedy and beam translations;
    with `groups` (`bleu_by_group` of the beam outputs), a table of BLEU by length and by rare words first."""
    lines = ["# Held-out translations\n"]
    if groups:
        lines += [f"BLEU (beam {beam}) by slice of the {len(sources):,} held-out pairs: English length in words; "
                  f"rarest English word seen < 2 (unseen), < {RARE_BELOW} (rare) or more times in training "
                  "(common).\n", "| slice | pairs | BLEU |", "|---|---|---|"]
        lines += [f"| {name} | {row['pairs']:.0f} | {row['bleu']:.2f} |" for name, row in groups.items()] + [""]
    for n in range(min(count, len(sources))):
        lines += [f"{n + 1}. **English:** {sources[n]}  ", f"   **Reference:** {references[n]}  ",
                  f"   **Greedy:** {detokenize(greedy_out[n])}  ", f"   **Beam {beam}:** {detokenize(beam_out[n])}\n"]
    path.write_text("\n".join(lines), encoding="utf-8")


def check_sentences(inputs: list[str], src_vocab: Vocab, max_len: int, dataset: str, beam: int) -> None:
    """What `predict` is given, checked before decoding: each bad input is one line, a long one is a note."""
    if not inputs:
        raise UserError("Give at least one English sentence to translate, in quotes.")
    if beam < 1:
        raise UserError(f"--beam must be at least 1, got {beam}.")
    for n, text in enumerate(inputs, 1):
        tokens = source_tokens(text)
        if not tokens:
            raise UserError(f"Text {n} is empty: give an English sentence to translate.")
        if all(t not in src_vocab for t in tokens):
            raise UserError(f"Text {n} ({text[:40]!r}) has no word this run knows: it translates English "
                            f"(trained on {dataset}).")
        if len(tokens) > max_len:
            print(f"note: text {n} has {len(tokens)} tokens; only the first {max_len} are translated.",
                  file=sys.stderr)
