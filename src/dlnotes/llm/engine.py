"""Generation: one loaded model behind a lock, and the decoding loop that turns a request into pieces of text.

The loop is written out (no `model.generate`): prefill the prompt once, then one token per forward pass
reusing the KV cache (`decoders`), sampling with temperature and top-p, decoding text incrementally so
multi-byte characters are never cut, and holding back text that might be the start of a stop string
(`sampling`). Requests take turns: one model, one KV cache at a time; a second request waits for the first
instead of mixing its tokens into it.

    engine = Engine(load(...))
    ids, budget = engine.check_budget(req)          # the prompt's ids; a 400 when it cannot fit the context
    for piece in engine.generate(req, ids, budget, cancel):
        ...                                         # Piece(text), the last with finish_reason and token counts
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dlnotes.llm.decoders import decoder_for
from dlnotes.llm.models import LoadedModel
from dlnotes.llm.sampling import Detokenizer, find_stop, sample, stop_prefix_len
from dlnotes.llm.schema import APIError, ChatRequest


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
        self.lock = threading.Lock()
        self.device = next(loaded.model.parameters()).device
        config_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
        eos = [loaded.tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])]
        self.eos = {int(t) for t in eos if t is not None}
        self.decoder = decoder_for(loaded.model)  # on the CPU this compiles the decoding step: seconds

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        text = self.loaded.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the specials

    def check_budget(self, req: ChatRequest) -> tuple[list[int], int]:
        """The prompt's ids and the number of tokens it may generate; a 400 when it cannot fit the context."""
        context = self.loaded.context
        ids = self.prompt_ids(req)
        if req.max_tokens is not None and req.max_tokens > context:
            raise APIError(400, f"max_tokens is {req.max_tokens}, but the model's context is {context} tokens.",
                           "max_tokens", "context_length_exceeded")
        if len(ids) >= context:
            raise APIError(400, f"The prompt is {len(ids)} tokens; the model's context is {context} tokens. "
                           "Shorten the messages.", "messages", "context_length_exceeded")
        budget = req.max_tokens if req.max_tokens is not None else context - len(ids)
        if len(ids) + budget > context:
            raise APIError(400, f"The prompt is {len(ids)} tokens, and {len(ids)} + max_tokens {budget} is more than "
                           f"the model's context of {context} tokens. Lower max_tokens.",
                           "max_tokens", "context_length_exceeded")
        return ids, budget

    def generate(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event) -> Iterator[Piece]:
        """Text pieces as they are decoded; the last piece carries finish_reason and the token counts."""
        with self.lock, torch.inference_mode():
            yield from self._generate(req, ids, budget, cancel)

    def _generate(self, req: ChatRequest, ids: list[int], budget: int, cancel: threading.Event) -> Iterator[Piece]:
        decoder, tokenizer = self.decoder, self.loaded.tokenizer
        generator = torch.Generator(self.device)
        generator.manual_seed(req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
        out: list[int] = []
        emitted = ""  # the part of the reply already sent
        text = Detokenizer(tokenizer)
        finish, hit_stop = "length", False
        logits = decoder.prefill(ids, max_len=len(ids) + budget)  # (V,): the whole prompt in one pass
        while not cancel.is_set():
            token = sample(logits, req.temperature, req.top_p, generator)
            if token in self.eos:
                finish = "stop"
                break
            out.append(token)
            full = text.add(token)
            cut = find_stop(full, req.stop, len(emitted))
            if cut is not None:  # a stop string: the reply ends just before it
                finish, hit_stop = "stop", True
                if cut > len(emitted):
                    yield Piece(full[len(emitted):cut])
                break
            safe = len(full) - stop_prefix_len(full, req.stop)  # hold back what may be the start of a stop string
            if safe > len(emitted):
                yield Piece(full[len(emitted):safe])
                emitted = full[:safe]
            if len(out) == budget:
                break
            logits = decoder.step(token)  # (V,): one token through the model, the cache holds all before it
        if not hit_stop and not cancel.is_set():
            rest = text.flush()  # held-back text, or an unfinished character at the very end
            if len(rest) > len(emitted):
                yield Piece(rest[len(emitted):])
        yield Piece("", finish, prompt_tokens=len(ids), completion_tokens=len(out))

