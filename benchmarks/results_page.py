"""Writes docs/benchmarks.md from benchmarks/results/: every result file, its benchmark, date, machine and table.

The page is generated so that it cannot drift from the results: each ``*.json`` under ``benchmarks/results/``
(and any ``*.md`` without one) becomes one entry, with the ``.md`` table saved beside the JSON where there is
one, else a compact rendering of the JSON's figures. ``--check`` writes nothing and exits 1 when the page
differs from what it would generate now; ``bin/test`` runs it, and ``tests/test_docs.py`` checks the same.

    .venv/bin/python benchmarks/results_page.py           # after adding a result: regenerate the page
    .venv/bin/python benchmarks/results_page.py --check   # is docs/benchmarks.md current?

Standard library only (it runs before anything heavy is imported).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

#: Top-level keys shown in an entry's header, not among its figures.
HEADER_KEYS = ("benchmark", "machine", "date")
#: Top-level keys whose text is prose about the run, shown as a paragraph.
PROSE_KEYS = ("what", "note")
#: Nesting below which a generic JSON's objects are summarised as "N entries" rather than listed.
MAX_DEPTH = 4
#: An object of more objects than this (one per case, say) is summarised as "N entries".
MAX_RECORDS = 4
#: A list of numbers longer than this is summarised as "N values".
MAX_LIST = 8


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _number(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if len(text) <= 8 else format(value, ".4g")
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_stat(value) -> bool:
    return isinstance(value, dict) and {"mean", "sd", "n"} <= value.keys()


def _stat(value: dict) -> str:
    def fixed(x):
        return f"{x:.4f}" if isinstance(x, float) else _number(x)
    return f"{fixed(value['mean'])} ± {fixed(value['sd'])} ({value['n']})"


def _stat_leaves(value, keys=()):
    """[(keys, stat)] when every leaf of ``value`` is a {mean, sd, n} summary at the same depth, else None."""
    if _is_stat(value):
        return [(keys, value)]
    if not isinstance(value, dict) or not value:
        return None
    found = []
    for key, item in value.items():
        below = _stat_leaves(item, keys + (str(key),))
        if below is None:
            return None
        found += below
    return found if len({len(k) for k, _ in found}) == 1 and len(found[0][0]) >= 2 else None


def _stat_table(leaves) -> str:
    """A score summary (… → metric → {mean, sd, n}) as one table: a row per path, a column per metric."""
    metrics = list(dict.fromkeys(keys[-1] for keys, _ in leaves))
    rows: dict[tuple, dict] = {}
    for keys, stat in leaves:
        rows.setdefault(keys[:-1], {})[keys[-1]] = _stat(stat)
    lines = ["| " + " | ".join(["—"] + [f"{_cell(m)}: mean ± sd (n)" for m in metrics]) + " |",
             "| " + " | ".join(["---"] * (len(metrics) + 1)) + " |"]
    for path, cells in rows.items():
        lines.append("| " + " | ".join([_cell(" · ".join(path))] + [_cell(cells.get(m, "")) for m in metrics]) + " |")
    return "\n".join(lines)


def _flat(value) -> bool:
    return _scalar(value) or (isinstance(value, list) and len(value) <= MAX_LIST and all(_scalar(v) for v in value))


def _records_table(items: list[dict]) -> str:
    """A list of records (one per run, say) as one table: a row per record, a column per plain field."""
    columns = list(dict.fromkeys(k for item in items for k, v in item.items() if _flat(v)))
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "| " + " | ".join(["---"] * len(columns)) + " |"]
    for item in items:
        cells = []
        for column in columns:
            value = item.get(column, "")
            cells.append(", ".join(_number(v) for v in value) if isinstance(value, list) else _number(value))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _list_name(item: dict, index: int) -> str:
    for key in ("run", "name", "backbone", "engine"):
        if isinstance(item.get(key), str):
            return item[key]
    return str(index)


def _walk(value, path: str, depth: int, rows: list, tables: list) -> None:
    """Scalar figures into ``rows`` as (key path, text); score summaries into ``tables`` as (key path, table)."""
    leaves = _stat_leaves(value) if isinstance(value, dict) else None
    if _is_stat(value):
        rows.append((path, _stat(value)))
    elif leaves:
        tables.append((path, _stat_table(leaves)))
    elif isinstance(value, dict):
        if not value:
            rows.append((path, "—"))
        elif depth > MAX_DEPTH or (len(value) > MAX_RECORDS and all(isinstance(v, dict) for v in value.values())):
            rows.append((path, f"{len(value)} entries (see the JSON)"))
        else:
            for key, item in value.items():
                _walk(item, f"{path}.{key}" if path else str(key), depth + 1, rows, tables)
    elif isinstance(value, list):
        if all(_scalar(v) for v in value) and len(value) <= MAX_LIST:
            rows.append((path, ", ".join(_number(v) for v in value) or "—"))
        elif all(isinstance(v, list) and all(_scalar(x) for x in v) for v in value) and sum(map(len, value)) <= MAX_LIST:
            rows.append((path, "; ".join(", ".join(_number(x) for x in v) for v in value)))
        elif all(isinstance(v, dict) for v in value) and depth < MAX_DEPTH:
            tables.append((path, _records_table(value)))
            for index, item in enumerate(value):
                nested = {k: v for k, v in item.items() if not _flat(v)}
                _walk(nested, f"{path}[{_list_name(item, index)}]", depth + 1, [], tables)
        else:
            rows.append((path, f"{len(value)} values (see the JSON)"))
    else:
        rows.append((path, _number(value)))


def render_json(data: dict) -> str:
    """A compact rendering of a result JSON's figures, for a result with no table beside it."""
    prose = [str(data[k]) for k in PROSE_KEYS if isinstance(data.get(k), str)]
    rows: list = []
    tables: list = []
    for key, value in data.items():
        if key in HEADER_KEYS or (key in PROSE_KEYS and isinstance(value, str)):
            continue
        _walk(value, key, 1, rows, tables)
    parts = list(prose)
    if rows:
        parts.append("\n".join(["| figure | value |", "| --- | --- |"]
                               + [f"| `{_cell(path)}` | {_cell(text)} |" for path, text in rows]))
    for path, table in tables:
        what = "mean ± sd (cases)" if "mean ± sd" in table else "one row each"
        parts.append(f"`{path}`, {what}:\n\n{table}")
    return "\n\n".join(parts)


