"""Transformer translation: the original encoder-decoder ("Attention Is All You Need"), English to Spanish.

The same pairs, tokens, vocabularies, batches and sacreBLEU as the seq2seq recipe (`dlnotes.translation`),
so the two BLEU scores compare. What changes is the model: no recurrence at all, only attention.

Attention. A query vector asks "which of these positions matter to me?": its dot product with every key,
scaled by 1/sqrt(d), softmaxed over the positions, weights the values. With a mask, some positions get a
score of -inf before the softmax and weight 0. Each layer runs h heads of width d/h side by side:

    queries Q (B, h, T, d/h), keys K and values V (B, h, S, d/h)
    scores  Q K^T / sqrt(d/h)     (B, h, T, S)   + mask: -inf where a key must not be seen
    weights softmax over S        (B, h, T, S)
    output  weights V             (B, h, T, d/h) -> heads side by side (B, T, d) -> a linear layer (B, T, d)

The model, with d = 256, h = 4, 2 + 2 layers:

    source ids       (B, S)      padded English word ids; padding mask (B, S): keys no query may look at
    + positions      (B, S, d)   embedding * sqrt(d) + the paper's sine/cosine position code (no recurrence:
                                 without it "dog bites man" = "man bites dog")
    encoder x2       (B, S, d)   self-attention over the source (Q = K = V = the source), then a 2-layer MLP
    target ids       (B, T)      <bos> y1 .. y(T-1) (teacher forcing), embedded the same way (B, T, d)
    decoder x2       (B, T, d)   causal self-attention (position t sees targets <= t: an upper-triangular
                                 -inf mask), then cross-attention (Q from the target (B, T, d), K = V = the
                                 encoder output (B, S, d), scores (B, h, T, S)), then the MLP
    logits           (B, T, V)   y1 .. y(T-1) <eos>; the output layer shares the target embedding

Each sub-layer is x + f(LayerNorm(x)) ("pre-norm"): it trains without the paper's careful warm-up schedule
and at a higher learning rate, which a 15-minute CPU budget needs. The layers are `nn.TransformerEncoder/
Decoder`: the `transformer` recipe writes attention out line by line; here the lesson is the wiring
(which mask goes where, what cross-attention reads) and PyTorch's fused kernels keep the CPU run short.
Label smoothing (0.1, as in the paper) keeps the model from betting everything on one word.

Why it can beat the LSTM, even at this small size: training sees all T target positions at once in every
layer (the LSTM's recurrence is T sequential steps), so on parallel hardware each second buys more
updates; and every target word reads every source word directly, however far apart. It also has no
built-in notion of order or locality, so on 20k sentence pairs it needs more passes over the data than
the LSTM to learn what recurrence gives for free. Per epoch it wins: after one its validation loss and
BLEU are ahead of the LSTM's, and its 3-epoch default passes the LSTM recipe's target. Per second of a
small CPU it costs ~1.4x the LSTM per target word, so `dlnotes bench transformer-mt` trains the LSTM for
exactly the transformer's training time, beside it: on a 2-core Xeon 23.0 BLEU against 22.4, the lead from
long sentences and rarely seen words (the summary's `bleu_*` slices; README: numbers and calibration).
Three epochs underfit 20k pairs, so dropout only slows learning here (0.1 cost 2 BLEU): it is off.

Decoding (`dlnotes.beam`, shared with seq2seq): greedy or beam search with a length bound of
a * source length + b, length-normalised beam scores and no repeated n-grams. The decoder here
re-reads the whole prefix at every step (no key/value cache: the `transformer` recipe shows one);
sentences are short, so that costs little. Words outside the vocabulary come out as `<unk>` and are
dropped (seq2seq copies capitalised names through its attention; nn.TransformerDecoder does not return
its attention weights).

`--dataset toy` is the notes' `hello world -> bonjour monde` pairs, learned in seconds. `--nproc N` trains
with N processes (DistributedDataParallel): each takes a slice of every batch; rank 0 alone evaluates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from dlnotes import distributed
from dlnotes.beam import beam_search, max_lengths
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import epoch_generator
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.speedups import autocast, grad_scaler, resolve_precision
from dlnotes.text import Vocab, corpus_bleu, detokenize
from dlnotes.tracking import Run
from dlnotes.translation import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    bleu_by_group,
    build_vocabs,
    check_sentences,
    collate,
    encode_pairs,
    group_metrics,
    length_batches,
    load_pairs,
    source_tokens,
    write_samples,
)

TAGS = ("text", "translation", "transformer", "attention")
DATASET = "English-Spanish Bible verses (offline) | toy"
TARGET = ("test_bleu", 15.0)  # the seq2seq recipe's target, on the same held-out verses of <= 20 English words
SMOKE = {"dataset": "toy", "epochs": 40, "batch_size": 2, "lr": 3e-3, "d_model": 32, "ff": 64, "layers": 1,
         "warmup": 10, "dropout": 0.0}
DISTRIBUTED = True  # dlnotes run transformer-mt --nproc N
DATASETS = ("bible", "toy")


@dataclass
class Config:
    dataset: str = "bible"  # bible (English -> Spanish verses) | toy (the notes' hello world -> bonjour monde)
    epochs: int = 3  # passes over the 19.8k training pairs: what fits the 15-minute CPU budget (README)
    batch_size: int = 32  # sentences of similar length; as seq2seq: more updates in the few epochs a CPU affords
    lr: float = 2e-3  # AdamW peak; pre-norm layers take it after the warm-up (1e-3: test BLEU 18.5, README)
    warmup: int = 200  # steps of linear warm-up: Adam's early steps are noisy, attention logits blow up
    d_model: int = 256  # embedding and layer width (the LSTM recipe's hidden size)
    heads: int = 4  # attention heads of width d_model / heads = 64, the paper's head width
    layers: int = 2  # encoder and decoder layers each (the paper: 6 + 6 at width 512 on 4.5M pairs); 3 cost 1/3 more
    ff: int = 512  # MLP width: the paper's 4 x d_model nearly doubles a layer's cost on a CPU
    dropout: float = 0.0  # on embeddings, attention and sub-layer outputs; 3 epochs underfit: 0.1 cost 2 BLEU
    label_smoothing: float = 0.1  # the paper's value: better BLEU, worse perplexity
    max_vocab: int = 8000  # per language, as in seq2seq
    max_len: int = 40  # training pairs up to this many tokens per side, as in seq2seq
    eval_words: int = 20  # BLEU on held-out pairs of at most this many English words, as in seq2seq
    beam: int = 5  # beam width for the final BLEU (1 = greedy only)
    no_repeat_ngram: int = 4  # decoding: no n-gram twice (0 = off); seq2seq's default, chosen by BLEU
    length_penalty: float = 1.0  # decoding: the best beam by log-probability / length ** this (0 = plain sum)
    max_len_a: float = 1.5  # decoding: outputs stop at a * source words + b tokens (Spanish runs ~1.1x English)
    max_len_b: int = 10  # decoding: room for short sentences, whose Spanish may be twice as long
    clip: float = 1.0  # gradient norm clipping
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 on GPUs, fp32 on CPUs (casting costs more)
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/transformer-mt/

    def __post_init__(self) -> None:
        require_choice(self, "dataset", DATASETS)
        require_positive(self, "epochs", "batch_size", "lr", "d_model", "heads", "layers", "ff", "max_vocab",
                         "max_len", "eval_words", "beam", "clip", "max_len_a")
        if self.d_model % self.heads:
            raise UserError(f"--d-model ({self.d_model}) must be a multiple of --heads ({self.heads}).")
        if min(self.no_repeat_ngram, self.length_penalty, self.max_len_b, self.warmup) < 0:
            raise UserError("--no-repeat-ngram, --length-penalty, --max-len-b and --warmup must be >= 0.")


# --- model ------------------------------------------------------------------------------------------------


def sinusoids(length: int, d: int) -> torch.Tensor:
    """The paper's position code (length, d): sines and cosines of wavelengths from 2 pi to 10000 * 2 pi."""
    position = torch.arange(length)[:, None]  # (L, 1)
    frequency = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))  # (d/2,)
    code = torch.zeros(length, d)
    code[:, 0::2], code[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return code


class TransformerMT(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int, heads: int, layers: int, ff: int,
                 dropout: float, max_positions: int = 512) -> None:
        super().__init__()
        self.scale = math.sqrt(d_model)  # embeddings * sqrt(d): comparable in size to the position code
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=PAD_ID)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoids(max_positions, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True),
            layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)  # pre-norm ends with a final norm
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True),
            layers, norm=nn.LayerNorm(d_model))
        self.out = nn.Linear(d_model, tgt_vocab)
        self.out.weight = self.tgt_embed.weight  # tied: a word's input and output vectors are one
        for embedding in (self.src_embed, self.tgt_embed):  # std 1/sqrt(d): x sqrt(d) in, logits of std ~1 out
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            nn.init.zeros_(embedding.weight[PAD_ID])

    def embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(embedding(ids) * self.scale + self.positions[: ids.size(1)])  # (B, L, d)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, d) and the source padding mask (B, S), True at <pad>: no query looks there."""
        padding = source == PAD_ID  # (B, S)
        return self.encoder(self.embed(self.src_embed, source), src_key_padding_mask=padding), padding

    def decode(self, decoder_in: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor,
               last_only: bool = False) -> torch.Tensor:
        """Next-word logits (B, T, V) at every target position; position t sees decoder_in[:, :t+1] only. When
        generating, only the last position's (B, 1, V) are needed: the V-wide output layer is the costly one."""
        T = decoder_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=decoder_in.device).triu(1)  # (T, T): True = hidden
        hidden = self.decoder(self.embed(self.tgt_embed, decoder_in), memory, tgt_mask=causal,
                              memory_key_padding_mask=padding)  # (B, T, d); cross-attention scores (B, h, T, S)
        return self.out(hidden[:, -1:] if last_only else hidden)  # (B, T, V), or (B, 1, V)

    def forward(self, source: torch.Tensor, decoder_in: torch.Tensor) -> torch.Tensor:
        memory, padding = self.encode(source)
        return self.decode(decoder_in, memory, padding)


