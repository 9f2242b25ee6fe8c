"""Write the README's Performance tables from the benches' results: the text between the markers
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` becomes `tables.bench_markdown` of
bench/results/NAME/bench.json (`instaflow-edge bench`), or bench/results/NAME.md where a bench
script writes its own Markdown (bench/export_cost.py), so that the README's numbers are generated,
never typed.

Usage: python bench/readme_table.py [NAME ...]   (default: every NAME the README marks)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from instaflow_edge.atomic import atomic_file
from instaflow_edge.tables import bench_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
MARKED = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n).*?(<!-- /bench:(?P=name) -->)", re.S)


def section(name: str) -> str:
    """The Markdown that belongs between the markers of `name`."""
    own = RESULTS / f"{name}.md"
    if own.is_file():
        return own.read_text()
    result = json.loads((RESULTS / name / "bench.json").read_text())
    return bench_markdown(result, result["command"])


def render(readme: str, names: list[str] | None = None) -> str:
    """`readme` with the marked sections of `names` (None: all of them) generated again."""

    def replace(match: re.Match) -> str:
        if names is not None and match["name"] not in names:
            return match[0]
        return match[1] + section(match["name"]) + match[3]

    return MARKED.sub(replace, readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bench results to put in (default: all marked)")
    args = parser.parse_args()
    text = render(README.read_text(), args.names or None)
    with atomic_file(README) as staging:
        staging.write_text(text)


if __name__ == "__main__":
    main()
