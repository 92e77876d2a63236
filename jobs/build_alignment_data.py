"""build_alignment_data: EAMA's three alignment tasks as instruction rows, on Ray Data.

    python jobs/build_alignment_data.py --input SAMPLES --output TASKS [--overwrite]
                                        [--config FILE.yaml] [key=value ...]

SAMPLES are sample Parquet shards with reference captions (local or s3://). TASKS receives
part-*.parquet task rows (task, sample_id, image, prompt, target, weight), _errors/*.parquet and
_manifest.json with the counts; the console also names each distinct error reason of the run.
A mistake in the settings or a missing input ends in one line `error: ...` before Ray starts
(exit status 2 for settings, 1 for the rest). See the README's Alignment section.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence

from eama.engine import config, console
from eama.news import alignment

FLAGS = [
    config.Flag("--input", "input", "sample Parquet shards: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "task rows directory, local or s3://"),
    config.Flag("--overwrite", "overwrite", "replace an existing output", switch=True),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.parse_args(alignment.BuildConfig, __doc__.splitlines()[0], FLAGS, argv)
    manifest = alignment.run(cfg)  # validates settings and the input before Ray starts
    summary = {k: manifest[k] for k in ("samples_in", "samples_with_tasks", "samples_without_tasks",
                                        "error_rows", "task_rows", "balanced", "wall_seconds")}
    print(json.dumps(summary, indent=2))
    for line in console.error_report(manifest["output"], manifest["run_id"], manifest["error_rows"]["total"]):
        print(line)
    if not manifest["balanced"]:
        raise SystemExit("row accounting does not balance; see the manifest")
    return manifest


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
