"""llama.cpp's own benchmark, `llama-bench`, as the yardstick for serving speed: where it is, and one run of it.

`make llama-bench` builds it from the llama.cpp source vendored in the llama-cpp-python sdist (a measuring tool,
not a dependency). `dlnotes bench llm-chat` runs it as llm-chat's baseline; `scripts/bench_llm.py --llama-bench`
runs it before and after its own timing. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from dlnotes.errors import UserError
from dlnotes.launch import WAIT_VARIABLES

BUILT = Path(__file__).resolve().parents[3] / ".deps" / "bin" / "llama-bench"  # where `make llama-bench` puts it


def binary() -> str:
    """$DLNOTES_LLAMA_BENCH, else the one `make llama-bench` built, else `llama-bench` on PATH ("" if none)."""
    if given := os.environ.get("DLNOTES_LLAMA_BENCH"):
        return given
    return str(BUILT) if BUILT.is_file() else shutil.which("llama-bench") or ""


def missing() -> str:
    """Why llama-bench cannot run here ("" when it can)."""
    found = binary()
    if not found:
        return ("llama.cpp's llama-bench is not built: `make llama-bench` builds it into .deps/bin (~6 minutes), "
                "or set DLNOTES_LLAMA_BENCH to one")
    return "" if os.access(found, os.X_OK) else f"DLNOTES_LLAMA_BENCH={found} is not an executable file"


def run(gguf: Path, threads: int, repetitions: int = 3, path: str = "") -> dict[str, float]:
    """`llama-bench -p 64 -n 128` on `gguf` (the issue's settings): {"prompt": tokens/s, "generation": tokens/s}.

    It runs with the OpenMP wait settings llama.cpp's users have, none of dlnotes': under PASSIVE its threads
    sleep between a token's many small kernels (measured: 20.7 instead of 78.9 tokens/s)."""
    command = [path or binary(), "-m", str(gguf), "-t", str(threads), "-p", "64", "-n", "128",
               "-r", str(repetitions), "-o", "json"]
    own_env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    done = subprocess.run(command, capture_output=True, text=True, env=own_env)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"llama-bench failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    return {"prompt" if row["n_prompt"] else "generation": float(row["avg_ts"]) for row in json.loads(done.stdout)}
