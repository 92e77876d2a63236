"""The vLLM engine: one `vllm.LLM` per actor replica, fed raw prompts with `multi_modal_data`.

Why a `vllm.LLM` inside the runner's own actor stage rather than Ray Data LLM's processors
(`ray.data.llm`): the stage keeps the runner's exactly-once commits, error rows, bounded retries,
crash isolation and output lease unchanged (the engine is only the generation backend of the
stage); EAMA's rounds (selection prompts, then the caption prompt built from their answers) run on
the same engine, so the caption prompt finds the image + news-context head in that engine's prefix
cache, where chained processors would each hold their own engine; and the raw prompt +
multi_modal_data request is stable across vLLM versions (Ray 2.60's processors target vLLM 0.29,
whose chat module moved in 0.32).

Greedy decoding (temperature 0) in the model's dtype (bf16 on GPU, fp32 on CPU), automatic prefix
caching on, one image per prompt. On CPU the engine runs the replica's planned threads, unpinned
(`cpu_threads_env`): vLLM's own CPU default pins its threads to the node's first cores and keeps one
core back for its scheduler, which on a Ray node lays every replica on the same cores and on a
2-core machine halves the engine (measured: 1.81x slower). A request vLLM refuses (an image its processor cannot read, a
prompt over max_model_len) raises for the whole call; the stage redoes the chunk row by row
(isolation.isolate), so only that row is an error. An engine whose core process died raises
EngineDeadError, which faults.poisons_process names: the guard ends the actor, Ray starts a fresh
replica and the batch is redone there (isolation.py's crash markers). vLLM 0.32's offline client
does not raise when the core dies while a call waits for its outputs (the call would wait for
ever): `watch_engine` hands that wait an EngineDeadError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator, Sequence

from eama.engine import generation, hf

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU backend otherwise asks for 90% of the host's memory


def engine_args(location: str, device: str, max_model_len: int = 0, kv_cache_gib: float = 0.0,
                trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for eama's generation (module docstring)."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    args: dict[str, Any] = dict(model=location, tokenizer=location, dtype=dtype,
                                enable_prefix_caching=True, limit_mm_per_prompt={"image": 1}, seed=0,
                                load_format="safetensors",  # never unpickle a .bin checkpoint
                                trust_remote_code=trust_remote_code, revision=revision)
    if max_model_len:
        args["max_model_len"] = max_model_len
    if device == "cpu":
        args["enforce_eager"] = True  # no torch.compile: minutes of compiling for nothing on small batches
        kv_cache_gib = kv_cache_gib or CPU_KV_CACHE_GIB
    if kv_cache_gib:
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
    return args


@contextlib.contextmanager
def cpu_threads_env(device: str, threads: int) -> Iterator[dict[str, str]]:
    """While a CPU engine starts (its processes inherit the environment): `threads` OpenMP threads,
    left to the OS scheduler as Ray leaves every actor's threads (VLLM_CPU_OMP_THREADS_BIND=nobind),
    instead of vLLM's pinning to the node's first cores less one kept for its scheduler. Nothing
    changes on GPU, with threads <= 0 (vLLM's own choice) or where the user set the binding."""
    if device != "cpu" or threads <= 0 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        yield {}
        return
    settings = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def watch_engine(llm: Any, closing: threading.Event, poll: float = 0.5) -> bool:
    """Start a daemon thread that, once vLLM marks its engine core dead (and `closing` is not
    set), puts an EngineDeadError where a waiting `generate` reads its outputs, so that the call
    raises instead of waiting for ever. False where this vLLM's client has another layout."""
    client = getattr(llm.llm_engine, "engine_core", None)
    resources, outputs = getattr(client, "resources", None), getattr(client, "outputs_queue", None)
    if resources is None or outputs is None or not hasattr(resources, "engine_dead"):
        return False

    def wait_for_death() -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not resources.engine_dead and not closing.is_set():
            time.sleep(poll)
        if closing.is_set():
            return
        log.error("vLLM's engine core process ended: a call waiting on it fails with EngineDeadError")
        outputs.put_nowait(EngineDeadError())

    threading.Thread(target=wait_for_death, name="eama-vllm-engine-watch", daemon=True).start()
    return True


class VllmGenerator:
    """A vLLM engine over one image-text model (a local folder or hub id) for `family`'s prompts."""

    name = "vllm"

    def __init__(self, location: str, family: str, device: str = "cpu", max_model_len: int = 0,
                 kv_cache_gib: float = 0.0, trust_remote_code: bool = False, revision: str | None = None,
                 threads: int = 0) -> None:
        from transformers import AutoProcessor
        from vllm import LLM

        self.family = family
        with cpu_threads_env(device, threads) as env:
            if env:
                log.info("vLLM on CPU: %s threads, unpinned", threads)
            self.llm = LLM(**engine_args(location, device, max_model_len, kv_cache_gib, trust_remote_code, revision))
        self.token_limit = int(self.llm.llm_engine.model_config.max_model_len)
        self.closing = threading.Event()
        watch_engine(self.llm, self.closing)
        processor = AutoProcessor.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision)
        self.tokenizer = processor.tokenizer
        self.counter = generation.PromptCounter(processor, family)

    def prompt_tokens(self, instructions: Sequence[str]) -> list[int]:
        return self.counter.count(instructions)

    def close(self) -> None:
        """Stop the engine core process now (else it stops when this process exits)."""
        self.closing.set()
        shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown:
            shutdown()

    def reset_cache(self) -> None:
        """Empty the prefix cache (benchmarks: every timed run starts cold)."""
        self.llm.reset_prefix_cache()

    def generate(self, instructions: Sequence[str], images: Sequence[Any], max_new_tokens: int,
                 regexes: Sequence[str | None] | None = None) -> generation.Generated:
        """Greedy answers, the i-th to instruction i about image i; a regex constrains that answer."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if not instructions:
            return generation.Generated([], [], [])
        regexes = regexes or [None] * len(instructions)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(regex=r) if r else None) for r in regexes]
        requests = [{"prompt": hf.format_prompt(self.family, text), "multi_modal_data": {"image": image}}
                    for text, image in zip(instructions, images)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return generation.Generated([o.outputs[0].text.strip() for o in outs],
                                    [len(o.prompt_token_ids or ()) for o in outs],
                                    [int(o.num_cached_tokens or 0) for o in outs])
