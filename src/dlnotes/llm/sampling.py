"""From logits to text: sampling a token, decoding tokens to text as they come, and stop strings.

    sample(logits, temperature, top_p, generator)  (V,) -> a token id: greedy at 0, else nucleus sampling
    Detokenizer(tokenizer).add(token)              the text a token adds, never half a UTF-8 character
    StopStrings(stops).add(text)                   (text safe to send, stopped?): holds back what may begin a
                                                   stop string, and searches only that tail

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
    """Incremental decoding: the text each token adds, never half a UTF-8 character.

    Decoding each token alone breaks words ("▁Par" "is") and characters spread over several byte tokens;
    decoding a short window of recent tokens and keeping what it added (the trick of Hugging Face's
    text-generation-inference) does not, and costs the same for every token however long the reply:
    neither the reply's ids nor its text are decoded again."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        """The text this token completes ("" while a character is unfinished)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left at the end of the reply, an unfinished character included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):  # U+FFFD: an unfinished character
            self.prefix, self.read = self.read, len(self.ids)
            del self.ids[:self.prefix]  # the window is all that is decoded again: keep only it
            self.prefix, self.read = 0, self.read - self.prefix
            return now[len(before):]
        return ""


class StopStrings:
    """Text in as it is decoded, text out once it cannot be the start of a stop string.

    Only a tail is ever searched: the text held back (shorter than the longest stop string) plus what the
    last token added. A stop string that ends in the new text began at most that far back, so nothing
    earlier needs a second look, and each token costs the same however long the reply grows.

        stops = StopStrings(["\n\n"])
        safe, stopped = stops.add(piece)   # send `safe`; when `stopped`, the reply ends with it
        rest = stops.flush()               # at the end: what was held back"""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held = stops, ""

    def add(self, text: str) -> tuple[str, bool]:
        tail = self.held + text
        hits = [i for s in self.stops if (i := tail.find(s)) >= 0]
        if hits:  # the reply ends just before the first stop string
            self.held = ""
            return tail[:min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:n])), default=0)  # the longest end of tail that begins a stop string
        self.held = tail[len(tail) - keep:]
        return tail[:len(tail) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
