"""The documentation says only what the code does: every `busi-monai COMMAND --flag` quoted in the
user-facing pages is an option of that command (read from the CLI's own parser, no process
started), every relative link and image resolves (its #section too), and every file the pages
cite under benchmarks/ exists."""

from __future__ import annotations

import argparse
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pages() -> list[Path]:
    pages = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "apps" / "busi" / "README.md"]
    return [p for p in pages if p.is_file()] + sorted((REPO / "docs").glob("*.md"))


PAGES = _pages()
IDS = [str(p.relative_to(REPO)) for p in PAGES]

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
ASSIGN = re.compile(r"""^\s*(?:export\s+)?([A-Za-z_]\w*)=("[^"]*"|'[^']*'|\S*)""", re.M | re.S)
# Where a command on a shell line ends: separators, a comment, a subshell's close.
SHELL_END = re.compile(r"\s(?:;|&&|\|\|?|&|#)|;|\)|$")


@lru_cache(maxsize=1)
def cli_options() -> dict[str, set[str]]:
    from busi_monai.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in sp._actions for o in a.option_strings} for name, sp in sub.choices.items()}


def split_code(text: str) -> tuple[list[str], list[str], str]:
    """(fenced blocks, inline code spans, prose with both removed)."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    rest = FENCE.sub("\n", text)
    # Indented code blocks (4 spaces after a blank line) count as blocks too.
    indented = re.findall(r"(?:(?<=\n\n)|^)((?:(?: {4}|\t)[^\n]*\n?)+)", rest)
    blocks += indented
    for b in indented:
        rest = rest.replace(b, "\n", 1)
    spans = [m.group(2) for m in INLINE.finditer(rest)]
    prose = INLINE.sub(" ", rest)
    return blocks, spans, prose


def quoted_commands(text: str) -> list[tuple[str, str]]:
    """(subcommand, the words that follow it) for every `busi-monai SUBCOMMAND ...` (or
    `python -m busi_monai.cli SUBCOMMAND ...`) in code."""
    commands = set(cli_options())
    blocks, spans, _ = split_code(text)
    pieces = []
    for block in blocks:
        block = block.replace("\\\n", " ")
        variables = {m.group(1): m.group(2).strip("\"'") for m in ASSIGN.finditer(block)}
        for line in block.splitlines():
            for name, value in variables.items():
                line = re.sub(rf"\$\{{?{name}\b\}}?", lambda _m, v=value: v, line)
            pieces.append(line)
    pieces += [" ".join(s.split()) for s in spans]
    found = []
    for piece in pieces:
        for m in re.finditer(r"(?:(?<![\w.-])busi-monai|-m\s+busi_monai\.cli)\s+([a-z][\w-]*)(?=\s|$)", piece):
            if m.group(1) not in commands:
                found.append((m.group(1), ""))
                continue
            tail = piece[m.end():]
            found.append((m.group(1), tail[: SHELL_END.search(tail).start()].strip()))
    # A span that starts with a bare subcommand and a flag (`evaluate --clicks N`) is a quote too.
    for span in spans:
        words = span.split()
        if len(words) > 1 and words[0] in commands and words[1].startswith("--"):
            found.append((words[0], " ".join(words[1:])))
    return found


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_quoted_command_and_flag_exists(page):
    options = cli_options()
    bad = []
    for command, tail in quoted_commands(page.read_text()):
        if command not in options:
            bad.append(f"busi-monai {command}: no such command (there are {', '.join(sorted(options))})")
            continue
        for flag in FLAG.findall(tail):
            flag = flag.split("=", 1)[0]
            if flag not in options[command]:
                bad.append(f"busi-monai {command} {flag}: not in `busi-monai {command} --help`")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(sorted(set(bad)))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> set[str]:
    _, _, prose = split_code(path.read_text())
    # Headings hold code spans; read them from the text with fences removed, spans kept.
    text = FENCE.sub("\n", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = github_slug(m.group(1).replace("`", ""))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    out |= set(re.findall(r'<a\s+(?:name|id)="([^"]+)"', prose))
    return out


LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    _, _, prose = split_code(text)
    targets = LINK.findall(prose) + re.findall(r'<img[^>]+src="([^"]+)"', prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_and_image_resolves(page):
    bad = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no section #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


BENCH_FILE = re.compile(r"(?<![\w.-])benchmarks/[\w.*/-]*[\w*/]")


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_cited_benchmarks_file_exists(page):
    missing = []
    for cited in sorted(set(BENCH_FILE.findall(page.read_text()))):
        found = list(REPO.glob(cited.rstrip("/"))) if "*" in cited else [REPO / cited]
        if not any(p.exists() for p in found):
            missing.append(cited)
    assert not missing, f"{page.relative_to(REPO)} cites files that are not in the repository: {missing}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The parsers above find a wrong flag, a broken link and a missing figure in a made-up page."""
    text = (
        "Run `busi-monai train --data d --no-such-flag` or `.venv/bin/busi-monai infer --nope x`; the log says `busi-monai serve: ready`\n\n"
        "```bash\nS=\"--epochs 3 --bogus\"\nbusi-monai cv $S \\\n    --folds 5 --out x  # --not-checked\ntorchrun -m busi_monai.cli pack --wrong\n```\n\n"
        "See [a page](missing.md), [a section](#nowhere), ![fig](../benchmarks/none.png) and "
        "`benchmarks/nothing.json`; `evaluate --clickz 3`.\n\n## A `real` heading\n\n[ok](#a-real-heading)\n"
    )
    quoted = quoted_commands(text)
    assert ("train", "--data d --no-such-flag") in quoted
    cv = [t for c, t in quoted if c == "cv"]
    assert cv and "--bogus" in cv[0] and "--folds" in cv[0] and "--not-checked" not in cv[0]
    assert ("evaluate", "--clickz 3") in quoted
    assert ("pack", "--wrong") in quoted
    assert ("infer", "--nope x") in quoted and not [c for c, _ in quoted if c == "serve"]
    assert relative_links(text) == ["missing.md", "#nowhere", "../benchmarks/none.png", "#a-real-heading"]
    page = tmp_path / "page.md"
    page.write_text(text)
    assert anchors(page) == {"a-real-heading"}
    assert set(BENCH_FILE.findall(text)) == {"benchmarks/none.png", "benchmarks/nothing.json"}
    assert github_slug("nnU-Net's ingredients at CPU scale") == "nnu-nets-ingredients-at-cpu-scale"
    assert github_slug("CPU: a click through the MONAI Label server (2026-11-30)") == "cpu-a-click-through-the-monai-label-server-2026-11-30"
