"""The one place that decides how many actors each stage gets and what each one reserves.

Sized from the cluster's resources so that a 2-CPU laptop never starves Ray Data's read and write
tasks (an actor pool holding every CPU hangs the stream with no error) and a GPU cluster puts one
model replica on each GPU.

GPU pools on a cluster that scales from zero: with device=cuda a pool's size is what the job asks
(`mllm_actors`, `caption_actors`, `actors`), else one replica per GPU up when the job starts; with
neither (no GPU up and no size given) the plan refuses in one line naming the key. The runner asks
the autoscaler for the whole pool and starts it with the replicas the GPUs up can hold, at least
one (`min_replicas`); Ray Data grows it to its size as GPUs join.
"""

from __future__ import annotations

import dataclasses
import math

from eama.engine import config


NER_GPU_SHARE = 0.25  # a spaCy transformer pipeline needs a slice of a GPU, not a whole one


def gpu_replicas(asked: int, gpus: float, each: float, key: str, taken: float = 0.0) -> int:
    """A GPU pool's size: `asked` (the job's `key`) when given, else one replica per `each` GPUs of
    the `gpus` up beside `taken` (at least one). ConfigError when nothing is given and no replica's
    GPUs are up: a cluster scaling from zero has nothing to count, so the size must be said."""
    if asked:
        return asked
    if gpus < each:
        raise config.ConfigError(
            f"device=cuda, but the cluster has {gpus:g} GPUs up, too few for one replica: set {key}=N, the "
            f"replicas to ask the autoscaler for (the pool starts on the first GPU to join and grows to N)")
    return max(1, int((gpus - taken) // each))


def min_replicas(actors: int, each: float, gpus: float) -> int:
    """The replicas a pool of `actors` GPU replicas (`each` GPUs apiece) starts with when `gpus` are
    up: as many as fit, at least one, at most the pool (then it is a fixed pool)."""
    return max(1, min(actors, int(gpus // each)))


@dataclasses.dataclass(frozen=True)
class StagePlan:
    io_cpus: float  # per read / decode / write task
    ner_actors: int
    ner_cpus: float
    ner_gpus: float
    mllm_actors: int
    mllm_cpus: float
    mllm_gpus: float
    caption_ner_actors: int
    caption_ner_cpus: float
    device: str  # where the MLLM runs: "cuda" or "cpu"

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("read/decode/write tasks", f"{self.io_cpus} CPU each"),
            ("spaCy (articles)", f"{self.ner_actors} actors x {self.ner_cpus} CPU" + (f" + {self.ner_gpus} GPU" if self.ner_gpus else "")),
            ("MLLM", f"{self.mllm_actors} actors x {self.mllm_cpus} CPU" + (f" + {self.mllm_gpus} GPU" if self.mllm_gpus else "") + f" on {self.device}"),
            ("spaCy (captions)", f"{self.caption_ner_actors} actors x {self.caption_ner_cpus} CPU"),
        ]


def plan_stages(
    cpus: float,
    gpus: float,
    device: str = "auto",
    mllm_actors: int = 0,
    gpus_per_mllm: float = 1.0,
    ner_actors: int = 0,
    ner_on_gpu: bool = False,
) -> StagePlan:
    """Plan the caption_corpus actor pools for a cluster with `cpus` CPUs and `gpus` GPUs.

    0 for an actor count means "derive it". On a small machine every actor takes a fraction of a
    CPU and at least ~0.75 CPU stays free for the I/O tasks. device=cuda plans GPU actors even when
    the cluster has no GPU yet, `mllm_actors` of them (ConfigError without it, gpu_replicas): the
    runner asks the autoscaler for them (runner.ensure_resources), so a GPU worker group that
    scales from zero starts, and the pool grows from the first GPU to mllm_actors."""
    use_gpu = device == "cuda" or (device == "auto" and gpus >= gpus_per_mllm)
    small = cpus <= 4
    io_cpus = 0.25 if small else 1.0
    ner_gpus = NER_GPU_SHARE if ner_on_gpu and gpus else 0.0
    ner_gpu_n = (ner_actors or 1) if ner_gpus else 0
    if use_gpu:
        # spaCy-on-GPU actors take a slice first
        mllm_n = gpu_replicas(mllm_actors, gpus, gpus_per_mllm, "mllm_actors", ner_gpu_n * ner_gpus)
        mllm_cpus, mllm_gpus = (0.5 if small else 1.0), gpus_per_mllm
    else:
        mllm_n = mllm_actors or max(1, int(cpus // 8))
        mllm_cpus, mllm_gpus = (0.5 if small else 4.0), 0.0
    reserved_io = 0.75 if small else max(2.0, 0.1 * cpus)
    cap_cpus = 0.25 if small else 1.0
    cap_n = 1 if small else max(1, mllm_n // 2)
    left = cpus - reserved_io - mllm_n * mllm_cpus - cap_n * cap_cpus
    if ner_gpus:
        ner_cpus, ner_n = (0.25 if small else 1.0), ner_gpu_n
    else:
        ner_cpus = 0.5 if small else 1.0
        ner_n = ner_actors or max(1, math.floor(max(left, ner_cpus) / ner_cpus))
    return StagePlan(io_cpus, ner_n, ner_cpus, ner_gpus, mllm_n, mllm_cpus, mllm_gpus, cap_n, cap_cpus,
                     "cuda" if use_gpu else "cpu")


@dataclasses.dataclass(frozen=True)
class ViewsPlan:
    """image_views' pools: OCR and ImageNet tagger on CPU, the captioner on a GPU when there is one."""

    io_cpus: float  # per read / decode / write task
    ocr_actors: int
    ocr_cpus: float
    tag_actors: int
    tag_cpus: float
    caption_actors: int
    caption_cpus: float
    caption_gpus: float
    device: str  # where the captioner runs: "cuda" or "cpu"


def ocr_replicas(left: float, share: float, cpus: float) -> int:
    """OCR actors of `share` CPU each in the `left` CPUs; each runs one thread, so never more
    than the machine's CPUs; at least one."""
    return max(1, min(int(left / share + 1e-9), int(cpus)))


def plan_views(cpus: float, gpus: float, views: tuple[str, ...], device: str = "auto", caption_actors: int = 0,
               gpus_per_caption: float = 1.0, ocr_actors: int = 0) -> ViewsPlan:
    """Plan image_views' actor pools for `cpus` CPUs and `gpus` GPUs; `views` names the pools that
    run (caption, ocr, tags). 0 actors means "derive it". Small machines (<= 4 CPUs) give every
    actor a fraction of a CPU and keep 0.75 CPU for the read / decode / write tasks; larger ones
    give the captioner one replica per GPU (device=cuda on a cluster with no GPU up needs
    caption_actors, gpu_replicas), the tagger 2 CPUs per 16 left; OCR, the CPU-heavy view, gets the
    rest on every machine (on 2 CPUs with ocr + tags: two OCR actors, not one and an idle core)."""
    use_gpu = "caption" in views and (device == "cuda" or (device == "auto" and gpus >= gpus_per_caption))
    small = cpus <= 4
    io_cpus = 0.25 if small else 1.0
    reserved_io = 0.75 if small else max(2.0, 0.1 * cpus)
    cap_n = cap_cpus = cap_gpus = 0
    if "caption" in views:
        if use_gpu:
            cap_n = gpu_replicas(caption_actors, gpus, gpus_per_caption, "caption_actors")
            cap_cpus, cap_gpus = (0.5 if small else 1.0), gpus_per_caption
        else:
            cap_n = caption_actors or max(1, int(cpus // 8))
            cap_cpus = 0.5 if small else 4.0
    left = cpus - reserved_io - cap_n * cap_cpus
    tag_n, tag_cpus = 0, 0.0
    if "tags" in views:
        tag_cpus = 0.25 if small else 2.0
        tag_n = 1 if small else max(1, int(left // 16))
        left -= tag_n * tag_cpus
    ocr_n, ocr_cpus = 0, 0.0
    if "ocr" in views:
        ocr_cpus = 0.5 if small else 2.0
        ocr_n = ocr_actors or ocr_replicas(left, ocr_cpus, cpus)
    return ViewsPlan(io_cpus, ocr_n, ocr_cpus, tag_n, tag_cpus, cap_n, float(cap_cpus), float(cap_gpus),
                     "cuda" if use_gpu else "cpu")


@dataclasses.dataclass(frozen=True)
class ModelPool:
    """One model stage's pool (a tagger, an encoder): replicas and what each reserves."""

    actors: int
    cpus: float
    gpus: float
    threads: int  # torch threads per replica on CPU
    io_cpus: float  # per read / commit task
    device: str  # "cuda" or "cpu"


def plan_model_pool(cpus: float, gpus: float, device: str = "auto", actors: int = 0,
                    gpus_per_actor: float = 1.0) -> ModelPool:
    """Size a job whose only heavy stage is one model: a replica per GPU, or on CPUs one per 8 CPUs
    sharing what the I/O tasks leave (on a small machine at least 0.75 CPU stays free for them).
    device=cuda plans GPU replicas before the cluster has GPUs, `actors` of them (gpu_replicas; the
    runner asks the autoscaler for them and starts on the first)."""
    use_gpu = device == "cuda" or (device == "auto" and gpus >= gpus_per_actor)
    small = cpus <= 4
    io_cpus = 0.25 if small else 1.0
    if use_gpu:
        n = gpu_replicas(actors, gpus, gpus_per_actor, "actors")
        return ModelPool(n, 0.5 if small else 1.0, gpus_per_actor, 1, io_cpus, "cuda")
    free = cpus - (0.75 if small else max(2.0, 0.1 * cpus))
    n = actors or max(1, int(free // 8))
    each = max(0.25, free / n)
    return ModelPool(n, round(each, 2), 0.0, max(1, int(each)), io_cpus, "cpu")


MODEL_GPU_SHARE = 0.25  # a tagger or keyphrase model (an encoder of ~100M parameters) needs a slice of a GPU


@dataclasses.dataclass(frozen=True)
class EnrichPlan:
    """enrich_posts' pools: the view stages (as image_views plans them) and one pool per model stage."""

    views: ViewsPlan
    models: ModelPool  # each model stage gets a pool of this shape

    def rows(self) -> list[tuple[str, str]]:
        v, m = self.views, self.models
        out = [("read/decode/write tasks", f"{v.io_cpus} CPU each")]
        for name, n, c, g in (("ocr", v.ocr_actors, v.ocr_cpus, 0.0), ("tags", v.tag_actors, v.tag_cpus, 0.0),
                              ("caption", v.caption_actors, v.caption_cpus, v.caption_gpus)):
            if n:
                out.append((name, f"{n} actors x {c} CPU" + (f" + {g} GPU" if g else "")))
        out.append(("each model stage", f"{m.actors} actors x {m.cpus} CPU" + (f" + {m.gpus} GPU" if m.gpus else "")
                    + f" on {m.device}, {m.threads} threads"))
        return out


def plan_enrich(cpus: float, gpus: float, views: tuple[str, ...], model_stages: int, device: str = "auto",
                caption_actors: int = 0, gpus_per_caption: float = 1.0, ocr_actors: int = 0,
                model_device: str = "cpu", model_actors: int = 0) -> EnrichPlan:
    """Plan enrich_posts from one view of the cluster: the model stages (taggers, keyphrase
    models) take their share first (a GPU slice each on cuda, else a quarter of the CPUs, one
    replica per 4; on a small machine one replica of 0.25 CPU), the view stages get the rest as
    image_views would, and on a small machine (<= 4 CPUs) every actor is cut to 0.25 CPU so the
    read / decode / write tasks keep 0.75 CPU however many pools run, and OCR, the heaviest view,
    gets as many 0.25-CPU actors as the rest leaves (one thread each, at most one per CPU)."""
    small = cpus <= 4
    caption_gpus = gpus_per_caption * gpu_replicas(caption_actors, gpus, gpus_per_caption, "caption_actors") if (
        "caption" in views and (device == "cuda" or (device == "auto" and gpus >= gpus_per_caption))) else 0.0
    spare_gpus = max(0.0, gpus - caption_gpus)
    on_gpu = model_device == "cuda" or (model_device == "auto" and spare_gpus >= 1)
    if on_gpu:
        n = gpu_replicas(model_actors, spare_gpus, 1.0, "model_actors")  # one replica per spare GPU
        models = ModelPool(n, 0.25 if small else 1.0, MODEL_GPU_SHARE, 1, 0.25 if small else 1.0, "cuda")
    elif small:
        models = ModelPool(model_actors or 1, 0.25, 0.0, 1, 0.25, "cpu")
    else:
        n = model_actors or max(1, int(cpus / 4 / max(1, model_stages) // 4))
        models = ModelPool(n, 4.0, 0.0, 4, 1.0, "cpu")
    taken = model_stages * models.actors * models.cpus
    plan = plan_views(max(1.0, cpus - taken) if not small else cpus, gpus, views, device, caption_actors,
                      gpus_per_caption, ocr_actors)
    if small:
        share = 0.25
        plan = dataclasses.replace(plan, ocr_cpus=min(plan.ocr_cpus, share), tag_cpus=min(plan.tag_cpus, share),
                                   caption_cpus=min(plan.caption_cpus, share))
        if "ocr" in views and not ocr_actors:  # OCR fills what the I/O reserve and the other pools leave
            left = cpus - 0.75 - taken - plan.tag_actors * plan.tag_cpus - plan.caption_actors * plan.caption_cpus
            plan = dataclasses.replace(plan, ocr_actors=ocr_replicas(left, share, cpus))
    return EnrichPlan(plan, models)
