"""What a run says while it trains: rank 0's step lines with pace and ETA (logger 'eama.trainer'),
relayed to the driver by a small actor so they show there even when Ray does not forward worker
output (log_to_driver=False), and the logging setup of workers and jobs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

log = logging.getLogger("eama.trainer")


def clock(seconds: float) -> str:
    """mm:ss (h:mm:ss from an hour on); '?' when unknown (infinite)."""
    if seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """Rank 0's step lines: every step for the first `first` steps, then at most every `every` s
    (and the last step). The pace (s/step, hence the ETA) is this attempt's since its first step,
    which also waits for the data pipeline to start; until a second step it is the first's time."""

    def __init__(self, total_steps: int, start_step: int, first: int = 3, every: float = 10.0):
        self.total, self.start, self.first, self.every = total_steps, start_step, first, every
        self.began = time.perf_counter()
        self.first_done: float | None = None
        self.last = -math.inf

    def due(self, step: int) -> bool:
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
        return step <= self.first or step == self.total or now - self.last >= self.every

    def line(self, step: int, record: dict[str, Any]) -> str:
        now = time.perf_counter()
        self.last = now
        done = step - self.start
        first_done = self.first_done if self.first_done is not None else now
        per_step = (now - first_done) / (done - 1) if done > 1 else now - self.began
        return (f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{per_step:.2f} s/step ETA {clock(per_step * (self.total - step))}")


class ProgressRelay:
    """A Ray actor (num_cpus=0) holding log lines from the workers until the driver drains them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


class RelayHandler(logging.Handler):
    """Sends each record's message to the relay actor (fire and forget; order is kept)."""

    def __init__(self, relay: Any):
        super().__init__(logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.relay.emit.remote(self.format(record))
        except Exception:  # the driver went away: the step must not fail for a log line
            self.handleError(record)


class DriverEcho:
    """On the driver: a thread that logs the relayed lines as 'eama.trainer' records while fit runs."""

    def __init__(self, relay: Any, interval: float = 0.5):
        self.relay, self.interval = relay, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eama-trainer-progress", daemon=True)

    def __enter__(self) -> "DriverEcho":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self._drain()

    def _drain(self) -> bool:
        import ray

        try:
            lines = ray.get(self.relay.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the relay is gone; progress lines are best effort
            return False
        for line in lines:
            log.info("%s", line)
        return True

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            if not self._drain():
                return


def show_progress(stream: Any = None) -> None:
    """For jobs that configure no logging: print 'eama.trainer' INFO lines (the driver's plan and
    the workers' relayed progress) to `stream` (stderr by default)."""
    logger = logging.getLogger("eama.trainer")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_eama_progress", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s train: %(message)s", "%H:%M:%S"))
        handler._eama_progress = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def worker_logging(relay: Any = None) -> None:
    """Send eama's INFO logs to the worker's stderr (Ray forwards it to the driver with
    log_to_driver); with a relay, 'eama.trainer' lines go to the driver through it instead."""
    root = logging.getLogger("eama")
    root.setLevel(logging.INFO)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False  # Ray Train's own root handler would print every line twice
    if relay is not None:
        for h in [h for h in log.handlers if isinstance(h, RelayHandler)]:
            log.removeHandler(h)
        log.addHandler(RelayHandler(relay))
        log.propagate = False  # not twice on the driver when Ray forwards worker output too
