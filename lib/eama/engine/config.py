"""One config layer for every job: a dataclass of defaults, an optional YAML file, named flags and
`key=value` overrides, merged and type-checked by OmegaConf (unknown keys and wrong types fail)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(SystemExit):
    """Raised (exit status 2) when a config file, flag or override does not fit the job's config."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")
        self.message = message


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
                layer = OmegaConf.from_dotlist(list(layer))
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
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key can also be set as key=value (nested: a.b=value):\n" + describe_keys(schema),
    )
    parser.add_argument("--config", help="YAML file with config keys (flags and key=value win over it)")
    for flag in flags:
        if flag.switch:
            parser.add_argument(flag.name, dest=flag.key, action="store_true", default=None, help=flag.help)
        else:
            parser.add_argument(flag.name, dest=flag.key, default=None, help=flag.help)
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
