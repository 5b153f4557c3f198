"""Put a `dlnotes bench` result into README.md: the table between the bench markers is replaced by the one in
BENCH_DIR/bench.md, under a line that says how it was made.

    dlnotes bench cnn-mnist dqn seq2seq --repeat 3 --device cpu
    python scripts/readme_bench.py runs/bench/<stamp> [--note "quiet machine"]

Only the text between `<!-- bench:begin -->` and `<!-- bench:end -->` changes, so the prose around it (what the
ratios mean, what another CPU would do) stays the author's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def section(folder: Path, note: str = "") -> str:
    """The generated block: how it was made, then bench.md as the bench wrote it."""
    report = json.loads((folder / "bench.json").read_text())
    ids = list(dict.fromkeys(row["recipe"] for row in report["recipes"]))
    device = report["machine"]["device"]
    command = f"dlnotes bench {' '.join(ids)} --repeat {report['repeat']} --device {device}"
    when = folder.name[:8]
    when = f"{when[:4]}-{when[4:6]}-{when[6:]}" if when.isdigit() else folder.name
    header = f"`{command}`, {when}" + (f" ({note})" if note else "") + ":"
    return f"{BEGIN}\n{header}\n\n{(folder / 'bench.md').read_text().strip()}\n{END}"


def replace_section(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    return head + block + rest.split(END, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a bench folder: runs/bench/<stamp> with bench.json and bench.md")
    parser.add_argument("--note", default="", help="said after the date, e.g. 'quiet machine' or 'under load'")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args()
    try:
        block = section(args.folder, args.note)
        args.readme.write_text(replace_section(args.readme.read_text(), block))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.readme}: bench section from {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
