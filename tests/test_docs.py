"""The manual stays whole: every page in docs/ is in mkdocs.yml's nav and back, the README is short and its links
lead somewhere, and the generated results page is what benchmarks/results/ makes of it now.

Fast on purpose (no mkdocs import, no YAML parser: the nav is read as text); bin/test runs `mkdocs build --strict`,
which checks every link and anchor inside the manual.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _nav_pages() -> list[str]:
    """The pages named in mkdocs.yml's nav (`- Title: page.md` or `- page.md`, nested or not)."""
    lines = (ROOT / "mkdocs.yml").read_text().splitlines()
    start = lines.index("nav:")
    pages = []
    for line in lines[start + 1:]:
        if line and not line.startswith((" ", "-", "#")):
            break  # the next top-level key
        found = re.match(r"\s*-\s+(?:[^:]+:\s+)?(\S+\.md)\s*$", line)
        if found:
            pages.append(found.group(1))
    return pages


def _results_page():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    nav = _nav_pages()
    assert len(nav) == len(set(nav)), f"a page is in mkdocs.yml's nav twice: {nav}"
    assert sorted(nav) == pages, (f"in docs/ but not in mkdocs.yml's nav: {sorted(set(pages) - set(nav))}; "
                                  f"in the nav but not in docs/: {sorted(set(nav) - set(pages))}")


def test_the_readme_is_short_and_its_relative_links_lead_to_files():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "README.md is the front page: the rest belongs in docs/"
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    broken = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a web address or an anchor of the README itself
        target = ROOT / unquote(link.split("#", 1)[0])
        if not target.exists():
            broken.append(link)
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_the_readme_anchors_into_the_docs_exist():
    """GitHub shows docs/*.md as they are: an anchor the README names must be one of the page's headings."""
    for link in re.findall(r"\]\((docs/[^)#\s]+\.md)#([^)\s]+)\)", README.read_text()):
        page, anchor = link
        headings = re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), flags=re.M)
        slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}
        assert anchor in slugs, f"README.md links to {page}#{anchor}, a heading {page} does not have"


def test_the_results_page_is_what_the_results_make_now():
    results_page = _results_page()
    assert (DOCS / "benchmarks.md").read_text() == results_page.render(), (
        "docs/benchmarks.md is stale: run .venv/bin/python benchmarks/results_page.py and commit it")


def test_the_results_page_lists_every_result_with_its_machine_and_table(tmp_path):
    results_page = _results_page()
    results = tmp_path / "results"
    results.mkdir()
    (results / "encode-x-cpu-2031-01-02.json").write_text(
        '{"benchmark": "encode", "date": "2031-01-02T03:04:05Z", "pipeline_over_bare": 0.9512345678,'
        ' "machine": {"cpu": "Some CPU", "cpu_identity": "Some CPU (family 1 model 2; avx2)", "cpu_cores": 4},'
        ' "runs": [{"run": "a", "dice": 0.5}, {"run": "b", "dice": 0.75}]}')
    (results / "engines-y-cpu-2031-01-03.json").write_text('{"benchmark": "engines", "machine": "a 2-core CPU"}')
    (results / "engines-y-cpu-2031-01-03.md").write_text("| engine | s/slice |\n| --- | --- |\n| torch | 1.0 |\n")
    page = results_page.render(results)
    assert "### encode-x-cpu-2031-01-02" in page and "### engines-y-cpu-2031-01-03" in page
    assert "Some CPU (family 1 model 2; avx2), 4 cores" in page and "a 2-core CPU" in page
    assert "| torch | 1.0 |" in page  # the table beside the JSON, as saved
    assert "| `pipeline_over_bare` | 0.9512 |" in page  # else the JSON's own figures
    assert "| a | 0.5 |" in page and "| b | 0.75 |" in page
    assert "2031-01-03" in page  # a date from the file's name where the JSON has none
    out = tmp_path / "docs" / "benchmarks.md"
    assert results_page.main(["--results", str(results), "--out", str(out), "--check"]) == 1
    assert results_page.main(["--results", str(results), "--out", str(out)]) == 0
    assert results_page.main(["--results", str(results), "--out", str(out), "--check"]) == 0


def _synopsis() -> dict[str, list[tuple[str, str | None]]]:
    """docs/commands.md's synopsis: each command → the ``--flag [VALUE]`` pairs its lines show."""
    text = (DOCS / "commands.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    shown: dict[str, list] = {}
    command = None
    for line in block.splitlines():
        words = line.split()
        if words[:1] == ["embedcache"]:
            command = words[1]
        elif words[:1] == ["torchrun"]:
            command = None
        if command is None:
            continue
        for flag, value in re.findall(r"(--[a-z][\w-]*(?:/--[\w-]+)?)(?:[ =]([^\s\]|)]+(?:\|[^\s\]|)]+)*))?", line):
            shown.setdefault(command, []).append((flag, value or None))
    return shown


def test_the_command_synopsis_shows_the_flags_defaults_and_choices_the_commands_have():
    """The synopsis is the manual's one copy of the options: every flag it shows is one the command takes, a default
    it shows is the command's, and a list a|b|c is the option's choices."""
    import click

    from embedcache.cli import main

    wrong = []
    for command, pairs in _synopsis().items():
        params = {opt: p for p in main.commands[command].params if isinstance(p, click.Option)
                  for opt in (*p.opts, *p.secondary_opts)}
        for flag, value in pairs:
            first = flag.split("/")[0]
            option = params.get(first)
            if option is None or option.hidden:
                wrong.append(f"{command} {flag}: no such option")
                continue
            if value is None or value.isupper() or value.startswith("-"):
                continue
            if "|" in value:
                if isinstance(option.type, click.Choice) and set(value.split("|")) != set(option.type.choices):
                    wrong.append(f"{command} {first} {value}: the choices are {'|'.join(option.type.choices)}")
            elif re.fullmatch(r"\d[\d.e+-]*", value) and option.default is not None:
                if float(value) != float(option.default):
                    wrong.append(f"{command} {first} {value}: the default is {option.default}")
    assert not wrong, "\n".join(wrong)
