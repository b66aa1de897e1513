"""The README and docs/ stay true to the code: every relative link (and #anchor) resolves, and every flag
written on a command line of one of this package's tools is an option that tool has."""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line) for line in text.splitlines() if line.startswith("#")}


def tools() -> dict[str, set[str]]:
    """{console script: every option string of its parser and of its subcommands' parsers}."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for name, target in scripts.items():
        module = importlib.import_module(target.split(":")[0])
        builders = [getattr(module, b) for b in ("build_tool_parser", "build_parser") if hasattr(module, b)]
        assert builders, f"{name}: {module.__name__} has no build_parser() for --help and this check"
        options: set[str] = set()
        stack = [builders[0]()]
        while stack:
            parser = stack.pop()
            for action in parser._actions:
                options.update(action.option_strings)
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
        out[name] = options
    if "bgevl-bench" in out:  # `bgevl-bench corpus ...` and `bgevl-bench profile ...` are dispatched to their own parsers
        from bgevl.benchmarks import corpus, profile

        for sub in (corpus, profile):
            out["bgevl-bench"] |= {o for a in sub.build_parser()._actions for o in a.option_strings}
    return out


def command_lines(text: str) -> list[str]:
    """Code (fenced blocks line by line, with backslash continuations joined, and inline spans)."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += SPAN.findall(FENCE.sub("", text))
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: {broken}"


def test_every_flag_on_a_command_line_of_ours_exists():
    known = tools()
    unknown = []
    for page in PAGES:
        for line in command_lines(page.read_text()):
            for segment in re.split(r"\||&&|;|\$\(|#\s", line):  # one command per segment, comments dropped
                words = segment.split()
                starts = [i for i, w in enumerate(words) if Path(w).name in known]
                if not starts:
                    continue
                tool = Path(words[starts[0]]).name
                for flag in FLAG.findall(" ".join(words[starts[0] + 1:])):
                    if flag not in known[tool]:
                        unknown.append(f"{page.relative_to(ROOT)}: {tool} {flag}")
    assert not unknown, "flags the tools do not have:\n" + "\n".join(sorted(set(unknown)))


def test_the_check_catches_what_it_should(tmp_path):
    known = tools()
    assert {"--model", "--triton-repo", "--repository-uri", "--workspace-gb"} <= known["bgevl-export"]
    assert not {"--no-such-flag"} & known["bgevl-export"]
    assert slug("## Deployment beyond one machine: Kubernetes, object storage, perf_analyzer") == \
        "deployment-beyond-one-machine-kubernetes-object-storage-perf_analyzer"
