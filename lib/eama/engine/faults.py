"""Which failures are transient (worth retrying: the same input may succeed later) and which are
the data's fault (permanent: an error row).

Transient: lost connections, timeouts, throttling and 5xx answers from object stores, CUDA out of
memory, a device-side assert or another CUDA / NCCL runtime failure, a lost Ray actor, node or
object. Everything else (an undecodable image, a missing column, a value out of range) is
permanent. Stages isolate permanent failures row by row and let transient ones propagate, so the
batch runner can retry them and, when they keep failing, commit them as *retryable* error rows
that the next run redoes.

Two transient kinds get their own treatment (isolation.py): running out of memory
(is_out_of_memory) is cured by smaller batches, so the rows are halved rather than retried; a
fault that poisons the process (poisons_process: a CUDA device-side assert or illegal memory
access leaves the CUDA context unusable) is cured only by a fresh process.
"""

from __future__ import annotations

import errno
import re

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_CUDA_TEXT = re.compile(r"cuda out of memory|out of memory on device|device-side assert|cuda error|cublas_status"
                        r"|cudnn_status|nccl", re.IGNORECASE)
_NETWORK_TEXT = re.compile(
    r"connection (?:was )?(?:reset|refused|aborted|closed)|could not connect|broken pipe|timed out|read timeout"
    r"|connect timeout|temporarily unavailable|slow ?down|throttl|service ?unavailable|internal ?error"
    r"|request ?limit ?exceeded|too many requests",
    re.IGNORECASE,
)
_HTTP_STATUS = re.compile(r"(?:status|code|http|error)\D{0,12}\b(?:429|500|502|503|504)\b", re.IGNORECASE)
_NETWORK_NAMES = ("IncompleteRead", "RemoteDisconnected", "ProtocolError", "ChunkedEncodingError")
_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "fsspec", "http")
_RAY_TRANSIENT = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError",
                  "NodeDiedError", "OwnerDiedError", "WorkerCrashedError", "RaySystemError",
                  "ObjectFetchTimedOutError", "GetTimeoutError")
# vLLM's engine core process died (killed, crashed): that engine never answers again, a fresh
# process with a fresh engine does
_ENGINE_DEAD = ("EngineDeadError",)


def is_transient(exc: BaseException) -> bool:
    """True for a failure that retrying the same input may cure (see the module docstring)."""
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        name, module = type(e).__name__, type(e).__module__ or ""
        if name == "OutOfMemoryError" or name in _RAY_TRANSIENT or name in _ENGINE_DEAD:
            return True
        if module.split(".")[0] in ("torch", "builtins") and isinstance(e, RuntimeError) and _CUDA_TEXT.search(str(e)):
            return True
        status = getattr(e, "response", None)
        if isinstance(status, dict) and status.get("ResponseMetadata", {}).get("HTTPStatusCode") in (429, 500, 502, 503, 504):
            return True
        if module.split(".")[0] in _NETWORK_MODULES and (_NETWORK_TEXT.search(f"{name} {e}")
                                                          or _HTTP_STATUS.search(str(e)) or name in _NETWORK_NAMES
                                                          or "Connect" in name or "Timeout" in name):
            return True
    return False


_OOM_TEXT = re.compile(r"cuda out of memory|out of memory on device|cudnn_status_alloc_failed"
                       r"|cublas_status_alloc_failed", re.IGNORECASE)
_POISON_TEXT = re.compile(r"device-side assert|illegal memory access|unspecified launch failure|misaligned address"
                          r"|illegal instruction|cuda error: an illegal", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when the accelerator (torch.OutOfMemoryError, a 'CUDA out of memory' RuntimeError) or
    the host (MemoryError) ran out of memory: smaller batches may fit."""
    return any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
               or (isinstance(e, RuntimeError) and _OOM_TEXT.search(str(e))) for e in _chain(exc))


def poisons_process(exc: BaseException) -> bool:
    """True for a CUDA fault after which the process's CUDA context is unusable (every later call
    fails), or a vLLM engine whose core process died: only a new process recovers."""
    return any((isinstance(e, RuntimeError) and _POISON_TEXT.search(str(e))) or type(e).__name__ in _ENGINE_DEAD
               for e in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes / contexts (a wrapped ConnectionError counts; `raise ... from
    None` hides the context, as it does in a traceback)."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return seen


_URL_SECRETS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@]+@)?(?P<rest>[^\s?#'\"]*)(?:\?[^\s#'\"]*)?")


def redact(text: str) -> str:
    """`text` with the query string and user info of every URL cut out (signed URLs carry
    credentials there): 'https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=..' -> '..k.jpg?<redacted>'."""
    def clean(m: re.Match) -> str:
        had_secret = "@" in m.group(0).split("/", 3)[2] if m.group(0).count("/") >= 2 else False
        had_secret = had_secret or "?" in m.group(0)
        return m.group("scheme") + m.group("rest") + ("?<redacted>" if had_secret else "")

    return _URL_SECRETS.sub(clean, text)


def describe(exc: BaseException, limit: int = 2000) -> str:
    """'Type: message', bounded and with URL secrets redacted, for an error row's reason."""
    return redact(f"{type(exc).__name__}: {exc}")[:limit]
