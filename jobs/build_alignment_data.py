"""build_alignment_data: EAMA's three alignment tasks as instruction rows, on Ray Data.

    python jobs/build_alignment_data.py --input SAMPLES --output TASKS [--overwrite]
                                        [--config FILE.yaml] [key=value ...]

SAMPLES are sample Parquet shards with reference captions (local or s3://). TASKS receives
part-*.parquet task rows (task, sample_id, image, prompt, target, weight), _errors/*.parquet and
_manifest.json with the counts. See the README's Alignment section.
"""

from __future__ import annotations

import json
import logging

from eama.engine import config
from eama.news import alignment

FLAGS = [
    config.Flag("--input", "input", "sample Parquet shards: file, directory or glob, local or s3://"),
    config.Flag("--output", "output", "task rows directory, local or s3://"),
    config.Flag("--overwrite", "overwrite", "replace an existing output", switch=True),
]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.parse_args(alignment.BuildConfig, __doc__.splitlines()[0], FLAGS)
    manifest = alignment.run(cfg)
    summary = {k: manifest[k] for k in ("samples_in", "samples_with_tasks", "samples_without_tasks",
                                        "error_rows", "task_rows", "balanced", "wall_seconds")}
    print(json.dumps(summary, indent=2))
    if not manifest["balanced"]:
        raise SystemExit("row accounting does not balance; see the manifest")


if __name__ == "__main__":
    main()
