"""demo: the whole EAMA loop on the generated demo corpus, on local Ray, with tiny models.

    python jobs/demo.py [--nyt ../shared/data/news_sample] [key=value ...]

1. generate the demo corpus (a training split and a held-out split);
2. optionally import a real GoodNews-style sample (caption.json + images/) and caption it;
3. caption the held-out split with the untrained tiny model and evaluate it;
4. build EAMA's three alignment tasks from the training split;
5. train briefly with Ray Train + DeepSpeed ZeRO-3 (2 workers) and export the model;
6. caption the held-out split with the trained model, evaluate, and compare.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

import ray
import ray.data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import caption_corpus  # noqa: E402

from eama.engine import config, storage, trainer
from eama.news import alignment, alignment_training, demo, evaluation, importers


@dataclasses.dataclass
class DemoConfig:
    workdir: str = "demo_out"
    model: str = "tiny-llava"
    train_samples: int = 256
    eval_samples: int = 48
    nyt: str = ""  # a GoodNews-style folder (caption.json + images/) to import and caption
    train_steps: int = 300
    lr: float = 1e-3
    num_workers: int = 2
    zero_stage: int = 3


FLAGS = [config.Flag("--nyt", "nyt", "GoodNews-style folder (caption.json + images/) to import and caption")]


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def caption_and_score(cfg: DemoConfig, corpus: str, name: str, model: str) -> dict:
    out = storage.join(cfg.workdir, name)
    caption_corpus.run(caption_corpus.CaptionCorpusConfig(input=corpus, output=out, model=model, overwrite=True))
    report = evaluation.evaluate(evaluation.validate(evaluation.EvaluateConfig(
        input=out, output=storage.join(cfg.workdir, f"{name}_report"))))
    print(evaluation.write_report(report, storage.join(cfg.workdir, f"{name}_report")))
    return report


def check(cfg: DemoConfig) -> None:
    """Settings (ConfigError) and the --nyt folder (UserError), before Ray starts."""
    for key in ("train_samples", "eval_samples", "train_steps", "num_workers"):
        if getattr(cfg, key) < 1:
            raise config.ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise config.ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    config.require_local_if_named(cfg.model, "model")
    if cfg.nyt:
        for need in ("caption.json", "images"):
            config.require_path(os.path.join(cfg.nyt, need), f"--nyt {need}")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = config.parse_args(DemoConfig, __doc__.splitlines()[0], FLAGS, argv)
    check(cfg)
    started = time.time()
    ray.init(log_to_driver=False)  # worker logs stay in /tmp/ray/session_latest/logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer.show_progress(sys.stdout)  # the training's plan and progress lines, relayed from rank 0
    w = cfg.workdir

    step("1. demo corpus")
    train_corpus, eval_corpus = storage.join(w, "corpus", "train"), storage.join(w, "corpus", "eval")
    demo.write_demo_corpus(train_corpus, cfg.train_samples, shard_size=64, seed=0)
    demo.write_demo_corpus(eval_corpus, cfg.eval_samples, shard_size=16, seed=1)
    print(f"{cfg.train_samples} training and {cfg.eval_samples} held-out samples under {w}/corpus")

    if cfg.nyt:
        step("2. import and caption the real sample")
        nyt = storage.join(w, "nyt", "samples")
        print(importers.write_shards(importers.goodnews_samples(
            os.path.join(cfg.nyt, "caption.json"), os.path.join(cfg.nyt, "images")), nyt))
        caption_corpus.print_summary(caption_corpus.run(caption_corpus.CaptionCorpusConfig(
            input=nyt, output=storage.join(w, "nyt", "captions"), model="tiny-instructblip", overwrite=True)))

    step("3. caption + evaluate with the untrained model")
    before = caption_and_score(cfg, eval_corpus, "captions_untrained", cfg.model)

    step("4. build the alignment tasks")
    tasks = storage.join(w, "tasks")
    built = alignment.run(alignment.BuildConfig(input=train_corpus, output=tasks, overwrite=True))
    print({k: built[k] for k in ("samples_in", "samples_with_tasks", "task_rows")})

    step("5. train (Ray Train + DeepSpeed ZeRO-3)")
    train_cfg = alignment_training.TrainConfig(
        data=tasks, model=cfg.model, output=storage.join(w, "runs"), run_name=f"demo-{int(started)}",
        num_workers=cfg.num_workers, zero_stage=cfg.zero_stage, max_steps=cfg.train_steps, epochs=100,
        lr=cfg.lr, checkpoint_every=max(1, cfg.train_steps // 2), freeze_vision=False)
    result = alignment_training.fit(train_cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    history = alignment_training.read_metrics(alignment_training.run_dir(train_cfg))
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over {history[-1]['step']} steps; "
          f"curves: {storage.join(alignment_training.run_dir(train_cfg), 'loss_curves.png')}")

    step("6. caption + evaluate with the trained model")
    after = caption_and_score(cfg, eval_corpus, "captions_trained", alignment_training.export_dir(train_cfg))

    print(f"\n=== training helped? ({time.time() - started:.0f} s in all)\n")
    print("| metric (x100) | untrained | trained |\n|---|---:|---:|")
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        print(f"| {name} | {pct(before['metrics'].get(name))} | {pct(after['metrics'].get(name))} |")
    for key in ("precision", "recall", "f1"):
        print(f"| entity {key} | {pct(before['entities']['all'][key])} | {pct(after['entities']['all'][key])} |")


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
