"""The guide of a constrained reply: which tokens the model may pick so that its JSON stays valid and finishes.

    guide = Guide(node, vocabulary(tokenizer))   # node: constrained.compile_schema(...)
    token = guide.pick(logits, temperature, top_p, generator, remaining=budget - len(out))
    guide.done                                   # True once the JSON value is complete: the reply ends there

The model still chooses among the valid tokens by its own probabilities (temperature and top-p apply to
what is left), so the reply is its answer, only well-formed. The matcher works on bytes, so each token is
its bytes (`vocabulary`; byte-level BPE spells every byte, special tokens have none).

The reply always ends complete: a token is accepted only if the shortest way to finish the JSON from after
it still fits the tokens left (`constrained.min_len`, in bytes: each byte a completion needs, printable
ASCII and the bytes of the schema's keys and enums, is a token of its own in a byte-level vocabulary;
`spells` checks it). At the end of the budget only the closing bytes remain possible. The price: max_tokens must be
at least the schema's shortest value in bytes (the server answers 400 otherwise).

Checking a token costs a few microseconds of Python per byte. A step first samples as usual and checks
that one token (the model usually proposes a valid one); only after a few refusals it computes the exact
set of valid tokens (`allowed`), skipping the plain tokens of a free string, which are all valid there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from dlnotes.llm.constrained import Node, feed, finished, literal_bytes, min_len, start_state

TRIES = 8  # sampled tokens checked one by one before computing the whole set of valid tokens


@dataclass
class Vocabulary:
    """Each token id's bytes (None for special tokens and ids beyond the tokenizer), as tensors for masking."""
    tokens: list[bytes | None]
    first: Any  # (V,) long: each token's first byte, 256 for None
    plain: Any  # (V,) bool: tokens that may continue any string (no '"', '\\' or control byte)
    tricky: list[int]  # the other tokens with bytes: checked one by one inside a string
    singles: frozenset[int]  # the byte values that are a token of their own


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in token strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_VOCABULARIES: dict[int, tuple[Any, Vocabulary]] = {}


def vocabulary(tokenizer: Any, size: int | None = None) -> Vocabulary:
    """The tokenizer's tokens as bytes; computed once per tokenizer (tens of milliseconds for 49k tokens)."""
    import torch

    key = id(tokenizer)
    if key in _VOCABULARIES and _VOCABULARIES[key][0] is tokenizer and (
            size is None or len(_VOCABULARIES[key][1].tokens) == size):
        return _VOCABULARIES[key][1]
    size = size or len(tokenizer)
    decoder = _byte_decoder()
    special = set(tokenizer.all_special_ids) | {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = all(c in decoder for p in pieces[:1000] if p for c in p)  # GPT-2-style byte-level BPE
    tokens: list[bytes | None] = []
    for i in range(size):
        piece = pieces[i] if i < len(pieces) else None
        if piece is None or i in special:
            tokens.append(None)
        elif byte_level and all(c in decoder for c in piece):
            tokens.append(bytes(decoder[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
        if tokens[-1] == b"":
            tokens[-1] = None
    first = torch.tensor([t[0] if t else 256 for t in tokens])
    plain = torch.tensor([bool(t) and not any(b in (0x22, 0x5C) or b < 0x20 for b in t) for t in tokens])
    tricky = [i for i, t in enumerate(tokens) if t and not plain[i]]
    singles = frozenset(t[0] for t in tokens if t and len(t) == 1)
    vocab = Vocabulary(tokens, first, plain, tricky, singles)
    _VOCABULARIES[key] = (tokenizer, vocab)
    return vocab


def spells(vocab: Vocabulary, node: Node) -> bool:
    """Whether every byte that a shortest completion of this schema may need is a token of its own."""
    return set(range(0x20, 0x7F)) | literal_bytes(node) <= vocab.singles


class Guide:
    """One reply's constraint: follows the tokens picked and picks only tokens that keep the JSON valid and
    finishable within the tokens left."""

    def __init__(self, node: Node, vocab: Vocabulary) -> None:
        self.vocab, self.state = vocab, start_state(node)

    @property
    def done(self) -> bool:
        return finished(self.state)

    def accepts(self, token: int, remaining: int) -> Any:
        """The state after `token`, or None: refused, or it would leave too few tokens to finish the JSON."""
        data = self.vocab.tokens[token] if token < len(self.vocab.tokens) else None
        if data is None:
            return None
        state = feed(self.state, data)
        if not state or (not finished(state) and min_len(state) > remaining - 1):
            return None
        return state

    def pick(self, logits: Any, temperature: float, top_p: float, generator: Any, remaining: int) -> int:
        """The next token: the model's own choice (sampled or greedy) among the tokens the JSON allows."""
        from dlnotes.llm.sampling import sample

        logits = logits.clone()  # (V,)
        for _ in range(TRIES):  # usually the model's first choice is valid
            token = sample(logits, temperature, top_p, generator)
            if (state := self.accepts(token, remaining)) is not None:
                self.state = state
                return token
            logits[token] = float("-inf")
        logits[~self.allowed(remaining)] = float("-inf")
        token = sample(logits, temperature, top_p, generator)
        state = self.accepts(token, remaining)
        if state is None:  # only if the vocabulary cannot spell the completion (no single-byte tokens)
            raise RuntimeError("no token of this vocabulary can continue the JSON")
        self.state = state
        return token

    def allowed(self, remaining: int) -> Any:
        """(V,) bool: every token valid now. Inside a free string every plain token is (when there is room for
        more than the closing quote), so only the others are checked; elsewhere only tokens whose first byte
        the matcher accepts are, and the states after each prefix are shared (most tokens fail on the same
        first two bytes, e.g. a space and a letter where a value must start)."""
        import torch

        vocab = self.vocab
        if all(stack and stack[-1] == ("s", 0) for stack in self.state):
            mask = vocab.plain.clone() if min_len(self.state) <= remaining - 1 else torch.zeros_like(vocab.plain)
            candidates = vocab.tricky
        else:
            mask = torch.zeros_like(vocab.plain)
            starts = torch.tensor([bool(feed(self.state, bytes([b]))) for b in range(256)] + [False])
            candidates = starts[vocab.first].nonzero().flatten().tolist()
        after: dict[bytes, Any] = {b"": self.state}  # prefix -> the state after it, () when refused
        for token in candidates:
            data = vocab.tokens[token]
            state = self.state
            for k in range(1, len(data) + 1):
                state = after.get(data[:k])
                if state is None:
                    state = after[data[:k]] = feed(after[data[:k - 1]], data[k - 1:k])
                if not state:
                    break
            if state and (finished(state) or min_len(state) <= remaining - 1):
                mask[token] = True
        return mask
