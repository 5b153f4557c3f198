"""Seq2seq translation: an LSTM encoder-decoder with attention, English to Spanish, greedy and beam search.

The encoder reads the English sentence into one vector per word; the decoder writes the Spanish one word
at a time, each step looking back at all the encoder's vectors (attention, Luong et al. 2015) instead of
squeezing the whole sentence through one fixed-size state.

    source ids        (B, S)        padded English word ids; lengths (B,) say where each sentence ends
    embedding         (B, S, H)
    encoder BiLSTM    (B, S, H)     packed: each direction starts and stops at the true ends, pads skipped
    decoder LSTM      (B, T, H)     input <bos> y1 .. y(T-1) (teacher forcing), from the encoder's last state
    attention         (B, T, S)     softmax over source positions of dec_t . W . enc_s (Luong's "general")
    context           (B, T, H)     attention-weighted sum of the encoder vectors
    combine           (B, T, H)     tanh(W [dec_t; context_t])
    logits            (B, T, V)     target y1 .. y(T-1) <eos>; the output layer shares the target embedding

Training uses teacher forcing: the decoder is fed the *reference* previous word, so every position's
next-word loss is known in advance and all T positions of all B sentences are computed in one pass. The
notes' version looped over sentences and over words; `dlnotes bench seq2seq` runs that loop on the same
model and data beside this one and prints the ratio. Batches hold sentences of similar length (little
padding), and gradients are clipped: one long sentence can otherwise blow an LSTM's gradient up. The
learning rate decays linearly to 0 over the planned steps, so the run ends on a settled model.

At test time there is no reference: greedy decoding feeds back its own best word until `<eos>`; beam
search (`dlnotes.beam`) keeps the `beam` best partial translations and picks the best by log-probability
/ length ** `--length-penalty` (1: per word; a plain sum favours short outputs). Both stop each sentence at
`--max-len-a` x its source length + `--max-len-b` tokens and never write the same `--no-repeat-ngram`
words twice: without these an undertrained model writes "como tu prójimo como ti tu prójimo como ti ..."
until the length limit. A word outside the vocabulary comes out as `<unk>`: if the
source word the decoder attended to most is capitalised mid-sentence (a name: "Zecher"), it is copied,
else dropped.
BLEU is sacreBLEU on detokenized output against the untouched references, on held-out pairs of at most
20 English words. The default run (4 epochs) reaches BLEU in the low 20s with beam search, a little less
greedy, still rising; the two Bible translations differ in style (Reina-Valera 1909 writes "crió", "á",
"fué"), so even a perfect system would score far below 100.

`--dataset toy` is the notes' example (`hello world -> bonjour monde` and a few more pairs), learned
exactly in seconds. The default is English-Spanish Bible verses (World English Bible -> Reina-Valera 1909).

`--nproc N` trains with N processes (DistributedDataParallel): each takes a slice of every batch; rank 0
alone evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from dlnotes import distributed
from dlnotes.beam import beam_search, max_lengths
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import epoch_generator
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_attention
from dlnotes.text import EOS, Vocab, corpus_bleu, detokenize, word_tokens
from dlnotes.tracking import Run
from dlnotes.translation import (  # noqa: F401
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    TOY_PAIRS,
    UNK_ID,
    build_vocabs,
    check_sentences,
    collate,
    encode_pairs,
    length_batches,
    load_pairs,
    source_tokens,
    target_tokens,
    write_samples,
)

TAGS = ("text", "translation", "rnn", "attention")
DATASET = "English-Spanish Bible verses (offline) | toy"
TARGET = ("test_bleu", 15.0)  # sacreBLEU on held-out verses of at most 20 English words
SMOKE = {"dataset": "toy", "epochs": 30, "batch_size": 2, "hidden": 64}
DISTRIBUTED = True  # dlnotes run seq2seq --nproc N
DATASETS = ("bible", "toy")
# The data pieces (pairs, tokens, vocabularies, batches) come from dlnotes.translation, shared with transformer-mt.


@dataclass
class Config:
    dataset: str = "bible"  # bible (English -> Spanish verses) | toy (the notes' hello world -> bonjour monde)
    epochs: int = 4  # 4 passes over the 19.8k training pairs: BLEU is well past the target and still rising
    batch_size: int = 32  # sentences of similar length; on a CPU 32 beats 64 both per token and per second
    lr: float = 2e-3  # Adam; decays linearly to 0 at the last step
    hidden: int = 256  # encoder (2 x 128, both directions), decoder and embedding size
    dropout: float = 0.2  # on embeddings and the combined vector: 20k sentence pairs overfit otherwise
    label_smoothing: float = 0.1  # a little probability on other words: better BLEU, worse perplexity
    max_vocab: int = 8000  # per language: the softmax over target words is the biggest cost on a CPU
    max_len: int = 40  # training pairs up to this many tokens per side (80 % of the verses)
    eval_words: int = 20  # BLEU on held-out pairs of at most this many English words
    beam: int = 5  # beam width for the final BLEU (1 = greedy only)
    no_repeat_ngram: int = 4  # decoding: no n-gram twice (0 = off); 4 had the best validation BLEU of 0, 2, 3, 4
    length_penalty: float = 1.0  # decoding: the best beam by log-probability / length ** this (0 = plain sum)
    max_len_a: float = 1.5  # decoding: outputs stop at a * source words + b tokens (Spanish runs ~1.1x English)
    max_len_b: int = 10
    clip: float = 1.0  # gradient norm clipping
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/seq2seq/

    def __post_init__(self) -> None:
        require_choice(self, "dataset", DATASETS)
        require_positive(self, "epochs", "batch_size", "lr", "hidden", "max_vocab", "max_len", "eval_words", "beam",
                         "clip")
        require_positive(self, "max_len_a")
        if min(self.no_repeat_ngram, self.length_penalty, self.max_len_b) < 0:
            raise UserError("--no-repeat-ngram, --length-penalty and --max-len-b must be >= 0 (0 turns the first "
                            "two off).")
        if self.hidden % 2:
            raise UserError(f"--hidden must be even (two encoder directions of hidden/2), got {self.hidden}.")


# --- model ------------------------------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(src_vocab, hidden, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(tgt_vocab, hidden, padding_idx=PAD_ID)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.score = nn.Linear(hidden, hidden, bias=False)  # Luong's "general" score: dec . W . enc
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, tgt_vocab)
        self.out.weight = self.tgt_embed.weight  # tied: a word's input and output vectors are one (fewer weights)
        self.drop = nn.Dropout(dropout)

    def encode(self, source: torch.Tensor, lengths: torch.Tensor):
        """Encoder vectors (B, S, H), the padding mask (B, S) and the decoder's first state."""
        embedded = self.drop(self.src_embed(source))  # (B, S, H)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        outputs, (h, c) = self.encoder(packed)  # h, c: (2, B, H/2), at each sentence's true end
        memory, _ = pad_packed_sequence(outputs, batch_first=True, total_length=source.size(1))  # (B, S, H)
        # Both directions' last states side by side: (2, B, H/2) -> (1, B, H), the decoder's starting state.
        state = tuple(torch.cat([s[0], s[1]], dim=-1).unsqueeze(0) for s in (h, c))
        return memory, source != PAD_ID, state

    def decode(self, decoder_in: torch.Tensor, state, memory: torch.Tensor, mask: torch.Tensor):
        """All T steps at once when the inputs are known (teacher forcing); T = 1 when generating."""
        hidden, state = self.decoder(self.drop(self.tgt_embed(decoder_in)), state)  # (B, T, H)
        scores = hidden @ self.score(memory).transpose(1, 2)  # (B, T, S)
        attention = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)  # (B, T, S)
        context = attention @ memory  # (B, T, H)
        combined = torch.tanh(self.combine(torch.cat([hidden, context], dim=-1)))  # (B, T, H)
        return self.out(self.drop(combined)), state, attention  # logits (B, T, V)

    def forward(self, source, lengths, decoder_in):
        memory, mask, state = self.encode(source, lengths)
        logits, _, _ = self.decode(decoder_in, state, memory, mask)
        return logits


