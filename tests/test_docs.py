"""The README and docs/ as a user reads them: every relative link resolves (file and heading), and
every `python jobs/...` command they show names a job that exists and only flags and keys that
job's --help lists."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from conftest import load_job

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"python (jobs/[a-z_]+\.py)((?:[^\n`|;&]|\\\n)*)")
KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub renders it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 350, len(lines)
    assert lines[2] == "```bash" and lines[3].startswith("make demo") and lines[4].startswith("make test")
    text = "\n".join(lines)
    for stale in ("still to run", "so far", "measured earlier", "this session", "last time"):
        assert stale not in text.lower(), stale


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


@functools.lru_cache(maxsize=None)
def help_text(job: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        load_job(job).main(["--help"])
    return out.getvalue()


def documented_commands() -> list[tuple[str, str, str]]:
    """(page, job, arguments) of every `python jobs/X.py ...` in the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in COMMAND.finditer(text):
            if "error" in text[m.end():m.end() + 120].split("\n\n")[0]:
                continue  # an example of a mistake and the line it gets
            found.append((page.name, m.group(1), m.group(2).replace("\\\n", " ")))
    return found


def test_the_docs_show_commands():
    jobs = {job for _, job, _ in documented_commands()}
    assert len(jobs) >= 10, jobs  # the extraction below really sees the pages' commands


@pytest.mark.parametrize("page,job,args", documented_commands(), ids=lambda v: str(v)[:60])
def test_every_documented_command_uses_what_its_job_accepts(page, job, args):
    assert (ROOT / job).exists(), f"{page}: {job} does not exist"
    text = help_text(Path(job).stem)
    keys = set(re.findall(r"^  ([a-z_][a-z0-9_.]*) \(default ", text, flags=re.M))
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    unknown = []
    for token in args.split():
        token = token.strip("\"'")
        if token.startswith("--"):
            if token.split("=")[0] not in flags:
                unknown.append(token)
        elif (m := KEY.match(token)) and m.group(1).split(".")[0] not in keys:
            unknown.append(token)
    assert not unknown, f"{page}: {job} does not take {unknown}"
