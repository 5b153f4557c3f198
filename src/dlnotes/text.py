"""Text plumbing shared by the text recipes: tokenizers, a vocabulary built from training text, detokenizing.

    word_tokens("Don't panic!")       -> ["don't", "panic", "!"]      (lower-cased unless lower=False)
    char_tokens("这个 东西很赞")        -> ["这", "个", "东", "西", "很", "赞"]   (no segmenter needed)
    vocab = Vocab.build(token_lists, min_count=2, specials=("<pad>", "<unk>"))
    vocab.encode(["panic", "zyzzyva"]) -> [57, 1]                      (unknown tokens -> <unk>)
    Vocab(vocab.tokens)                                                (a plain list: what checkpoints keep)
    corpus_bleu([["Sea", "la", "luz", "."]], ["Sea la luz."]) -> 100.0  (sacreBLEU on detokenized output)

Standard library only at import (corpus_bleu imports sacrebleu when called): importing this module does
not import torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# A word is a run of letters/digits, keeping inner apostrophes ("don't", "l'homme"); every other
# non-space character (punctuation, emoji) is a token of its own. \w is Unicode-aware: "crió" is one word.
WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}»%])")
NO_SPACE_AFTER = re.compile(r"([(\[{«¿¡]) ")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


def word_tokens(text: str, lower: bool = True) -> list[str]:
    """Word and punctuation tokens of English or Spanish text."""
    return WORD_RE.findall(text.lower() if lower else text)


def char_tokens(text: str) -> list[str]:
    """Every non-space character is a token: the usual way to read Chinese without a word segmenter."""
    return [c for c in text.lower() if not c.isspace()]


def detokenize(tokens: Iterable[str]) -> str:
    """Join word tokens into text: no space before closing punctuation, none after opening marks (¿ ¡ ()."""
    text = " ".join(tokens)
    return NO_SPACE_AFTER.sub(r"\1", NO_SPACE_BEFORE.sub(r"\1", text))


def corpus_bleu(hypotheses: list[list[str]], references: list[str]) -> float:
    """sacreBLEU (13a tokenization, cased) of detokenized outputs against the raw reference sentences, as
    translation papers report it: the references are not tokenized by us."""
    import sacrebleu  # only the translation recipes need it

    return sacrebleu.corpus_bleu([detokenize(h) for h in hypotheses], [references]).score


class Vocab:
    """Token <-> id. Built from the training split only, so held-out text can contain unknown tokens:
    they all map to `<unk>`, which must therefore be one of the tokens."""

    def __init__(self, tokens: list[str]) -> None:
        if UNK not in tokens:
            raise ValueError(f"a vocabulary needs the {UNK} token")
        self.tokens = list(tokens)
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("a vocabulary lists each token once")
        self.unk_id = self.ids[UNK]

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_count: int = 1, max_size: int = 0,
              specials: tuple[str, ...] = (PAD, UNK)) -> Vocab:
        """Specials first (so <pad> is id 0), then tokens seen at least `min_count` times, most frequent
        first (ties alphabetically, so a rebuild gives the same ids); `max_size` > 0 caps the total."""
        counts = Counter(token for tokens in token_lists for token in tokens)
        kept = sorted((t for t, n in counts.items() if n >= min_count and t not in specials),
                      key=lambda t: (-counts[t], t))
        tokens = list(specials) + kept
        return cls(tokens[:max_size] if max_size > 0 else tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.ids

    def __getitem__(self, token: str) -> int:
        return self.ids.get(token, self.unk_id)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.ids.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]