# --- decoding ---------------------------------------------------------------------------------------------


def greedy(model: Seq2Seq, source: torch.Tensor, lengths: torch.Tensor, max_steps: int | torch.Tensor,
           no_repeat_ngram: int = 0):
    """Feed back the most likely word until every sentence has said <eos>: the beam search with a beam of one,
    so the same guards apply. Ids (B, T) and attention (B, T, S)."""
    return beam_decode(model, source, lengths, max_steps, 1, no_repeat_ngram=no_repeat_ngram)


def decode_step(model: Seq2Seq, memory: torch.Tensor, mask: torch.Tensor, words: torch.Tensor, state):
    """One generation step for the beam search: last words (N, 1) -> logits (N, V), the new state, and the
    attention row (N, S), kept along each hypothesis for copying names and for the plot."""
    logits, state, attention = model.decode(words, state, memory, mask)  # (N, 1, V), (N, 1, S)
    return logits[:, -1], state, attention[:, -1]


@torch.no_grad()
def beam_decode(model: Seq2Seq, source: torch.Tensor, lengths: torch.Tensor, max_steps: int | torch.Tensor,
                beam: int, length_penalty: float = 1.0, no_repeat_ngram: int = 0):
    """Beam search over this model's decoder, B sentences x K beams as one batch; `max_steps` is one bound or
    one per sentence (B,). Returns the best ids (B, T) and the attention of each word (B, T, S)."""
    memory, mask, state = model.encode(source, lengths)
    memory, mask = memory.repeat_interleave(beam, dim=0), mask.repeat_interleave(beam, dim=0)  # (B*K, S, H)
    state = tuple(s.repeat_interleave(beam, dim=1) for s in state)  # (1, B*K, H); row b*K + k: beam k of b
    step = partial(decode_step, model, memory, mask)
    return beam_search(step, state, len(source), beam, max_steps, BOS_ID, EOS_ID, PAD_ID, state_dim=1,
                       length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)


