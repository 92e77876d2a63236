"""demo: the whole EAMA loop on the generated demo corpus, on local Ray, with tiny models.

    python jobs/demo.py [--nyt ../shared/data/news_sample] [key=value ...]

1. generate the demo corpus (a training split and a held-out split);
2. optionally import a real GoodNews-style sample (caption.json + images/) and caption it;
3. caption the held-out split with the untrained tiny model, and score one fixed caption (the most
   frequent training caption) as the template-only baseline;
4. build EAMA's three alignment tasks, and the plain captioning task of the 'Base' ablation;
5. train both the same way with Ray Train + DeepSpeed (ZeRO-2, 2 workers) and export them;
6. caption the held-out split with each (eama mode with eama's model, plain mode with Base's);
7. compare: caption scores, entity P/R/F1 and distinct captions, and whether the demo's goals hold.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

import ray
import ray.data

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from eama.engine import config, storage  # noqa: E402
from eama.engine.training.progress import show_progress  # noqa: E402
from eama.news import alignment, alignment_training, caption_job, demo, evaluation, importers  # noqa: E402


@dataclasses.dataclass
class DemoConfig:
    workdir: str = "demo_out"  # everything the demo writes
    model: str = "tiny-llava"  # the model both trainings start from (tiny-llava | tiny-instructblip | a path)
    train_samples: int = 256  # generated training samples
    eval_samples: int = 48  # generated held-out samples (another seed)
    nyt: str = ""  # a GoodNews-style folder (caption.json + images/) to import and caption
    train_steps: int = 700  # optimizer steps of each training (eama and Base)
    lr: float = 2e-3  # peak learning rate (cosine decay); a tiny model from scratch takes a high one
    micro_batch_size: int = 8  # rows per worker per step
    num_workers: int = 2  # Ray Train workers
    zero_stage: int = 2  # DeepSpeed ZeRO stage (3 partitions the parameters too: about 1.8x the step time of this tiny model on CPU)
    baselines: bool = True  # also train and caption with plain mode (Base); false halves the demo's time


# What the demo sets out to show at its scale (demo.goal_lines): captions that follow the inputs
# (not one template), entities that a fixed caption does not get, eama's selections beating Base.
MIN_DISTINCT_SHARE = 40 / 48


FLAGS = [config.Flag("--nyt", "nyt", "GoodNews-style folder (caption.json + images/) to import and caption")]


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def score(cfg: DemoConfig, captions: str, name: str) -> dict:
    report_dir = storage.join(cfg.workdir, f"{name}_report")
    report = evaluation.evaluate(evaluation.validate(evaluation.EvaluateConfig(input=captions, output=report_dir)))
    evaluation.write_report(report, report_dir)
    print(f"{name}: {demo.headline(report)}  (report: {report_dir}/report.md)")
    return report


def caption_and_score(cfg: DemoConfig, corpus: str, name: str, model: str, mode: str = "eama") -> dict:
    out = storage.join(cfg.workdir, name)
    caption_job.run(caption_job.CaptionCorpusConfig(input=corpus, output=out, model=model, mode=mode,
                                                    overwrite=True))
    return score(cfg, out, name)


def train(cfg: DemoConfig, tasks: str, run_name: str) -> str:
    """Train on `tasks` with the demo's recipe; return the export folder."""
    train_cfg = alignment_training.TrainConfig(
        data=tasks, model=cfg.model, output=storage.join(cfg.workdir, "runs"), run_name=run_name,
        num_workers=cfg.num_workers, zero_stage=cfg.zero_stage, max_steps=cfg.train_steps, epochs=1000,
        micro_batch_size=cfg.micro_batch_size, lr=cfg.lr, checkpoint_every=cfg.train_steps, freeze_vision=False)
    result = alignment_training.fit(train_cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    history = alignment_training.read_metrics(alignment_training.run_dir(train_cfg))
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over {history[-1]['step']} steps; "
          f"curves: {storage.join(alignment_training.run_dir(train_cfg), 'loss_curves.png')}")
    return alignment_training.export_dir(train_cfg)


def check(cfg: DemoConfig) -> None:
    """Settings (ConfigError) and the --nyt folder (UserError), before Ray starts."""
    for key in ("train_samples", "eval_samples", "train_steps", "num_workers", "micro_batch_size"):
        if getattr(cfg, key) < 1:
            raise config.ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise config.ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    config.require_local_if_named(cfg.model, "model")
    if cfg.nyt:
        for need in ("caption.json", "images"):
            config.require_path(os.path.join(cfg.nyt, need), f"--nyt {need}")


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    cfg = config.parse_args(DemoConfig, __doc__.splitlines()[0], FLAGS, argv)
    check(cfg)
    started = time.time()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # worker logs stay in /tmp/ray/session_latest/logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    show_progress(sys.stdout)  # the training's plan and progress lines, relayed from rank 0
    w, run = cfg.workdir, int(started)

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
        print(caption_job.summary(caption_job.run(caption_job.CaptionCorpusConfig(
            input=nyt, output=storage.join(w, "nyt", "captions"), model="tiny-instructblip", overwrite=True))))

    step("3. baselines: the untrained model, one fixed caption")
    reports = {"untrained": caption_and_score(cfg, eval_corpus, "captions_untrained", cfg.model)}
    fixed = demo.most_frequent_caption(train_corpus)
    reports["fixed caption"] = score(cfg, demo.write_fixed_captions(eval_corpus, fixed, storage.join(w, "captions_fixed")),
                                     "captions_fixed")

    step("4. build the alignment tasks (eama) and the plain captioning task (Base)")
    tasks = {"eama": alignment.BuildConfig(input=train_corpus, output=storage.join(w, "tasks"), overwrite=True)}
    if cfg.baselines:
        tasks["plain"] = alignment.BuildConfig(input=train_corpus, output=storage.join(w, "tasks_plain"), overwrite=True,
                                               tasks=["captioning"], supplement_captioning=False)
    for mode, build in tasks.items():
        built = alignment.run(build)
        print(mode, {k: built[k] for k in ("samples_in", "samples_with_tasks", "task_rows")})

    for mode, build in tasks.items():
        step(f"5. train {mode} (Ray Train + DeepSpeed ZeRO-{cfg.zero_stage}), then caption with it in {mode} mode")
        export = train(cfg, build.output, f"demo-{mode}-{run}")
        label = "eama, trained" if mode == "eama" else "plain (Base), trained"
        reports[label] = caption_and_score(cfg, eval_corpus, f"captions_{mode}", export, mode)

    print(f"\n=== what training did ({time.time() - started:.0f} s in all)\n")
    print(demo.comparison(reports))
    print()
    print("\n".join(demo.goal_lines(reports, MIN_DISTINCT_SHARE)))
    return reports


if __name__ == "__main__":
    config.main(main, sys.argv[1:])
