"""An s3:// model on a node: downloaded once however many processes load it at once, and labelled
from its object listing without a download. Against a real S3 API server (moto) on loopback; the
server's own request recording counts the GETs."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest

from eama.engine import hf

BUCKET = "eama-test"


def upload_tiny_llava(prefix: str) -> dict[str, bytes]:
    """The tiny LLaVA's files under s3://BUCKET/PREFIX/; returns them by name."""
    from eama.news import models

    folder = Path(models.resolve("tiny-llava"))
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)
    return files


class Recording:
    """The requests the moto server answered while recording (moto's recorder, written to the
    working directory, which the test points at tmp_path)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.moto_api import recorder

        monkeypatch.chdir(tmp_path)
        self.recorder, self.path = recorder, tmp_path / "moto_recording"
        recorder.reset_recording()

    def __enter__(self) -> "Recording":
        self.recorder.start_recording()
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.stop_recording()

    def object_gets(self, prefix: str) -> list[str]:
        """Keys under PREFIX read with a GET (listings, which GET the bucket, not counted)."""
        keys = []
        for line in self.path.read_text().splitlines():
            entry = json.loads(line)
            path = urlsplit(entry["url"]).path.lstrip("/")
            if entry["method"] == "GET" and path.startswith(f"{BUCKET}/{prefix}/"):
                keys.append(path.removeprefix(f"{BUCKET}/{prefix}/"))
        return sorted(keys)


def _download(uri: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    hf.s3_listing(uri)  # the S3 client built and warm, so the four reach the download together
    start.wait(timeout=60)
    out.put(hf.download(uri))


def test_four_processes_loading_an_s3_model_at_once_download_it_once(s3_server, tmp_path, monkeypatch):
    files = upload_tiny_llava("models/once")
    uri = f"s3://{BUCKET}/models/once"
    monkeypatch.setenv("EAMA_CACHE", str(tmp_path / "cache"))  # the spawned processes' node cache
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_download, args=(uri, start, out)) for _ in range(4)]
    with Recording(tmp_path, monkeypatch) as seen:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    folders = [out.get(timeout=5) for _ in procs]
    assert len(set(folders)) == 1  # one folder for all four
    assert seen.object_gets("models/once") == sorted(files)  # each object read once: one download
    local = Path(folders[0])
    got = {p.name: p.read_bytes() for p in local.iterdir() if p.name != hf.LISTING_FILE}
    assert got == files
    assert [p.name for p in local.parent.iterdir() if ".tmp-" in p.name] == []  # no temp folder left


def test_an_s3_model_is_labelled_from_its_listing_and_a_rewrite_is_a_new_download(s3_server, tmp_path, monkeypatch):
    from eama.news import caption_job, models

    files = upload_tiny_llava("models/label")
    uri = f"s3://{BUCKET}/models/label"
    monkeypatch.setenv("EAMA_CACHE", str(tmp_path / "cache"))
    cfg = caption_job.CaptionCorpusConfig(model=uri)
    with Recording(tmp_path, monkeypatch) as seen:
        label = caption_job.model_label(cfg)
        family = caption_job.family_of(uri)
    assert seen.object_gets("models/label") == ["config.json"]  # the family's config alone; the label reads none
    assert family == "llava"
    assert label.startswith(f"{uri}@s3:") and caption_job.model_label(cfg) == label  # stable
    fp = label.split("@", 1)[1]

    upload_tiny_llava("models/label-copy")  # the same files elsewhere: the same model
    assert hf.model_label("copy", f"s3://{BUCKET}/models/label-copy") == f"copy@{fp}"

    # a worker that loads the model records the label the driver wrote
    assert models.load_model(uri).fingerprint == fp
    first = hf.download(uri)

    # one file rewritten in place (same size, other bytes): another model, downloaded again
    changed = bytearray(files["model.safetensors"])
    changed[-1] ^= 0xFF
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=BUCKET, Key="models/label/model.safetensors", Body=bytes(changed))
    assert caption_job.model_label(cfg) != label
    second = hf.download(uri)
    assert second != first and (Path(second) / "model.safetensors").read_bytes() == bytes(changed)
    assert (Path(first) / "model.safetensors").read_bytes() == files["model.safetensors"]
