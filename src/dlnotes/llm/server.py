"""The server's life: `dlnotes serve` (load, listen, serve until Ctrl+C) and a BackgroundServer for one process.

An OpenAI-compatible chat server for a local model, what Ollama or llama.cpp's server do. Any OpenAI client
talks to it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`. torch is first imported in
`load_engine`, after OpenMP's wait policy is set. What a server accepts (body size, queue, max_tokens, time
per request, allowed hosts and origins) is a `schema.Limits`, the flags of `dlnotes serve`.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dlnotes.errors import UserError
from dlnotes.llm.app import create_app
from dlnotes.llm.schema import Limits

if TYPE_CHECKING:
    from dlnotes.llm.engine import Engine


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: a busy port is a clear error, port 0 a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port}: {err.strerror} (pick another --port).") from err
    sock.listen(128)
    return sock


def load_engine(model: str = "", device: str = "auto", tiny: bool = False) -> Engine:
    """The model (or the tiny random one) behind an Engine. This is where torch is first imported."""
    # How idle OpenMP threads wait (launch.serving_idle_threads); only takes effect if torch was not imported yet
    from dlnotes.launch import serving_idle_threads

    serving_idle_threads()
    from dlnotes.device import in_own_thread, pick_device
    from dlnotes.llm.engine import Engine
    from dlnotes.llm.models import load
    from dlnotes.llm.tiny import tiny_model

    # loading and compiling run multi-threaded: in a thread of their own, whose OpenMP workers end with it and
    # leave the two cores to the workers of the thread that decodes (device.in_own_thread)
    return in_own_thread(lambda: Engine(tiny_model() if tiny else load(model, str(pick_device(device)))))


class BackgroundServer:
    """The server on a free loopback port in a thread of this process: `with BackgroundServer(engine) as url:`."""

    def __init__(self, engine: Engine, api_key: str = "", host: str = "127.0.0.1", port: int = 0,
                 limits: Limits = Limits()) -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        config = uvicorn.Config(create_app(engine, api_key, limits, host), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def read_key(api_key: str = "", api_key_file: str = "") -> str:
    """The API key: from --api-key (or $DLNOTES_API_KEY), or the first line of --api-key-file (kept out of
    argv, which other users of the machine can read in `ps`)."""
    if not api_key_file:
        return api_key
    if api_key:
        raise UserError("Give the API key once: --api-key (or DLNOTES_API_KEY) or --api-key-file, not both.")
    try:
        lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise UserError(f"Cannot read --api-key-file {api_key_file}: {why}.") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise UserError(f"--api-key-file {api_key_file} is empty: write the key on its first line.")
    return key


def serve(model: str = "", host: str = "127.0.0.1", port: int = 8000, api_key: str = "", device: str = "auto",
          api_key_file: str = "", limits: Limits = Limits()) -> None:
    """`dlnotes serve`: load the model, then serve until Ctrl+C."""
    import uvicorn

    api_key = read_key(api_key, api_key_file)
    for name in ("max_body", "max_tokens", "timeout"):
        if getattr(limits, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(limits, name)}.")
    if limits.queue < 0:
        raise UserError(f"--queue must be 0 or more, got {limits.queue}.")
    sock = bind(host, port)  # before loading: a busy port fails in a second, not after the model loads
    engine = load_engine(model, device)
    where = f"http://{host}:{sock.getsockname()[1]}/v1"  # the real port, also when --port 0 picked one
    print(f"Serving {engine.name} at {where} (OpenAI-compatible). Ctrl+C stops.", flush=True)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine with no --api-key: anyone who can reach it can use it.")
    config = uvicorn.Config(create_app(engine, api_key, limits, host), log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