# --- decoding ---------------------------------------------------------------------------------------------


def decode_step(model: TransformerMT, words: torch.Tensor, state):
    """One generation step for `dlnotes.beam`: the state is (words so far (N, t), memory (N, S, d), padding
    (N, S)); all three follow their beams. Returns the next-word logits (N, V)."""
    prefix, memory, padding = state
    prefix = torch.cat([prefix, words], dim=1)  # (N, t+1)
    logits = model.decode(prefix, memory, padding, last_only=True)[:, -1]  # (N, V): the last position's next word
    return logits, (prefix, memory, padding), None


@torch.no_grad()
def generate(model: TransformerMT, source: torch.Tensor, max_steps: int | torch.Tensor, beam: int = 1,
             length_penalty: float = 1.0, no_repeat_ngram: int = 0) -> torch.Tensor:
    """Output ids (B, T) for padded sources (B, S): greedy with beam 1, beam search otherwise."""
    memory, padding = model.encode(source)  # (B, S, d), (B, S)
    state = (source.new_zeros((len(source) * beam, 0)), memory.repeat_interleave(beam, dim=0),
             padding.repeat_interleave(beam, dim=0))  # row b*K + k: beam k of sentence b
    ids, _ = beam_search(lambda words, s: decode_step(model, words, s), state, len(source), beam, max_steps,
                         BOS_ID, EOS_ID, PAD_ID, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)
    return ids


