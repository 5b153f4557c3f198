"""FastText: hashed n-gram embeddings pooled into one vector, then a linear layer; next to tf-idf + SVM.

The FastText classifier (Joulin et al., 2016, "Bag of Tricks for Efficient Text Classification") reads a
text as a bag of features: its tokens and its runs of adjacent tokens (n-grams). Every feature has a
learned vector, the text's vector pools them, and one linear layer turns it into class scores. Word order
enters only through the n-grams ("not good" is not "good"), and for short texts that is enough. There are
far too many n-grams to list, so each one is hashed into one of `buckets` shared rows (the hashing trick):
two n-grams may share a row, which costs little accuracy and bounds the memory.

    text              "a dull, lifeless film"
    tokens            a | dull | , | lifeless | film        English: lower-cased words; Chinese: characters
    token ids         5 ids < V                              vocabulary of the training split; unknown -> <unk>
    n-gram ids        4 bigrams: V + crc32("a dull") % buckets   a stable hash, so ids survive a restart
    one batch         flat ids (sum of lengths,), offsets (B,)   no padding: EmbeddingBag reads ragged bags
    EmbeddingBag      (B, D)                                 pooled feature vectors of each text
    linear            (B, 2)                                 logits; cross-entropy applies the softmax

English uses word bigrams, as the paper does for sentiment. A Chinese word is one to three characters, so
character bigrams and trigrams play the part of words and word pairs (no segmenter needed): trigrams add
about a point on the Chinese reviews (English word trigrams add nothing).

Two departures from the paper. It averages the vectors (`--pooling mean`); here their sum is divided by
sqrt(n), so a long review's vector is not shrunk towards zero (about +1 point on the long Chinese
reviews, as good or better on English). And its plain SGD becomes Adagrad, which gives every row its own
step size: rare n-grams move further, much as tf-idf weights rare terms up. The gradients are sparse
(only the rows of the batch's features), and the epoch with the best validation accuracy is kept.
Texts go through Hugging Face `datasets` (`Dataset.from_dict`, then `.map` to tokenize and to look ids
up), the usual pipeline for text, here on the offline splits in data/.

The traditional model runs alongside on the same split: tf-idf weights of the same n-grams and a linear
SVM (scikit-learn). Both are linear models over n-grams, and they land within about a point of each other;
FastText's features share a small dense space, and it gives probabilities.

`--dataset rotten-tomatoes` trains on English movie-review snippets, `--dataset chinese-reviews` on Chinese
product and hotel reviews. A run reads only the language it was trained on: `predict` refuses a text
none of whose tokens the run has seen, and warns when fewer than half are known.

`--nproc 2` trains with 2 processes (DistributedDataParallel over gloo, which, unlike nccl, all-reduces
sparse gradients): each takes half of every batch. It reaches the same test accuracy as one process.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes import distributed
from dlnotes.catalog import recipe_id
from dlnotes.checkpoint import load_checkpoint, load_weights, restore_config, save_checkpoint
from dlnotes.datasets import batch_indices, epoch_generator
from dlnotes.device import cpu_threads, pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_choice, require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_confusion_matrix
from dlnotes.text import Vocab, char_tokens, word_tokens
from dlnotes.textdata import TEXT_CLASSIFICATION, load_text_classification
from dlnotes.tracking import Run

TAGS = ("text", "classification", "nlp")
DATASET = "Rotten Tomatoes (English) | Chinese reviews (offline)"
TARGET = ("test_acc", 0.76)  # Rotten Tomatoes; Chinese reviews reach about 0.86
SMOKE = {"epochs": 1, "limit_batches": 20, "buckets": 1000}
DISTRIBUTED = True  # dlnotes run fasttext --nproc N (gloo: sparse gradients)
LANGUAGE = {"rotten-tomatoes": "English", "chinese-reviews": "Chinese"}


@dataclass
class Config:
    dataset: str = "rotten-tomatoes"  # rotten-tomatoes (English words) | chinese-reviews (Chinese characters)
    epochs: int = 3  # validation accuracy peaks after 1 to 3 epochs, then the n-grams overfit
    batch_size: int = 32  # small batches: many cheap sparse updates, close to the paper's per-example SGD
    lr: float = 0.05  # Adagrad's first step size, decaying linearly to 0 as in the paper; 0.1 overfits English
    dim: int = 32  # embedding size: the paper uses 10 for sentiment; 32 is a little steadier
    ngrams: int = 0  # longest hashed n-gram; 0 = 2 for English words, 3 for Chinese characters
    buckets: int = 500_000  # hashed n-gram rows: Chinese has ~650k distinct character bi- and trigrams
    pooling: str = "sqrt"  # sqrt: sum / sqrt(n) | mean: the paper's average
    min_count: int = 2  # rarer tokens become <unk>, so <unk> itself gets trained
    max_tokens: int = 400  # longer texts are truncated (a few Chinese reviews run to 2,800 characters)
    svm_c: float = 1.0  # the baseline SVM's regularisation (scikit-learn's default)
    limit_batches: int = 0  # 0 = all; smoke runs train on a few batches only
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/fasttext/

    def __post_init__(self) -> None:
        require_choice(self, "dataset", TEXT_CLASSIFICATION)
        require_choice(self, "pooling", ("sqrt", "mean"))
        if self.ngrams == 0:  # resolved here, so config.json and the checkpoint record the value used
            self.ngrams = 3 if self.dataset == "chinese-reviews" else 2
        require_positive(self, "epochs", "batch_size", "lr", "dim", "ngrams", "buckets", "min_count", "max_tokens",
                         "svm_c")


# --- features ---------------------------------------------------------------------------------------------


def tokenize(text: str, dataset: str) -> list[str]:
    return char_tokens(text) if dataset == "chinese-reviews" else word_tokens(text)


def ngrams(tokens: list[str], n: int) -> list[str]:
    """Tokens, then every run of 2..n adjacent tokens: the features of both models."""
    return tokens + [" ".join(tokens[i : i + k]) for k in range(2, n + 1) for i in range(len(tokens) - k + 1)]


def feature_ids(tokens: list[str], vocab: Vocab, n: int, buckets: int) -> list[int]:
    """Vocabulary ids of the tokens, then hashed ids of the n-grams (rows V .. V + buckets - 1).
    crc32, not Python's hash(): that one is salted per process, and saved ids would change meaning."""
    grams = ngrams(tokens, n)[len(tokens) :]
    return vocab.encode(tokens) + [len(vocab) + zlib.crc32(g.encode()) % buckets for g in grams]


