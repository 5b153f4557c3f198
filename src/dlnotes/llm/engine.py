"""Generation: one loaded model behind a lock, and the decoding loop that turns a request into pieces of text.

The loop is written out (no `model.generate`): prefill the prompt once, then one token per forward pass
reusing the KV cache (`decoders`), sampling with temperature and top-p, decoding text incrementally so
multi-byte characters are never cut, and holding back text that might be the start of a stop string
(`sampling`); a request that asks for JSON or a tool call picks only tokens that keep it valid (`guide`,
`tools`). Requests take turns: one model, one KV cache at a time; a second request waits for the first
instead of mixing its tokens into it, and waiting requests are served in order of arrival.

    engine = Engine(load(...))
    ids, budget = engine.check_budget(req, max_tokens)  # the prompt's ids; a 400 when it cannot fit the context
    for piece in engine.generate(req, ids, budget, cancel, deadline):
        ...                                         # Piece(text), the last with finish_reason and token counts

`generate` waits for the model (`wait_turn`), decodes (`decode`) and releases it. Every token it checks
`cancel` (set when the client left) and the deadline (`time.monotonic()`), so an abandoned or overdue
request gives the model back at the next token: a deadline ends the reply with finish_reason "length", as
llama.cpp's time limit does; passing it while still waiting is a 503.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dlnotes.llm.decoders import decoder_for
from dlnotes.llm.guide import Guide, vocabulary
from dlnotes.llm.models import LoadedModel
from dlnotes.llm.sampling import Detokenizer, StopStrings, sample
from dlnotes.llm.schema import APIError, ChatRequest
from dlnotes.llm.tools import chat_prompt


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    """One loaded model and the lock that makes requests take turns."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.lock = threading.Lock()  # held by the request generating
        self.line: deque[threading.Event] = deque()  # requests waiting for the model, first come first served
        self.line_lock = threading.Lock()
        self.device = next(loaded.model.parameters()).device
        config_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
        eos = [loaded.tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])]
        self.eos = {int(t) for t in eos if t is not None}
        self.decoder = decoder_for(loaded.model)  # on the CPU this compiles the decoding step: seconds

        # Each token stands for at most this many characters of text, so a prompt of more than
        # context * max_token_chars characters cannot fit the context: refused before templating or tokenizing.
        self.max_token_chars = max(len(t) for t in loaded.tokenizer.get_vocab())

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        text = chat_prompt(self.loaded.tokenizer, req)  # the chat template, with the tools when there are some
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the specials

    def check_budget(self, req: ChatRequest, max_tokens: int | None = None) -> tuple[list[int], int]:
        """The prompt's ids and the number of tokens it may generate (at most `max_tokens`, the server's cap);
        a 400 when it cannot fit the context. The prompt's length is bounded in characters first, cheaply."""
        context = self.loaded.context
        cap = context if max_tokens is None else min(max_tokens, context)
        if req.max_tokens is not None and req.max_tokens > context:
            raise APIError(400, f"max_tokens is {req.max_tokens}, but the model's context is {context} tokens.",
                           "max_tokens", "context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > cap:
            raise APIError(400, f"max_tokens is {req.max_tokens}; this server allows at most {cap}.", "max_tokens")
        chars = sum(len(m["content"]) for m in req.messages) + req.tool_chars
        if chars > context * self.max_token_chars:
            raise APIError(400, f"The messages are {chars} characters, far more than the model's context of "
                           f"{context} tokens. Shorten the messages.", "messages", "context_length_exceeded")
        ids = self.prompt_ids(req)
        if len(ids) >= context:
            raise APIError(400, f"The prompt is {len(ids)} tokens; the model's context is {context} tokens. "
                           "Shorten the messages.", "messages", "context_length_exceeded")
        budget = req.max_tokens if req.max_tokens is not None else min(cap, context - len(ids))
        if len(ids) + budget > context:
            raise APIError(400, f"The prompt is {len(ids)} tokens, and {len(ids)} + max_tokens {budget} is more than "
                           f"the model's context of {context} tokens. Lower max_tokens.",
                           "max_tokens", "context_length_exceeded")
        return ids, budget

    def wait_turn(self, cancel: threading.Event, deadline: float = math.inf) -> bool:
        """Wait for the model, in order of arrival: True once this caller holds it (release with
        `self.lock.release()`), False if `cancel` was set meanwhile; a 503 when the deadline passes first."""
        me = threading.Event()  # set when this caller is first in line
        with self.line_lock:
            self.line.append(me)
            if self.line[0] is me:
                me.set()
        try:
            # first wait to be first in line, then for the model; 50 ms to notice cancel and the deadline
            for wait in (lambda: me.wait(0.05), lambda: self.lock.acquire(timeout=0.05)):
                while not wait():
                    if cancel.is_set():
                        return False
                    if time.monotonic() >= deadline:
                        raise APIError(503, "The server is busy: the request waited for the model until its "
                                       "deadline.", code="server_busy", kind="server_error")
        finally:
            with self.line_lock:  # out of the line, holding the model or not; the next one moves up
                first = self.line[0] is me
                self.line.remove(me)
                if first and self.line:
                    self.line[0].set()
        if cancel.is_set():  # left while waiting, and the model came free in the same instant
            self.lock.release()
            return False
        return True

    def generate(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event,
                 deadline: float = math.inf) -> Iterator[Piece]:
        """Text pieces as they are decoded; the last piece carries finish_reason and the token counts.
        Waits for the model first (`wait_turn`); nothing at all if cancelled while waiting."""
        if not self.wait_turn(cancel, deadline):
            return
        try:
            yield from self.decode(req, ids, budget, cancel, deadline)
        finally:
            self.lock.release()

    def decode(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event,
               deadline: float = math.inf) -> Iterator[Piece]:
        """The decoding loop, for a caller that holds the model (`wait_turn`)."""
        with torch.inference_mode():
            yield from self._decode(req, ids, budget, cancel, deadline)

    def _decode(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event,
                deadline: float) -> Iterator[Piece]:
        decoder, tokenizer = self.decoder, self.loaded.tokenizer
        generator = torch.Generator(self.device)
        generator.manual_seed(req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
        out: list[int] = []
        text, stops = Detokenizer(tokenizer), StopStrings(req.stop)
        finish, hit_stop = "length", False
        logits = decoder.prefill(ids, max_len=len(ids) + budget)  # (V,): the whole prompt in one pass
        guide = None if req.grammar is None else Guide(req.grammar, vocabulary(tokenizer, len(logits)))
        while not cancel.is_set() and time.monotonic() < deadline:
            if guide is None:
                token = sample(logits, req.temperature, req.top_p, generator)
            else:  # only tokens that keep the JSON valid and finishable in the tokens left
                token = guide.pick(logits, req.temperature, req.top_p, generator, budget - len(out))
            if token in self.eos:
                finish = "stop"
                break
            out.append(token)
            safe, hit_stop = stops.add(text.add(token))  # held back: what may be the start of a stop string
            if safe:
                yield Piece(safe)
            if hit_stop:  # the reply ends just before the stop string
                finish = "stop"
                break
            if guide is not None and guide.done:  # the JSON is complete: nothing may follow it
                finish = "stop"
                break
            if len(out) == budget:
                break
            logits = decoder.step(token)  # (V,): one token through the model, the cache holds all before it
        if not hit_stop and not cancel.is_set():
            safe, hit_stop = stops.add(text.flush())  # an unfinished character at the very end
            rest = safe if hit_stop else safe + stops.flush()  # held-back text that never became a stop string
            if hit_stop:
                finish = "stop"
            if rest:
                yield Piece(rest)
        yield Piece("", finish, prompt_tokens=len(ids), completion_tokens=len(out))
