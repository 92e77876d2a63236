"""Writing an importer's rows as Parquet shards, with its bad input as error rows.

Every importer yields `(row, None)` or `(None, error)`; `write_shards` writes the rows as
`part-NNNNN.parquet` under the output and the errors (a sample_id seen twice included) to
`_errors/import.parquet`, so rows in = rows written + error rows. Importing again into the same
output replaces the earlier import.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from eama.engine import schema, storage

Row = dict[str, Any]
Error = dict[str, Any]
Item = tuple[Row | None, Error | None]


def error(sample_id: str | None, source: str, reason: str) -> Error:
    """An import error row (schema.ERROR); `source` names the file, and the line where there is one."""
    return {"sample_id": sample_id, "source_file": source, "stage": "import", "reason": reason, "run_id": None}


def load_image(uri: str) -> tuple[bytes | None, str | None]:
    """(the image file's bytes, None), or (None, why it cannot be used: missing or undecodable)."""
    from eama.engine import images as image_io

    try:
        data = storage.read_bytes(uri)
        image_io.open_image(data).verify()
    except FileNotFoundError:
        return None, f"image file not found: {uri}"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the image's fault
        return None, f"unreadable image {uri}: {exc}"
    return data, None


def decoded_lines(path: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line of a UTF-8 text file; text is None for a line that is not
    valid UTF-8 (the caller makes it an error row naming file:line)."""
    for lineno, raw in enumerate(storage.read_bytes(path).split(b"\n"), start=1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            yield lineno, None


def write_shards(items: Iterator[Item], output: str, shard_size: int = 256,
                 row_schema: pa.Schema = schema.SAMPLE) -> dict[str, int]:
    """Write rows of `row_schema` in shards of `shard_size` and the errors; returns counts. An
    earlier import into `output` is replaced (its shards and error file; nothing else is touched)."""
    if storage.exists(output):
        for old in storage.list_files(output):
            if old.rsplit("/", 1)[-1].startswith("part-"):
                storage.remove(old)
        storage.remove(storage.join(output, "_errors", "import.parquet"))
    buffer: list[Row] = []
    errors: list[Error] = []
    seen: set[str] = set()
    shards = 0

    def flush() -> None:
        nonlocal shards
        if buffer:
            table = pa.Table.from_pylist(buffer, schema=row_schema)
            storage.write_table_atomic(table, storage.join(output, f"part-{shards:05d}.parquet"), storage.ROW_GROUP_ROWS)
            shards += 1
            buffer.clear()

    samples = 0
    for row, err in items:
        if err is not None:
            errors.append(err)
            continue
        assert row is not None
        if row["sample_id"] in seen:
            errors.append(error(row["sample_id"], "", "duplicate sample_id (first occurrence kept)"))
            continue
        seen.add(row["sample_id"])
        buffer.append(row)
        samples += 1
        if len(buffer) >= shard_size:
            flush()
    flush()
    if errors:
        storage.write_table_atomic(pa.Table.from_pylist(errors, schema=schema.ERROR),
                                   storage.join(output, "_errors", "import.parquet"))
    return {"samples": samples, "errors": len(errors), "shards": shards}
