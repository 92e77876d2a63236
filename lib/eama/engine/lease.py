"""One writer per output: a run holds a fenced lease on its output directory (local or s3://).

The lease is a sequence of claim objects, OUTPUT/_lease/gen-<N>.json, each created with an
exclusive write (O_EXCL + link locally, a conditional PUT with If-None-Match on S3): whoever
creates claim N holds generation N, so two runs can never both take over a stale lease. The
newest claim is the lease. Its holder renews it (rewriting only its own claim) every ttl/3 and
marks it released when the run ends. A run finds the newest claim and:

* released, expired (not renewed for `ttl` seconds), or held by a process of this very machine
  (same host, boot and process namespace) that no longer exists: it creates claim N+1;
* otherwise: it stops with one line naming the holder (exit status 3).

The generation is a fencing token: every commit record carries it, a commit first checks that no
newer claim exists (`check`), and the ledger ignores (and its compaction removes) a record of an
older generation written after a newer holder sealed the output (ledger.fence). A run that lost
its lease therefore cannot add rows beside the new holder's, and exits non-zero saying so.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from eama.engine import storage

log = logging.getLogger("eama.lease")

LEASE_DIR = "_lease"
KEEP_CLAIMS = 4  # older claim objects are deleted once a newer one is taken
_CLAIM = re.compile(r"gen-(\d{10})\.json$")


class LeaseHeld(SystemExit):
    """Another live run holds the output (exit status 3, one line, no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = 3


class LeaseLost(LeaseHeld):
    """This run's lease was taken over by a newer run: it must not commit again (exit status 3)."""


class Fenced(RuntimeError):
    """Raised in a commit task whose run no longer holds the newest generation (the driver turns
    it into LeaseLost)."""


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """Host name + boot id + process namespace: a pid is only meaningful where all three match
    (containers often share a host name)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the host name alone cannot tell, so never judge by pid
        parts.append(uuid.uuid4().hex)
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Released, expired, or held by a process of this machine that is gone."""
    now = _now() if now is None else now
    if holder.get("released") or holder.get("expires", 0) < now:
        return True
    return holder.get("machine") == machine_id() and not _pid_alive(int(holder.get("pid", -1)))


def claim_path(output: str, generation: int) -> str:
    return storage.join(output, LEASE_DIR, f"gen-{generation:010d}.json")


def claims(output: str) -> list[int]:
    """The generations claimed so far, ascending (one listing)."""
    try:
        names = storage.list_files(storage.join(output, LEASE_DIR), ".json", literal=True)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _CLAIM.search(n)))


def newest(output: str) -> int:
    """The newest claimed generation (0: never leased)."""
    gens = claims(output)
    return gens[-1] if gens else 0


def read_claim(output: str, generation: int) -> dict[str, Any] | None:
    path = claim_path(output, generation)
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable (cut short, or another tool's): held until ttl after it was written
        written = storage.modified(storage.filesystem(path).info(storage.strip(path)))
        return {"run_id": "unknown (unreadable lease)", "generation": generation, "expires": written + 300.0}


def holder(output: str) -> dict[str, Any] | None:
    """The live holder's claim, or None when the output is free."""
    gen = newest(output)
    current = read_claim(output, gen) if gen else None
    return None if current is None or is_stale(current) else current


class Lease:
    """`with Lease(output, run_id):` holds the output for the block; renews every ttl/3 seconds.
    `generation` is the fencing token commits carry."""

    def __init__(self, output: str, run_id: str, ttl: float = 300.0) -> None:
        self.output, self.run_id, self.ttl = output, run_id, ttl
        self.token = uuid.uuid4().hex
        self.generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # the run that took the lease over, if one did

    @property
    def path(self) -> str:
        return claim_path(self.output, self.generation)

    def _record(self, **extra: Any) -> bytes:
        now = _now()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "machine": machine_id(),
                           "pid": os.getpid(), "token": self.token, "generation": self.generation,
                           "acquired": now, "expires": now + self.ttl, **extra}).encode()

    def acquire(self) -> "Lease":
        for _ in range(5):
            gen = newest(self.output)
            current = read_claim(self.output, gen) if gen else None
            if current is not None and not is_stale(current):
                raise LeaseHeld(
                    f"output {self.output} is in use by run {current.get('run_id')} on {current.get('host')} "
                    f"(pid {current.get('pid')}) since {_iso(current.get('acquired', 0))}; its lease expires "
                    f"{_iso(current.get('expires', 0))} unless renewed. Wait for it to finish, or delete "
                    f"{storage.join(self.output, LEASE_DIR)} if that run is gone.")
            if current is not None and not current.get("released"):
                log.warning("taking over the stale lease of run %s on %s (expired %s)", current.get("run_id"),
                            current.get("host"), _iso(current.get("expires", 0)))
            self.generation = gen + 1
            if storage.create_exclusive(self.path, self._record()) or self._is_mine():
                self._prune(gen)
                self._thread = threading.Thread(target=self._renew, name="eama-lease", daemon=True)
                self._thread.start()
                return self
        raise LeaseHeld(f"could not take the lease on {self.output}: other runs keep taking it")

    def _is_mine(self) -> bool:
        """A create whose answer was lost and whose retry found the object: ours if the token is."""
        return (read_claim(self.output, self.generation) or {}).get("token") == self.token

    def _prune(self, below: int) -> None:
        for gen in claims(self.output):
            if gen <= below - KEEP_CLAIMS:
                try:
                    storage.remove(claim_path(self.output, gen))
                except Exception as exc:  # housekeeping only
                    log.debug("could not remove old claim %d: %s", gen, exc)

    def check(self) -> None:
        """Raise LeaseLost if a newer generation was claimed (one listing; commits call it)."""
        if self.lost:
            raise self.lost_error()
        gen = newest(self.output)
        if gen != self.generation:
            self.lost = (read_claim(self.output, gen) or {}).get("run_id") or f"generation {gen}"
            raise self.lost_error()

    def lost_error(self) -> LeaseLost:
        return LeaseLost(f"lost the lease on {self.output} to run {self.lost} (this run stopped renewing it for "
                         f"over {self.ttl:.0f} s: a paused driver or a storage outage); what it committed before "
                         f"is kept, nothing after; the newer run owns the output now")

    def renew_once(self) -> None:
        """Extend this run's claim, unless a newer claim exists (then the lease is lost)."""
        self.check()
        storage.write_bytes_atomic(self.path, self._record())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew_once()
            except LeaseLost as lost:
                log.error("%s", lost.message)
                return
            except Exception as exc:  # keep trying: the lease only lapses after ttl
                log.warning("could not renew the lease on %s: %s", self.output, exc)

    def verify(self) -> None:
        """Raise LeaseLost if another run took the output over while this one ran."""
        self.check()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.generation and not self.lost and newest(self.output) == self.generation:
            storage.write_bytes_atomic(self.path, self._record(released=True))

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_generation(output: str, generation: int) -> None:
    """For commit tasks (another process than the lease's holder): raise Fenced when a newer
    generation than `generation` has been claimed on `output`."""
    if not generation:
        return
    gen = newest(output)
    if gen > generation:
        who = (read_claim(output, gen) or {}).get("run_id") or f"generation {gen}"
        raise Fenced(f"fenced: run {who} (generation {gen}) took the lease on {output} over from this run "
                     f"(generation {generation}); this commit was not written")