def to_text(ids: list[int], pointers: list[int], source_words: list[str], tgt_vocab: Vocab) -> list[str]:
    """Output ids -> words, up to <eos>. An <unk> becomes the source word the decoder attended to most if that
    word is capitalised inside the sentence (a name, which Spanish mostly keeps); other <unk>s are left out."""
    words = []
    for i, p in zip(ids, pointers):
        if i in (EOS_ID, PAD_ID):
            break
        if i != UNK_ID:
            words.append(tgt_vocab.tokens[i])
        elif 0 < p < len(source_words) and source_words[p][:1].isupper():  # the first word is capitalised anyway
            words.append(source_words[p])
    return words


def translate(model: Seq2Seq, texts: list[str], src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
              device: torch.device, beam: int, batch_size: int = 100):
    """English texts -> Spanish word lists; with beam 1 also the attention (T, S) of each, for the plots."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda n: len(texts[n]))  # similar lengths batched: fewer idle steps
    outputs, attentions = [None] * len(texts), [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        words = [word_tokens(texts[n], lower=False)[: cfg.max_len] for n in chunk]
        ids = [torch.tensor(src_vocab.encode([w.lower() for w in ws])) for ws in words]
        lengths = torch.tensor([len(i) for i in ids])
        source = pad_sequence(ids, batch_first=True, padding_value=PAD_ID).to(device)  # (B, S)
        bound = max_lengths(lengths, cfg.max_len_a, cfg.max_len_b)  # (B,): a looping decoder stops here
        out, attention = beam_decode(model, source, lengths, bound, beam, cfg.length_penalty, cfg.no_repeat_ngram)
        pointers = attention.argmax(dim=-1)  # (B, T): the source word each output word looked at most
        for row, (n, ws) in enumerate(zip(chunk, words)):
            outputs[n] = to_text(out[row].tolist(), pointers[row].tolist(), ws, tgt_vocab)
            if beam == 1:
                attentions[n] = attention[row].cpu()
    return outputs, attentions


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    generator = seed_everything(cfg.seed)
    pairs = load_pairs(cfg)
    run = Run(__file__, cfg, device)

    src_vocab, tgt_vocab = build_vocabs(pairs["train"], cfg)
    short = {split: [(en, es) for en, es in pairs[split] if len(en.split()) <= cfg.eval_words]
             for split in ("validation", "test")}
    train = encode_pairs(pairs["train"], src_vocab, tgt_vocab, cfg.max_len)
    print(f"data: {cfg.dataset}, {len(train):,} training pairs of <= {cfg.max_len} tokens, "
          f"vocabularies {len(src_vocab):,} English / {len(tgt_vocab):,} Spanish  device: {device}  "
          f"processes: {run.world_size}  run: {run.dir}")

    model = Seq2Seq(len(src_vocab), len(tgt_vocab), cfg.hidden, cfg.dropout).to(device)
    train_model = distributed.wrap(model)  # DDP with --nproc: the training step calls this one
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total_steps = cfg.epochs * len(length_batches(train, cfg.batch_size, torch.Generator(), cfg.limit_batches))
    # Linear decay to 0 at the last step: the run ends on a settled model. A function of the step alone, so
    # the same seed gives the same run on any machine, and a resumed run continues it exactly.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)

    start = run.attach(model, optimizer, scheduler, generator)  # Ctrl-C saves; --resume restores all four
    for epoch in range(start.epoch, cfg.epochs + 1):
        model.train()
        order = epoch_generator(cfg.seed, epoch)  # a function of (seed, epoch): a resumed epoch redraws it
        batches = length_batches(train, cfg.batch_size, order, cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            idx = distributed.shard(batch)  # this process's part of the global batch
            source, lengths, decoder_in, target = collate(train, idx, device)  # (B, S), (B,), (B, T), (B, T)
            logits = train_model(source, lengths, decoder_in)  # (B, T, V): every position's next word at once
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD_ID,
                                   label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            run.update(sum(len(train[i][1]) + 1 for i in batch), loss=loss.detach())  # target words + <eos>
        # Rank 0 alone evaluates (the replicas hold the same weights) and tells the others the result.
        val_loss, val_bleu = distributed.on_main(validate, model, short["validation"], src_vocab, tgt_vocab, cfg,
                                                 device)
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), val_loss=val_loss, val_bleu=val_bleu)
    if start.epoch > cfg.epochs:  # resumed after the last epoch (stopped during the test): its row has val_loss
        val_loss = run.history[-1]["val_loss"]

    # --- evaluation on held-out pairs -----------------------------------------------------------------------
    sources, references = [en for en, _ in short["test"]], [es for _, es in short["test"]]
    greedy_out, attentions, beam_out = distributed.on_main(translate_test_set, model, sources, src_vocab, tgt_vocab,
                                                           cfg, device)
    greedy_bleu, beam_bleu = corpus_bleu(greedy_out, references), corpus_bleu(beam_out, references)
    write_samples(run.dir / "samples.md", sources, references, greedy_out, beam_out, cfg.beam)
    shown = [n for n, en in enumerate(sources) if len(en.split()) <= 12][:3]
    plot_attention([(word_tokens(sources[n], lower=False)[: cfg.max_len], greedy_out[n] + [EOS],
                     attentions[n].numpy()) for n in shown], run.dir / "attention.png",
                   title="attention while decoding greedily")
    save_checkpoint(run.dir, run.recipe, model, cfg, src_vocab=src_vocab.tokens, tgt_vocab=tgt_vocab.tokens)
    return run.finish({"test_bleu": beam_bleu, "greedy_bleu": greedy_bleu, "val_loss": val_loss,
                       "tokens_per_s": run.samples_per_s})  # target tokens per second of the last epoch


def validate(model: Seq2Seq, pairs: list, src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
             device: torch.device) -> tuple[float, float]:
    """Teacher-forced loss on held-out (English, Spanish) pairs, and greedy BLEU on the first 100 of them
    (decoding word by word is the slow part)."""
    loss = validation_loss(model, encode_pairs(pairs, src_vocab, tgt_vocab, cfg.max_len), device)
    outputs, _ = translate(model, [en for en, _ in pairs[:100]], src_vocab, tgt_vocab, cfg, device, beam=1)
    return loss, corpus_bleu(outputs, [es for _, es in pairs[:100]])


def translate_test_set(model: Seq2Seq, sources: list[str], src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
                      device: torch.device) -> tuple[list, list, list]:
    """Greedy outputs with their attention (for the plot), and beam-search outputs."""
    greedy_out, attentions = translate(model, sources, src_vocab, tgt_vocab, cfg, device, beam=1)
    beam_out, _ = translate(model, sources, src_vocab, tgt_vocab, cfg, device, beam=cfg.beam)
    return greedy_out, attentions, beam_out


@torch.no_grad()
def validation_loss(model: Seq2Seq, data: list, device: torch.device, batch_size: int = 200) -> float:
    """Mean next-word cross-entropy (no label smoothing) over held-out pairs, teacher-forced."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        source, lengths, decoder_in, target = collate(data, range(start, min(start + batch_size, len(data))), device)
        logits = model(source, lengths, decoder_in)
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD_ID, reduction="sum").item()
        count += int((target != PAD_ID).sum())
    return total / max(count, 1)


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str], beam: int = 5, no_repeat_ngram: int = Config.no_repeat_ngram,
            length_penalty: float = Config.length_penalty, max_len_a: float = Config.max_len_a,
            max_len_b: int = Config.max_len_b) -> list[dict]:
    """Spanish translations of English sentences (beam search; `--beam 1` is greedy)."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = replace(restore_config(Config, state), no_repeat_ngram=no_repeat_ngram, length_penalty=length_penalty,
                  max_len_a=max_len_a, max_len_b=max_len_b)  # decoding options: these, not the run's
    src_vocab, tgt_vocab = Vocab(state["src_vocab"]), Vocab(state["tgt_vocab"])
    model = Seq2Seq(len(src_vocab), len(tgt_vocab), cfg.hidden, cfg.dropout)
    load_weights(model, state)
    check_sentences(inputs, src_vocab, cfg.max_len, cfg.dataset, beam)
    outputs, _ = translate(model, inputs, src_vocab, tgt_vocab, cfg, torch.device("cpu"), beam)
    return [{"input": text, "output": detokenize(words)} for text, words in zip(inputs, outputs)]


if __name__ == "__main__":
    cli(Config, main)
