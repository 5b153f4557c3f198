"""The cookbook's own text as a corpus: chunks with stable ids, its version, and a saved index of it.

What the `rag` recipe and `dlnotes ask` retrieve from: every recipe's card (title, tags, target, flags with
their help) and notes, read through the catalog; README.md; data/README.md and each data/*/README.md.

    chunk id    file#anchor[.n]: "readme#interrupting-and-resuming.2", "recipe/cnn-mnist#card",
                "data/rotten-tomatoes#source-and-license", "readme#measured/test-suite"

The anchor is the nearest heading, table row (named by its first cell) or paragraph with a bold lead; the
paragraphs under one anchor are packed into pieces of at most `max_words` words, numbered .2, .3, ... So an
id depends only on its own part of the file: a section added elsewhere changes no other id. The corpus
version is a hash of every id and text; a saved index carries it (and the encoder's name), so vectors are
never matched with texts they were not computed from.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dlnotes.errors import DataError, UserError


@dataclass(frozen=True)
class Chunk:
    id: str  # file + anchor (+ .n): survives edits elsewhere in the file
    text: str  # "where > heading" then the passage: both retrievers and the prompt read the same text


def slug(text: str) -> str:
    """'Interrupting and **resuming**' -> 'interrupting-and-resuming': GitHub's anchors, roughly; a link counts by
    its text, and long headings are cut after whole words."""
    parts, kept = re.findall(r"[^\W_]+", re.sub(r"\]\([^)]*\)", "", text).lower()), []
    for word in parts:
        if kept and len("-".join([*kept, word])) > 40:
            break
        kept.append(word)
    return "-".join(kept) or "x"


def markdown_chunks(source: str, title: str, text: str, max_words: int, anchor: str = "top") -> list[Chunk]:
    """Split a Markdown text at headings, table rows and bold-lead paragraphs; pack the rest into pieces."""
    chunks, seen, piece = [], Counter(), []
    section, heading = anchor, ""

    def flush() -> None:
        if piece:
            seen[section] += 1
            n = seen[section]
            where = f"{title} > {heading}" if heading else title
            chunks.append(Chunk(f"{source}#{section}" + (f".{n}" if n > 1 else ""), f"{where}\n" + "\n\n".join(piece)))
            piece.clear()

    for block in _blocks(text):
        if block.startswith("#"):
            flush()
            heading = block.lstrip("#").strip()
            section = anchor = slug(heading)
        elif block.startswith("|") and "\n" in block:  # a table: one chunk per row, named by its first cell
            flush()
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
            for row in rows[2:]:
                section = f"{anchor}/{slug(row[0])}"
                piece.append("; ".join(f"{h}: {c}" for h, c in zip(rows[0], row) if c))
                flush()
            section = anchor
        else:
            if lead := re.match(r"\*\*([^*]{2,60})\*\*", block):  # **lstm-forecast.** starts a new anchor
                flush()
                section = f"{anchor}/{slug(lead.group(1))}"
            for part in _pieces(block, max_words):
                if piece and _words(piece) + len(part.split()) > max_words:
                    flush()
                piece.append(part)
    flush()
    return chunks


def _blocks(text: str) -> list[str]:
    """Paragraphs (a code fence stays whole; a heading is a block of its own)."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and (not line.strip() or line.startswith("#")):
            if current:
                blocks.append("\n".join(current))
            current = [line] if line.strip() else []
            if line.startswith("#"):
                blocks.append(line)
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _pieces(block: str, max_words: int) -> list[str]:
    """A block longer than max_words, cut between lines of code, between list items, or at sentence ends."""
    if len(block.split()) <= max_words:
        return [block]
    if block.startswith(("```", "    ")):
        units, glue = block.splitlines(), "\n"
    elif block.startswith(("- ", "* ")):
        units, glue = re.split(r"\n(?=[-*] )", block), "\n"
    else:
        units, glue = re.split(r"(?<=[.;:])\s+", block), " "
    pieces, current = [], []
    for unit in units:
        if current and len(glue.join(current).split()) + len(unit.split()) > max_words:
            pieces.append(glue.join(current))
            current = []
        current.append(unit)
    return pieces + [glue.join(current)]


def _words(piece: list[str]) -> int:
    return sum(len(p.split()) for p in piece)


