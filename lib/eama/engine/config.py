"""One config layer for every job: a dataclass of defaults, an optional YAML file, named flags and
`key=value` overrides, merged and type-checked by OmegaConf (unknown keys and wrong types fail).

`main(fn, ...)` runs a job's main function as a command: a user's mistake (ConfigError, UserError,
a SystemExit with a message, the job's own `user_errors`) ends in one line `error: ...` on stderr
and exit status 2 (config) or 1 (anything else the user can fix); a real bug keeps its traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(SystemExit):
    """Raised (exit status 2) when a config file, flag or override does not fit the job's config."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")
        self.message = message


class UserError(SystemExit):
    """Raised (exit status 1) for what the user asked that no run can use: an input path that does
    not exist, a model path that is not there. Outside `main` it still exits with its message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


CONFIG_EXIT = 2  # a config file, flag, override or setting does not fit the job
FAILURE_EXIT = 1  # anything else the user can fix (a missing input, a refused run)
TRACEBACK_ENV = "EAMA_TRACEBACK"  # set to 1: user errors re-raise with their traceback (debugging)


def exit_error(message: str, status: int = FAILURE_EXIT) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `status`. The messages of user errors are
    one line; a longer one (a failed training's worker error) is printed whole, not cut."""
    sys.stderr.write(f"error: {str(message).strip() or 'unknown error'}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def main(fn: Callable[..., Any], *args: Any, user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run a job's main function as a command and exit; the one error-handling mechanism of jobs/.

    `fn(*args)` returning an int exits with it, anything else exits 0. ConfigError exits 2 and
    UserError 1, each as one line `error: ...` on stderr, before Ray starts wherever the job
    validates first; a SystemExit with a message exits 1 the same way; one with a status (argparse's
    --help, a LeaseHeld's 3) keeps it, printing its `message` if it has one; `user_errors` (e.g.
    FileNotFoundError for a job that opens a file the user named) exit 1 as `error: Type: message`.
    Any other exception is a bug and shows its traceback. EAMA_TRACEBACK=1 shows them all."""
    try:
        result = fn(*args)
    except ConfigError as exc:
        _maybe_reraise()
        exit_error(exc.message, CONFIG_EXIT)
    except SystemExit as exc:
        _maybe_reraise()
        if exc.code is None or isinstance(exc.code, int):
            if getattr(exc, "message", None):
                sys.stderr.write(f"error: {str(exc.message).strip()}\n")
            raise SystemExit(exc.code) from None
        exit_error(str(exc.code), FAILURE_EXIT)
    except KeyboardInterrupt:
        exit_error("interrupted", 130)
    except user_errors as exc:  # type: ignore[misc]
        _maybe_reraise()
        exit_error(f"{type(exc).__name__}: {exc}", FAILURE_EXIT)
    raise SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def _maybe_reraise() -> None:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise  # called only from an except block: re-raises the exception being handled


@contextlib.contextmanager
def checking_settings() -> Iterator[None]:
    """Inside, what a validate function raises about settings (a ValueError, or a SystemExit with a
    message, as the engine's and the systems' validate functions do) becomes a ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except SystemExit as exc:
        if isinstance(exc.code, str):
            raise ConfigError(exc.code.removeprefix("config error: ")) from None
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def require_path(path: str, what: str = "input") -> None:
    """UserError unless `path` (local or s3://) exists; globs are left to the listing."""
    if not path:
        raise ConfigError(f"{what} is empty: a path is needed")
    if any(ch in path for ch in "*?["):
        return
    from eama.engine import faults, storage

    try:
        found = storage.exists(path)
    except Exception as exc:  # no credentials, an unknown bucket, an unreachable endpoint
        raise UserError(f"cannot check {what} {path}: {faults.describe(exc, 300)}") from None
    if not found:
        raise UserError(f"{what} not found: {path}")


def looks_local(name: str) -> bool:
    """Whether a name can only mean a local path (a hub id 'org/name' or an s3:// URI never starts so)."""
    return name.startswith(("/", "./", "../", "~", "file://"))


def require_local_if_named(name: str, what: str, hint: str = "") -> None:
    """UserError when `name` is spelled as a local path (looks_local) and nothing is there."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name.removeprefix("file://"))):
        raise UserError(f"{what} not found: {name}" + (f" ({hint})" if hint else ""))


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line under `main`) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A named command-line flag that sets one config key (`switch` flags set True)."""

    name: str
    key: str
    help: str = ""
    switch: bool = False


def build_config(schema: type[T], *layers: Any) -> T:
    """Merge dict / YAML-path / dotlist layers over the dataclass defaults and validate."""
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            if layer is None:
                continue
            if isinstance(layer, str):
                layer = OmegaConf.load(layer)
            elif isinstance(layer, (list, tuple)):
                # `key=` means the empty string (OmegaConf would read it as null)
                layer = OmegaConf.from_dotlist([f"{item}''" if item.endswith("=") else item for item in layer])
            merged = OmegaConf.merge(merged, layer)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {exc.filename}") from None


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0]
    return f"{key}: {first}" if key else first


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^=#]*=[^#]*#\s*(.+?)\s*$")


def key_meanings(schema: type) -> dict[str, str]:
    """The one-line meaning of each config key: the comment beside its field in the dataclass
    (or in a base class), so the code and --help say the same thing."""
    meanings: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            if (m := _FIELD_COMMENT.match(line)):
                meanings[m.group(1)] = m.group(2)
    return meanings


def describe_keys(schema: type) -> str:
    """'  key (default value): meaning' for every key of the job's config, in field order."""
    meanings = key_meanings(schema)
    defaults = dataclasses.asdict(schema())  # type: ignore[call-overload]
    lines = []
    for f in dataclasses.fields(schema):  # type: ignore[arg-type]
        meaning = meanings.get(f.name, "")
        lines.append(f"  {f.name} (default {defaults[f.name]!r})" + (f": {meaning}" if meaning else ""))
    return "\n".join(lines)


def parse_args(
    schema: type[T], description: str, flags: Sequence[Flag] = (), argv: Sequence[str] | None = None
) -> T:
    """Parse `[--config FILE] [flags] [key=value ...]` into a validated `schema` instance."""
    parser = _Parser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key can also be set as key=value (nested: a.b=value):\n" + describe_keys(schema),
    )
    parser.add_argument("--config", help="YAML file with config keys (flags and key=value win over it)")
    for flag in flags:
        text = flag.help.replace("%", "%%")  # argparse %-formats help strings ("10%" would break --help)
        if flag.switch:
            parser.add_argument(flag.name, dest=flag.key, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag.name, dest=flag.key, default=None, help=text)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected key=value, got {bad[0]!r}")
    from_flags = {
        f.key: getattr(args, f.key) for f in flags if getattr(args, f.key, None) is not None
    }
    return build_config(schema, args.config, from_flags or None, args.overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