def collate(features: list[torch.Tensor], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged bags -> EmbeddingBag's input: all ids end to end, and where each text starts."""
    bags = [features[i] for i in idx]
    starts = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
    return torch.cat(bags), starts  # (sum of lengths,), (B,)


# --- model ------------------------------------------------------------------------------------------------


class FastText(nn.Module):
    def __init__(self, num_features: int, dim: int, num_classes: int, pooling: str = "sqrt") -> None:
        super().__init__()
        # sparse=True: the gradient holds only the rows used in the batch, not all 500k
        self.embedding = nn.EmbeddingBag(num_features, dim, mode="mean" if pooling == "mean" else "sum",
                                         sparse=True)
        self.linear = nn.Linear(dim, num_classes)
        self.pooling = pooling
        nn.init.uniform_(self.embedding.weight, -1 / dim, 1 / dim)  # fastText's init: small, so early sums ~0

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weights = None
        if self.pooling == "sqrt":
            lengths = torch.diff(offsets, append=offsets.new_tensor([len(ids)]))  # (B,)
            weights = lengths.clamp(min=1).float().rsqrt().repeat_interleave(lengths)  # (N,) 1/sqrt(n) per id
        return self.linear(self.embedding(ids, offsets, per_sample_weights=weights))  # (B, D) -> (B, C)


@torch.no_grad()
def evaluate(model: FastText, features: list[torch.Tensor], labels: torch.Tensor, device: torch.device,
             batch_size: int = 2048) -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and predicted classes."""
    model.eval()
    chunks = [collate(features, range(i, min(i + batch_size, len(features))))
              for i in range(0, len(features), batch_size)]
    logits = torch.cat([model(ids.to(device), offsets.to(device)) for ids, offsets in chunks])  # (N, C)
    labels = labels.to(device)
    predicted = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels).item(), (predicted == labels).float().mean().item(), predicted.cpu()


def tfidf_svm(splits: dict, cfg: Config, train_size: int) -> dict[str, float]:
    """The traditional model: tf-idf of the same n-grams, a linear SVM on top, fit on `train_size` texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    start = time.perf_counter()

    def features(text: str) -> list[str]:
        return ngrams(tokenize(text, cfg.dataset)[: cfg.max_tokens], cfg.ngrams)

    vectorizer = TfidfVectorizer(analyzer=features, sublinear_tf=True)  # 1 + log(tf): twice is not twice as much
    texts, labels = (column[:train_size] for column in splits["train"])
    svm = LinearSVC(C=cfg.svm_c).fit(vectorizer.fit_transform(texts), labels)
    accuracy = {split: svm.score(vectorizer.transform(splits[split][0]), splits[split][1])
                for split in ("validation", "test")}
    return {"val_acc": accuracy["validation"], "test_acc": accuracy["test"], "train_s": time.perf_counter() - start}


# --- training ---------------------------------------------------------------------------------------------


@contextmanager
def small_sparse_steps(device: torch.device) -> Iterator[None]:
    """A step is a small batch of sparse bags, very little work: on a CPU, handing part of it to a second
    thread costs more than it saves (far more when another process keeps that core busy), so training uses
    one. Checking every sparse gradient's invariants is switched off explicitly (Adagrad warns when it is off
    implicitly)."""
    with cpu_threads(1 if device.type == "cpu" else 0), torch.sparse.check_sparse_tensor_invariants(enable=False):
        yield


def main(cfg: Config) -> dict[str, float]:
    from datasets import Dataset, disable_progress_bars

    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the other processes
    generator = seed_everything(cfg.seed)
    data = load_text_classification(cfg.dataset)
    run = Run(__file__, cfg, device)
    print(f"data: {cfg.dataset} ({LANGUAGE[cfg.dataset]})  device: {device}  processes: {run.world_size}  "
          f"run: {run.dir}")

    # --- text pipeline: datasets' map tokenizes, then looks ids up ----------------------------------------
    def tokenize_batch(batch: dict) -> dict:
        return {"tokens": [tokenize(text, cfg.dataset)[: cfg.max_tokens] for text in batch["text"]]}

    def lookup_batch(batch: dict) -> dict:
        return {"ids": [feature_ids(tokens, vocab, cfg.ngrams, cfg.buckets) for tokens in batch["tokens"]]}

    disable_progress_bars()  # six quick maps: their bars would bury the training log
    splits = {name: Dataset.from_dict({"text": texts, "label": labels}).map(tokenize_batch, batched=True)
              for name, (texts, labels) in data.splits.items()}
    vocab = Vocab.build(splits["train"]["tokens"], min_count=cfg.min_count)  # training split only
    splits = {name: ds.map(lookup_batch, batched=True, remove_columns=["tokens"]) for name, ds in splits.items()}
    features = {name: [torch.tensor(ids) for ids in ds["ids"]] for name, ds in splits.items()}  # ragged
    labels = {name: torch.tensor(ds["label"]) for name, ds in splits.items()}  # (N,)
    print(f"vocabulary: {len(vocab):,} tokens (min count {cfg.min_count}), "
          f"{cfg.buckets:,} buckets for 2- to {cfg.ngrams}-grams")

    model = FastText(len(vocab) + cfg.buckets, cfg.dim, len(data.label_names), cfg.pooling).to(device)
    train_model = distributed.wrap(model)  # DDP all-reduces the sparse embedding gradients too (gloo only)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=cfg.lr)  # handles the sparse embedding gradients
    steps_per_epoch = len(batch_indices(len(features["train"]), cfg.batch_size, limit=cfg.limit_batches))
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)

    best_acc, best_state, start = -1.0, None, time.perf_counter()

    def resumable() -> dict:  # beyond model/optimizer/scheduler/RNG: the best epoch so far, to return to at the end
        return {"best_acc": best_acc, "best_state": best_state}

    resume_at = run.attach(model, optimizer, scheduler, generator, extra=resumable)  # --resume restores them
    if run.restored_extra:
        best_acc, best_state = run.restored_extra["best_acc"], run.restored_extra["best_state"]
    with small_sparse_steps(device):
        for epoch in range(resume_at.epoch, cfg.epochs + 1):
            model.train()
            order = epoch_generator(cfg.seed, epoch)  # a function of (seed, epoch): a resumed epoch redraws it
            batches = batch_indices(len(features["train"]), cfg.batch_size, order, limit=cfg.limit_batches)
            for batch in run.steps(batches, total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}"):
                idx = distributed.shard(batch)  # this process's part of the global batch
                ids, offsets = collate(features["train"], idx.tolist())
                logits = train_model(ids.to(device), offsets.to(device))  # (B, C)
                loss = F.cross_entropy(logits, labels["train"][idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                run.update(len(batch), loss=loss.detach())
            # Rank 0 alone evaluates (the replicas hold the same weights) and tells the others the result.
            val_loss, val_acc, _ = distributed.on_main(evaluate, model, features["validation"], labels["validation"],
                                                       device)
            run.end_epoch(epoch, train_loss=run.epoch_mean("loss"), val_loss=val_loss, val_acc=val_acc)
            if val_acc > best_acc:  # keep the best epoch's weights (a copy: training goes on in place)
                best_acc, best_state = val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - start
    model.load_state_dict(best_state)

    # --- evaluation, next to the traditional model ----------------------------------------------------------
    test_loss, test_acc, predicted = distributed.on_main(evaluate, model, features["test"], labels["test"], device)
    baseline = distributed.on_main(tfidf_svm, data.splits, cfg, steps_per_epoch * cfg.batch_size)  # as many texts
    print(f"\n{'model':<16}{'val_acc':>9}{'test_acc':>10}{'train s':>9}")
    print(f"{'fasttext':<16}{best_acc:>9.4f}{test_acc:>10.4f}{train_s:>9.1f}")
    print(f"{'tf-idf + SVM':<16}{baseline['val_acc']:>9.4f}{baseline['test_acc']:>10.4f}{baseline['train_s']:>9.1f}")

    classes = len(data.label_names)
    confusion = torch.bincount(labels["test"] * classes + predicted, minlength=classes**2).view(classes, classes)
    plot_confusion_matrix(confusion.numpy(), data.label_names, run.dir / "confusion.png",
                          title=f"fasttext on {cfg.dataset} test: accuracy {test_acc:.3f}")
    save_checkpoint(run.dir, run.recipe, model, cfg, vocab=vocab.tokens, classes=list(data.label_names))
    return run.finish({"test_acc": test_acc, "test_loss": test_loss, "val_acc": best_acc,
                       "tfidf_svm_test_acc": baseline["test_acc"], "tfidf_svm_val_acc": baseline["val_acc"],
                       "train_s": train_s, "samples_per_s": run.samples_per_s})


# --- using the trained model ------------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """Both classes with probabilities for each text, most likely first."""
    state = load_checkpoint(run_dir, recipe_id(__file__))
    cfg = restore_config(Config, state)
    vocab, classes = Vocab(state["vocab"]), state["classes"]
    rows = len(vocab) + cfg.buckets
    # The checkpoint's config is data, not trust: sizes that disagree with the saved weights are refused
    # before the model allocates them (a doctored `buckets` could ask for terabytes).
    saved = tuple(getattr(state["model"].get("embedding.weight"), "shape", ()))
    if saved != (rows, cfg.dim):
        raise UserError(f"{run_dir}: the checkpoint's config asks for a {rows:,} x {cfg.dim} embedding, but its "
                        f"weights are {saved}; not loading it.")
    model = FastText(rows, cfg.dim, len(classes), cfg.pooling)
    load_weights(model, state)
    model.eval()
    if not inputs:
        raise UserError("Give at least one text to classify, in quotes.")
    bags = []
    for n, text in enumerate(inputs, 1):
        tokens = tokenize(text, cfg.dataset)
        if not tokens:
            raise UserError(f"Text {n} is empty: give the text to classify.")
        # Latin letters and digits occur in Chinese reviews too (URLs, model names): they don't make a text Chinese.
        own = [t for t in tokens if not (cfg.dataset == "chinese-reviews" and t.isascii())]
        known = sum(t in vocab for t in own)
        language = f"this run reads {LANGUAGE[cfg.dataset]} (trained on {cfg.dataset})"
        if known == 0:
            raise UserError(f"Text {n} ({text[:40]!r}) has no token this run knows; {language}.")
        if known < len(own) / 2:
            print(f"note: text {n}: only {known} of its {len(own)} tokens are known; {language}, "
                  "so the prediction is unreliable.", file=sys.stderr)
        if len(tokens) > cfg.max_tokens:
            print(f"note: text {n} has {len(tokens)} tokens; truncated to the first {cfg.max_tokens}.",
                  file=sys.stderr)
        bags.append(torch.tensor(feature_ids(tokens[: cfg.max_tokens], vocab, cfg.ngrams, cfg.buckets)))
    with torch.no_grad():
        probs = model(*collate(bags, list(range(len(bags))))).softmax(dim=1)  # (B, C)
    ranked = probs.sort(dim=1, descending=True)
    return [{"input": text, "top": [(classes[i], p) for p, i in zip(values.tolist(), indices.tolist())]}
            for text, values, indices in zip(inputs, ranked.values, ranked.indices)]


if __name__ == "__main__":
    cli(Config, main)