def lessons(max_words: int, recipes: dict | None = None, readme: str | None = None,
            data_folder: Path | None = None) -> list[Chunk]:
    """Every chunk of the cookbook: each recipe's card (title, tags, flags) and notes, README, data READMEs."""
    from dlnotes import catalog, datasets

    chunks = []
    for info in (catalog.all_recipes() if recipes is None else recipes).values():
        flags = "\n".join(f"{f.flag} (default {f.default!r}): {f.help}" for f in info.fields)
        card = (f"tags: {', '.join(info.tags)}; dataset: {info.dataset}; target: {info.target or 'none'}\n\n"
                f"`dlnotes run {info.id}` flags:\n\n{flags}")
        title = f"recipe {info.id}: {info.title}"
        chunks += markdown_chunks(f"recipe/{info.id}", title, card, max_words, anchor="card")
        chunks += markdown_chunks(f"recipe/{info.id}", title, info.notes, max_words, anchor="notes")
    chunks += markdown_chunks("readme", "README", readme_text() if readme is None else readme, max_words)
    folder = datasets.data_root() if data_folder is None else data_folder
    for path in sorted(folder.glob("*/README.md")) + [folder / "README.md"]:
        # the rag questions' own README describes them in their words: a page that answers none of them
        # but would be retrieved for many is left out
        if path.is_file() and path.parent.name != "rag-questions":
            name = "data" if path.parent == folder else f"data/{path.parent.name}"
            chunks += markdown_chunks(name, name, path.read_text(encoding="utf-8"), max_words)
    return chunks


def readme_text() -> str:
    """README.md of the checkout, or the one inside an installed wheel's metadata."""
    import importlib.metadata

    checkout = Path(__file__).resolve().parents[2] / "README.md"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    try:
        return importlib.metadata.metadata("dlnotes").get_payload() or ""
    except importlib.metadata.PackageNotFoundError:
        return ""


def corpus_version(chunks: list[Chunk]) -> str:
    """A hash of every chunk id and text: any edit to the lessons gives a new version."""
    return hashlib.sha256(json.dumps([[c.id, c.text] for c in chunks]).encode()).hexdigest()[:16]


# --- the index: embeddings saved with the corpus version they belong to -------------------------------------


def load_index(path: Path, version: str, encoder_name: str, refuse: bool):
    """The (N, D) chunk embeddings saved at `path`, if they belong to this corpus version and encoder. Another
    version: refused (refuse=True, an index the user named) or None (a cache: the caller rebuilds it)."""
    import torch

    if not path.is_file():
        if refuse:
            raise UserError(f"--index {path} does not exist (give a rag run directory or its index.pt).")
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        have = (saved["corpus_version"], saved["encoder"])
        embeddings = saved["embeddings"]
    except Exception as err:  # a truncated file, another format, pickled code (weights_only refuses it)
        if refuse:
            raise UserError(f"{path} is not a rag index ({type(err).__name__}).") from None
        return None
    if have != (version, encoder_name):
        if refuse:
            raise UserError(f"{path} indexes corpus version {have[0]} ({have[1]}), but the lessons are now "
                            f"{version} ({encoder_name}): rebuild it with `dlnotes run rag`, or leave out --index.")
        return None
    return embeddings


def save_index(path: Path, embeddings, version: str, encoder_name: str, ids: list[str]) -> None:
    """Written whole or not at all (two `dlnotes ask` at once may both rebuild the cache)."""
    import torch

    from dlnotes.durable import write_durably

    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"corpus_version": version, "encoder": encoder_name, "ids": ids, "embeddings": embeddings}
    write_durably(path, lambda file: torch.save(saved, file))


def recipes_of(chunks: list[Chunk]) -> list[str]:
    """The recipes a list of chunks comes from or names."""
    from dlnotes import catalog

    ids = set(catalog.all_recipes())
    found = {c.id.split("#")[0].removeprefix("recipe/") for c in chunks if c.id.startswith("recipe/")}
    found |= {w for c in chunks for w in re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", c.text) if w in ids}
    return sorted(found)


def load_questions(chunks: list[Chunk], limit: int = 0) -> list[dict]:
    """data/rag-questions/questions.jsonl: {"id", "lang", "question", "gold": [chunk ids]} per line."""
    from dlnotes.datasets import data_root  # here: datasets imports numpy, needed only when questions are read
    path = data_root() / "rag-questions" / "questions.jsonl"
    try:
        questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not all(q["question"] and q["gold"] and q["lang"] in ("en", "zh") for q in questions):
            raise ValueError("every line needs a question, gold ids and lang en or zh")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"Cannot read {path}: {type(err).__name__} {err}") from None
    known = {c.id for c in chunks}
    for q in questions:
        missing = [g for g in q["gold"] if g not in known]
        if missing:  # a heading was renamed: the question still counts, on the ids that remain
            print(f"note: {q['id']}: gold chunk {', '.join(missing)} is not in the corpus any more")
    if limit:  # the first `limit` of each language
        questions = [q for lang in ("en", "zh") for q in [q for q in questions if q["lang"] == lang][:limit]]
    return questions
