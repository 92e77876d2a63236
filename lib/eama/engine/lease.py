"""One writer per output: a run holds a lease on its output directory (local or s3://).

The lease is OUTPUT/_lease.json, created with an exclusive write (O_EXCL locally, a conditional
PUT on S3), renewed by a background thread and deleted when the run ends. A second run finds it
and stops with a message that names the holder. A lease is stale, and is broken by the next run,
once it has expired (the holder stopped renewing it: the driver died) or when its holder ran on
this host and that process no longer exists.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from eama.engine import storage

log = logging.getLogger("eama.lease")

LEASE_FILE = "_lease.json"


class LeaseHeld(SystemExit):
    """Another live run holds the output (exit status 3, one line, no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = 3


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _modified(path: str) -> float:
    """Last-modified time of `path` (seconds since the epoch)."""
    info = storage.filesystem(path).info(storage.strip(path))
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Expired, or held by a process of this host that is gone."""
    now = _now() if now is None else now
    if holder.get("expires", 0) < now:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


class Lease:
    """`with Lease(output, run_id):` holds the output for the block; renews every ttl/3 seconds."""

    def __init__(self, output: str, run_id: str, ttl: float = 300.0) -> None:
        self.path = storage.join(output, LEASE_FILE)
        self.output, self.run_id, self.ttl = output, run_id, ttl
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # the run that took the lease over, if one did

    def _record(self) -> dict[str, Any]:
        now = _now()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "acquired": now, "expires": now + self.ttl}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable (foreign, or cut short): held until ttl after it was last written
            return {"run_id": "unknown (unreadable lease)", "expires": _modified(self.path) + self.ttl}

    def acquire(self) -> "Lease":
        for _ in range(3):
            if storage.create_exclusive(self.path, json.dumps(self._record()).encode()):
                self._thread = threading.Thread(target=self._renew, name="eama-lease", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:
                continue  # released between our write and our read
            if not is_stale(holder):
                raise LeaseHeld(
                    f"output {self.output} is in use by run {holder.get('run_id')} on {holder.get('host')} "
                    f"(pid {holder.get('pid')}) since {_iso(holder.get('acquired', 0))}; its lease expires "
                    f"{_iso(holder.get('expires', 0))} unless renewed. Wait for it to finish, or delete "
                    f"{self.path} if that run is gone.")
            if (self._read() or {}).get("token") != holder.get("token"):
                continue  # another run broke it first and holds it now
            log.warning("breaking the stale lease of run %s on %s (expired %s)", holder.get("run_id"),
                        holder.get("host"), _iso(holder.get("expires", 0)))
            storage.remove(self.path)
        raise LeaseHeld(f"could not take the lease on {self.output}: another run keeps taking it")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self._read()
                if not current or current.get("token") != self.token:
                    self.lost = (current or {}).get("run_id") or "nobody"
                    log.error("the lease on %s was taken over by run %s", self.output, self.lost)
                    return
                storage.write_bytes_atomic(self.path, json.dumps(dict(current, expires=_now() + self.ttl)).encode())
            except Exception as exc:  # keep trying: the lease only lapses after ttl
                log.warning("could not renew the lease on %s: %s", self.output, exc)

    def verify(self) -> None:
        """Raise LeaseHeld if another run took the output over while this one ran."""
        if self.lost:
            raise LeaseHeld(f"lost the lease on {self.output} to run {self.lost} (this run stopped renewing it "
                            f"for over {self.ttl:.0f} s?); its commits are kept, the ledger is left for the next run")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        current = self._read()
        if current and current.get("token") == self.token:
            storage.remove(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
