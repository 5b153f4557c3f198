"""From logits to text: sampling a token, decoding tokens to text as they come, and stop strings.

    sample(logits, temperature, top_p, generator)  (V,) -> a token id: greedy at 0, else nucleus sampling
    Detokenizer(tokenizer).add(token)              the reply's text so far, never half a UTF-8 character
    find_stop(text, stops, start)                  where a stop string begins (the reply ends before it)
    stop_prefix_len(text, stops)                   how much of the end to hold back: it may begin a stop string

torch is imported inside `sample`, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any


def sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """Next token from (V,) logits: greedy at temperature 0, else softmax(logits / T) cut to the top-p mass."""
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # tokens after the nucleus is already full
        sorted_probs[outside] = 0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Incremental decoding: the text so far after each token, never with half a UTF-8 character.

    Decoding each token alone breaks words ("▁Par" "is") and characters spread over several byte tokens;
    decoding a short window of recent tokens and keeping what it added (the trick of Hugging Face's
    text-generation-inference) does not, and costs the same for every token however long the reply."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix, self.read, self.text = tokenizer, [], 0, 0, ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):  # U+FFFD: an unfinished character
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first stop string begins in `text`, searching only what is new since `start`."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)