def translate(model: TransformerMT, texts: list[str], src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
              device: torch.device, beam: int, batch_size: int = 100) -> list[list[str]]:
    """English texts -> Spanish word lists (<unk> left out)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda n: len(texts[n]))  # similar lengths batched: fewer idle steps
    outputs: list[list[str]] = [[] for _ in texts]
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        ids = [torch.tensor(src_vocab.encode(source_tokens(texts[n])[: cfg.max_len])) for n in chunk]
        source = pad_sequence(ids, batch_first=True, padding_value=PAD_ID).to(device)  # (B, S)
        bound = max_lengths(torch.tensor([len(i) for i in ids]), cfg.max_len_a, cfg.max_len_b).to(device)  # (B,)
        out = generate(model, source, bound, beam, cfg.length_penalty, cfg.no_repeat_ngram)  # (B, T)
        for row, n in enumerate(chunk):
            words = []
            for i in out[row].tolist():
                if i in (EOS_ID, PAD_ID):
                    break
                if i != UNK_ID:
                    words.append(tgt_vocab.tokens[i])
            outputs[n] = words
    return outputs


# --- training ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    precision = resolve_precision(cfg.precision, device)
    generator = seed_everything(cfg.seed)
    pairs = load_pairs(cfg)
    run = Run(__file__, cfg, device)

    src_vocab, tgt_vocab = build_vocabs(pairs["train"], cfg)
    short = {split: [(en, es) for en, es in pairs[split] if len(en.split()) <= cfg.eval_words]
             for split in ("validation", "test")}
    train = encode_pairs(pairs["train"], src_vocab, tgt_vocab, cfg.max_len)
    print(f"data: {cfg.dataset}, {len(train):,} training pairs of <= {cfg.max_len} tokens, "
          f"vocabularies {len(src_vocab):,} English / {len(tgt_vocab):,} Spanish  device: {device}  "
          f"precision: {precision}  processes: {run.world_size}  run: {run.dir}")

    model = TransformerMT(len(src_vocab), len(tgt_vocab), cfg.d_model, cfg.heads, cfg.layers, cfg.ff,
                          cfg.dropout).to(device)
    train_model = distributed.wrap(model)  # DDP with --nproc: the training step calls this one
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scaler = grad_scaler(device, precision)  # scales the loss for fp16 only; a no-op otherwise
    total_steps = cfg.epochs * len(length_batches(train, cfg.batch_size, torch.Generator(), cfg.limit_batches))
    # Linear warm-up, then linear decay to 0 at the last step. A function of the step alone: the same seed
    # gives the same run on any machine, and a resumed run continues it exactly.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / (cfg.warmup + 1), 1 - step / (total_steps + 1)))

    start = run.attach(model, optimizer, scheduler, generator)  # Ctrl-C saves; --resume restores all four
    for epoch in range(start.epoch, cfg.epochs + 1):
        model.train()
        order = epoch_generator(cfg.seed, epoch)  # a function of (seed, epoch): a resumed epoch redraws it
        batches = length_batches(train, cfg.batch_size, order, cfg.limit_batches)
        for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
            idx = distributed.shard(batch)  # this process's part of the global batch
            source, _, decoder_in, target = collate(train, idx, device)  # (B, S), (B,), (B, T), (B, T)
            with autocast(device, precision):
                logits = train_model(source, decoder_in)  # (B, T, V): every position's next word at once
            loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD_ID,
                                   label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.update(sum(len(train[i][1]) + 1 for i in batch), loss=loss.detach())  # target words + <eos>
        # Rank 0 alone evaluates (the replicas hold the same weights) and tells the others the result.
        val_loss, val_bleu = distributed.on_main(validate, model, short["validation"], src_vocab, tgt_vocab, cfg,
                                                 device)
        run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), val_loss=val_loss, val_bleu=val_bleu)

    if start.epoch > cfg.epochs:  # resumed after the last epoch (stopped during the test): evaluation is left
        val_loss = distributed.on_main(validation_loss, model, encode_pairs(short["validation"], src_vocab, tgt_vocab,
                                                                            cfg.max_len), device)

    # --- evaluation on held-out pairs -----------------------------------------------------------------------
    sources, references = [en for en, _ in short["test"]], [es for _, es in short["test"]]
    greedy_out, beam_out = distributed.on_main(translate_test_set, model, sources, src_vocab, tgt_vocab, cfg,
                                               device)
    greedy_bleu, beam_bleu = corpus_bleu(greedy_out, references), corpus_bleu(beam_out, references)
    groups = bleu_by_group(sources, references, beam_out, pairs["train"])  # by length and by rare English words
    write_samples(run.dir / "samples.md", sources, references, greedy_out, beam_out, cfg.beam, groups=groups)
    save_checkpoint(run.dir, run.recipe, model, cfg, src_vocab=src_vocab.tokens, tgt_vocab=tgt_vocab.tokens)
    return run.finish({"test_bleu": beam_bleu, "greedy_bleu": greedy_bleu, "val_loss": val_loss,
                       "tokens_per_s": run.samples_per_s,  # target tokens per second of the last epoch
                       **group_metrics(groups)})  # beam BLEU by slice: bleu_words_1_5 ... bleu_rare, bleu_common


def validate(model: TransformerMT, pairs: list, src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
             device: torch.device) -> tuple[float, float]:
    """Teacher-forced loss on held-out pairs, and greedy BLEU on the first 100 of them."""
    loss = validation_loss(model, encode_pairs(pairs, src_vocab, tgt_vocab, cfg.max_len), device)
    outputs = translate(model, [en for en, _ in pairs[:100]], src_vocab, tgt_vocab, cfg, device, beam=1)
    return loss, corpus_bleu(outputs, [es for _, es in pairs[:100]])


def translate_test_set(model: TransformerMT, sources: list[str], src_vocab: Vocab, tgt_vocab: Vocab, cfg: Config,
                       device: torch.device) -> tuple[list, list]:
    return (translate(model, sources, src_vocab, tgt_vocab, cfg, device, beam=1),
            translate(model, sources, src_vocab, tgt_vocab, cfg, device, beam=cfg.beam))


@torch.no_grad()
def validation_loss(model: TransformerMT, data: list, device: torch.device, batch_size: int = 200) -> float:
    """Mean next-word cross-entropy (no label smoothing) over held-out pairs, teacher-forced."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        source, _, decoder_in, target = collate(data, range(start, min(start + batch_size, len(data))), device)
        logits = model(source, decoder_in)
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
    model = TransformerMT(len(src_vocab), len(tgt_vocab), cfg.d_model, cfg.heads, cfg.layers, cfg.ff, cfg.dropout)
    load_weights(model, state)
    check_sentences(inputs, src_vocab, cfg.max_len, cfg.dataset, beam)
    outputs = translate(model, inputs, src_vocab, tgt_vocab, cfg, torch.device("cpu"), beam)
    return [{"input": text, "output": detokenize(words)} for text, words in zip(inputs, outputs)]


if __name__ == "__main__":
    cli(Config, main)
