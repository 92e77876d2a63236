"""Values stored once and read by key (engine/blobs.py), and the runner's attachment beside a job's rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eama.engine import blobs

SCHEMA = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False)])


def test_values_are_found_by_key_across_files_and_row_groups(tmp_path):
    first = [{"sample_id": f"s{i:03d}", "image": f"first-{i}".encode()} for i in range(40)]
    blobs.write_blobs(first[::-1], SCHEMA, str(tmp_path / "part-a.parquet"))  # written out of order
    # a commit redone after a crash repeats keys: each key keeps one value
    redo = [{"sample_id": "s005", "image": b"first-5"}, {"sample_id": "t1", "image": b"t-one"}]
    blobs.write_blobs(redo, SCHEMA, str(tmp_path / "part-b.parquet"))
    meta = pq.ParquetFile(tmp_path / "part-a.parquet").metadata
    assert meta.num_row_groups == 3  # 40 values in groups of 16: a random read fetches at most 16
    assert pq.read_table(tmp_path / "part-a.parquet").column("sample_id").to_pylist() == sorted(
        r["sample_id"] for r in first)
    table = blobs.BlobTable(str(tmp_path), cache_groups=2)
    assert len(table) == 41 and "t1" in table and "s040" not in table
    assert table.get(["s039", "t1", "s000", "s005", "s017"]) == [b"first-39", b"t-one", b"first-0", b"first-5",
                                                              b"first-17"]
    assert len(table.cache) == 2  # only the most recent row groups are kept
    with pytest.raises(blobs.MissingBlob, match="sample_id='nope'"):
        table.get(["s001", "nope"])


def test_fill_keeps_inline_values_and_fetches_the_rest(tmp_path):
    blobs.write_blobs([{"sample_id": "a", "image": b"stored-a"}, {"sample_id": "b", "image": b"stored-b"}], SCHEMA,
                      str(tmp_path / "part-0.parquet"))
    rows = {"sample_id": ["a", "b", "c"], "image": [None, None, b"inline-c"]}
    assert blobs.fill(rows, blobs.BlobTable(str(tmp_path))) == [b"stored-a", b"stored-b", b"inline-c"]
    assert blobs.fill({"sample_id": ["c"], "image": [b"x"]}, None) == [b"x"]
    with pytest.raises(blobs.MissingBlob, match="no blob folder"):
        blobs.fill(rows, None)
    assert len(blobs.BlobTable(str(tmp_path / "absent"))) == 0
