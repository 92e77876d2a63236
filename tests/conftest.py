"""Shared fixtures: real local Ray, a real S3 API server (moto) on loopback, the ../shared data."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("EAMA_CACHE", str(Path(__file__).resolve().parents[1] / ".eama_cache"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present on project machines)")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on 127.0.0.1 with credentials in the environment.

    Yields (endpoint_url, server) and a bucket named 'eama-test' exists."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAEAMATESTKEY00001",
        "AWS_SECRET_ACCESS_KEY": "eama-test-secret-do-not-log-7f3a9c",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="eama-test")
    yield endpoint, server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance on loopback with 2 CPUs, shared by the tests that need one (its
    workers see the S3 server's endpoint and credentials)."""
    import ray

    if not ray.is_initialized():  # address="local": a new instance, never a `ray start` cluster left behind
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in _FORWARD if k in os.environ}})
    yield ray


_FORWARD = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "EAMA_CACHE", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """24 demo samples in 3 shards."""
    from eama.news import demo

    out = tmp_path_factory.mktemp("demo_corpus")
    demo.write_demo_corpus(str(out), num_samples=24, shard_size=8, seed=0)
    return out


def load_job(name: str):
    """Import jobs/<name>.py as a module (jobs/ holds scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eama_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_CLUSTER_PREAMBLE = """
import sys, json, threading, time, glob
sys.path.insert(0, {jobs!r})
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": {head_cpus}}})
workers = [cluster.add_node(num_cpus={worker_cpus}) for _ in range({workers})]
ray.init(address=cluster.address)
import caption_corpus
"""


def run_on_cluster(body: str, head_cpus: int, worker_cpus: int, workers: int, timeout: int):
    """Run `body` in a fresh process against a simulated multi-node cluster (ray.cluster_utils,
    on 127.0.0.1); the names cluster, workers and caption_corpus are defined for it."""
    import subprocess
    import sys
    import textwrap

    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    script = (_CLUSTER_PREAMBLE.format(jobs=jobs, head_cpus=head_cpus, worker_cpus=worker_cpus, workers=workers)
              + textwrap.dedent(body) + "\nray.shutdown(); cluster.shutdown()\n")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


def kill_when(cmd: list[str], ready, log_path: Path, timeout: float = 240) -> None:
    """Start `cmd` (a job), wait until `ready()` is true, then SIGKILL the whole job at once: the
    driver, its raylet and the Ray workers (some of which leave the process group)."""
    import contextlib
    import signal
    import subprocess
    import time

    import psutil

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed: " + log_path.read_text()[-3000:]
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(workers, timeout=30)
    proc.wait()


# ---------------------------------------------------------------- the pip resolver dry run, in the background
#
# A resolver run takes minutes of waiting on the package index and little CPU: it starts as soon as
# the test that checks it is collected and runs beside the other tests; the test waits for it.

PIP_DRY_RUN: dict[str, "PipDryRun"] = {}


class PipDryRun:
    """`pip install --dry-run --report` of the project in a fresh venv, torch pinned, no constraints."""

    def __init__(self) -> None:
        import shutil
        import subprocess
        import tempfile
        import time

        root = Path(__file__).resolve().parents[1]
        self.tmp = Path(tempfile.mkdtemp(prefix="eama-pip-"))
        source = self.tmp / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(root / name, source / name)
        shutil.copytree(root / "lib", source / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.tmp / "venv")], check=True, timeout=120)
        self.report = self.tmp / "report.json"
        self.stderr = open(self.tmp / "stderr.txt", "w+")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pip", "--python", str(self.tmp / "venv" / "bin" / "python"), "install",
             "--dry-run", "--ignore-installed", "--quiet", "--report", str(self.report), "torch==2.13.0", str(source)],
            stdout=subprocess.DEVNULL, stderr=self.stderr)

    def wait(self, timeout: float = 1400) -> tuple[int, str, float]:
        """(exit status, stderr, seconds since it started)."""
        import time

        code = self.proc.wait(timeout=timeout)
        self.stderr.seek(0)
        return code, self.stderr.read(), time.time() - self.started


def pytest_collection_finish(session) -> None:
    if any(item.name.startswith("test_pip_resolves") for item in session.items):
        PIP_DRY_RUN["job"] = PipDryRun()


def pip_dry_run() -> PipDryRun:
    return PIP_DRY_RUN.get("job") or PIP_DRY_RUN.setdefault("job", PipDryRun())