def machine_text(machine, short: bool = False) -> str:
    """The machine a result records: its CPU (the identity, family, model and flags, where recorded), cores, GPU."""
    if machine is None:
        return "not recorded"
    if isinstance(machine, str):
        return machine
    parts = [machine.get("cpu_identity") or machine.get("cpu") or "CPU not recorded"]
    if machine.get("cpu_cores"):
        parts.append(f"{machine['cpu_cores']} cores")
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']}")
    if short:
        return ", ".join(parts)
    if machine.get("device"):
        parts.append(f"device {machine['device']}")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    return ", ".join(parts)


def _date_from_name(stem: str) -> str:
    found = re.search(r"\d{4}-\d{2}-\d{2}", stem)
    return found.group(0) if found else "not recorded"


def _demote(markdown: str) -> str:
    """A result table's own headings sit below the entry's heading (level 4 and lower)."""
    return re.sub(r"^(#{1,3}) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", markdown, flags=re.M)


def entries(results: Path) -> list[dict]:
    stems = sorted({p.stem for p in results.glob("*.json")} | {p.stem for p in results.glob("*.md")})
    found = []
    for stem in stems:
        json_path, md_path = results / f"{stem}.json", results / f"{stem}.md"
        data = json.loads(json_path.read_text()) if json_path.exists() else {}
        if not isinstance(data, dict):
            data = {"figures": data}
        found.append({
            "stem": stem,
            "files": [p.name for p in (json_path, md_path) if p.exists()],
            "benchmark": str(data.get("benchmark") or stem.split("-")[0]),
            "date": str(data.get("date") or _date_from_name(stem)),
            "machine": machine_text(data.get("machine")),
            "machine_short": machine_text(data.get("machine"), short=True),
            "body": md_path.read_text().strip() if md_path.exists() else render_json(data),
            "from_table": md_path.exists(),
        })
    return found


def render(results: Path = RESULTS) -> str:
    found = entries(results)
    benchmarks = sorted({e["benchmark"] for e in found})
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by benchmarks/results_page.py from benchmarks/results/: do not edit by hand.",
        "     After adding a result, run: .venv/bin/python benchmarks/results_page.py -->",
        "",
        "Every result file under `benchmarks/results/`, generated from the files themselves, so nothing here",
        "is typed twice: a result added without regenerating this page fails `bin/test`. How the figures are",
        "made and how to read them (what each ratio means, which machine was quiet, what is not yet measured)",
        "is in [Running and reading the benchmarks](benchmarks-guide.md). Each entry gives the benchmark, the",
        "date and the machine the JSON records, then the markdown table saved beside the JSON where there is",
        "one, else the JSON's own figures.",
        "",
        f"{len(found)} result files, {len(benchmarks)} benchmarks, newest first within each benchmark:",
        "",
        "| result | benchmark | date | machine |",
        "| --- | --- | --- | --- |",
    ]
    ordered = [e for b in benchmarks for e in sorted((e for e in found if e["benchmark"] == b),
                                                     key=lambda e: (e["date"], e["stem"]), reverse=True)]
    for e in ordered:
        lines.append(f"| [{e['stem']}](#{e['stem'].lower()}) | {_cell(e['benchmark'])} | {_cell(e['date'])} "
                     f"| {_cell(e['machine_short'])} |")
    for benchmark in benchmarks:
        lines += ["", f"## {benchmark}"]
        for e in (e for e in ordered if e["benchmark"] == benchmark):
            files = " + ".join(f"`{name}`" for name in e["files"])
            source = "the table saved beside it" if e["from_table"] else "the JSON's figures (no table saved beside it)"
            lines += [
                "",
                f"### {e['stem']}",
                "",
                f"- **files**: {files} in `benchmarks/results/`",
                f"- **benchmark**: {e['benchmark']}",
                f"- **date**: {e['date']}",
                f"- **machine**: {e['machine']}",
                f"- **below**: {source}",
                "",
                _demote(e["body"]),
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is not current")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what benchmarks/results_page.py generates from {args.results}: "
                  "run .venv/bin/python benchmarks/results_page.py and commit the page", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(entries(args.results))} result files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
