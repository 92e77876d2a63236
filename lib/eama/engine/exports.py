"""A run's model export behind a pointer, so that a reader never finds it half-written.

`publish_export` uploads a complete folder to `RUN/export-<step>-<id>/` (a fresh name: nothing a
reader can see is touched), then switches the pointer `RUN/export.json` to it with one atomic
write (a rename locally, one PUT on S3), and only then removes the older `export-*` folders (and
those a crash left half-written). On local storage `RUN/export` is also a symbolic link to the
current folder, replaced atomically after the pointer, for tools that read the folder directly.

`resolve_export` is what every loader calls (`hf.resolve` and so `models.load_model`,
`encoders.locate`, the MNER and keyphrase loaders; the model jobs pin it once on the driver):
`RUN/export` (or `RUN`) becomes the folder the pointer names; a run written before the pointer
(a plain `RUN/export/` folder), a hub id or any other folder passes as it is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid

from eama.engine import storage

log = logging.getLogger(__name__)

NAME = "export"  # what users pass: RUN/export
POINTER = "export.json"  # RUN/export.json: {"export": "export-<step>-<id>", "step": <step>}
FOLDER = re.compile(r"export-\d{8}-[0-9a-f]{8}")


def read_pointer(run: str) -> str | None:
    """The export folder name RUN/export.json points to (None when there is no valid pointer)."""
    try:
        obj = storage.read_json(storage.join(run, POINTER))
    except (OSError, ValueError):  # none there (or not a run folder, or not JSON)
        return None
    name = obj.get("export") if isinstance(obj, dict) else None
    return name if isinstance(name, str) and FOLDER.fullmatch(name) else None


def resolve_export(path: str) -> str:
    """The complete export folder `path` names: RUN/export or RUN through RUN/export.json; any other
    path (a legacy plain export folder, a model folder, a hub id) unchanged."""
    if not path:
        return path
    trimmed = path.rstrip("/") or path
    base = trimmed.rsplit("/", 1)[-1] if storage.is_remote(trimmed) else os.path.basename(trimmed)
    runs = [trimmed[: len(trimmed) - len(base)].rstrip("/")] if base == NAME else []
    for run in runs + [trimmed]:
        name = read_pointer(run) if run else None
        if name:
            return storage.join(run, name)
    return path


def export_exists(path: str) -> bool:
    """Whether `path` names an export that is there (through the pointer, or a plain folder)."""
    return storage.exists(resolve_export(path))


def upload_dir(local: str, dest: str) -> None:
    """Copy a local folder's files to `dest` (local path or s3://)."""
    fs = storage.filesystem(dest)
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            target = storage.join(dest, *rel.split(os.sep))
            if storage.is_remote(dest):
                fs.put_file(os.path.join(root, name), storage.strip(target))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(root, name), target)


def publish_export(local: str, run: str, step: int) -> str:
    """Make the local folder `local` the run's export: upload it whole beside the current one,
    switch RUN/export.json (and locally the RUN/export link) to it, then remove the older export
    folders. A crash at any point leaves readers a complete export. Returns the new folder."""
    name = f"export-{step:08d}-{uuid.uuid4().hex[:8]}"
    dest = storage.join(run, name)
    upload_dir(local, dest)
    storage.write_json_atomic(storage.join(run, POINTER), {"export": name, "step": step})
    if not storage.is_remote(run):
        _link(storage.strip(run), name)
    _remove_old(run, name)
    return dest


def _link(run: str, name: str) -> None:
    """RUN/export -> `name` (relative, so the run folder can move), replaced atomically. A legacy
    plain export folder there is removed first: readers already follow the pointer."""
    link = os.path.join(run, NAME)
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    tmp = os.path.join(run, f".{NAME}.tmp-{uuid.uuid4().hex}")
    os.symlink(name, tmp)
    os.replace(tmp, link)


def _remove_old(run: str, keep: str) -> None:
    """Export folders other than `keep` (older exports, half-written ones), and on S3 a legacy
    plain export/ folder."""
    fs = storage.filesystem(run)
    for entry in fs.ls(storage.strip(run), detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if (FOLDER.fullmatch(base) and base != keep) or (base == NAME and storage.is_remote(run)):
            storage.remove(storage.join(run, base))
