"""MkDocs hook: the pages that are generated, never typed.

* ``<!-- cli-reference -->``: the command-line reference, written from the parser at build time,
  so it cannot disagree with `metavae --help`.
* ``<!-- results: PATH -->``: a report that `metavae report` wrote under ``results/`` (PATH, from
  the repository root), pasted in with its figures, so the site shows exactly the committed files.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
CLI = "<!-- cli-reference -->"
RESULTS = re.compile(r"<!-- results: (\S+) -->")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)/]+\.png)\)")
ASSETS = "assets/results"  # where the reports' figures are served from


def _section(name: str, parser: argparse.ArgumentParser) -> str:
    parser.prog = name
    return f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"


def cli_reference() -> str:
    from metavae.cli import _parser

    top, _ = _parser()
    sections = [_section("metavae", top)]
    for action in top._subparsers._group_actions:  # the subcommands, in the parser's order
        for name, sub in action.choices.items():
            sections.append(_section(f"metavae {name}", sub))
    return "\n".join(sections)


def _results_page(match: re.Match, page) -> str:
    path = ROOT / match.group(1)
    text = path.read_text()
    text = re.sub(r"^# .*\n", "", text, count=1)  # the page has its own title
    depth = "../" * page.file.src_uri.count("/")
    rel = path.parent.relative_to(ROOT / "results").as_posix()
    return IMAGE.sub(lambda m: f"![{m.group(1)}]({depth}{ASSETS}/{rel}/{m.group(2)})", text)


def on_files(files, config):
    """Serve every figure under results/ at assets/results/..., for the pasted reports."""
    for png in sorted((ROOT / "results").rglob("*.png")):
        rel = png.relative_to(ROOT / "results").as_posix()
        files.append(File.generated(config, f"{ASSETS}/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = markdown.replace(CLI, cli_reference()) if CLI in markdown else markdown
    return RESULTS.sub(lambda m: _results_page(m, page), markdown)
