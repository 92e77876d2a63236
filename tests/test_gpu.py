"""GPU paths: run where CUDA is visible (e.g. `pytest -m gpu` on a GPU node); skipped elsewhere."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from conftest import load_job
from eama.engine import images
from eama.news import demo, models
from test_caption_corpus import read_output

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible"),
]

PROMPTS = ["Write the caption.", "Who is pictured?", "Write the news caption of this image.", "Where is this?"]


def demo_images(n: int, seed: int) -> list:
    return [images.load_rgb(images.normalize_image(s["image"])) for s in demo.generate_samples(n, seed=seed)]


def test_tiny_model_generates_on_cuda_as_on_cpu():
    """The same weights give the CPU's greedy answers on CUDA in fp32 (TF32 off), and in bf16 the
    next-token logits stay those of fp32 up to bf16 rounding."""
    imgs = demo_images(4, seed=2)
    cpu = models.load_model("tiny-llava")
    expected = models.generate_text(cpu, PROMPTS, imgs, max_new_tokens=6)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = models.load_model("tiny-llava", device="cuda", dtype=torch.float32)
        assert models.generate_text(fp32, PROMPTS, imgs, max_new_tokens=6) == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    bf16 = models.load_model("tiny-llava", device="cuda")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    prompts = [models.format_prompt("llava", p) for p in PROMPTS]
    with torch.no_grad():
        want = cpu.model(**models.encode(cpu, prompts, imgs)).logits[:, -1]
        got = bf16.model(**models.encode(bf16, prompts, imgs)).logits[:, -1].float().cpu()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999
    assert len(models.generate_text(bf16, PROMPTS, imgs, max_new_tokens=6)) == 4  # bf16 batched generate runs


def test_caption_corpus_places_one_mllm_actor_per_gpu(ray_local, demo_corpus, tmp_path):
    cap = load_job("caption_corpus")
    manifest = cap.main(["--input", str(demo_corpus), "--output", str(tmp_path / "out"), "device=cuda",
                         "max_new_tokens=8"])
    assert "GPU" in manifest["plan"]["MLLM"] and "cuda" in manifest["plan"]["MLLM"]
    # every input sample is captioned exactly once, and nothing failed
    wanted = sorted(pq.read_table(str(demo_corpus), columns=["sample_id"]).column("sample_id").to_pylist())
    rows, errs = read_output(str(tmp_path / "out"))
    assert len(wanted) == 24 and sorted(rows.column("sample_id").to_pylist()) == wanted
    assert manifest["this_run"]["written"] == 24 and errs.num_rows == 0


def llama_layer_parameters(hidden: int, intermediate: int) -> int:
    """One Llama decoder layer without biases: q, k, v, o (hidden^2 each), gate, up, down, two norms."""
    return 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def test_real_shape_random_model_fits_and_generates():
    lm = models.build_real_shape("instructblip-vicuna-7b", "cuda", num_layers=2)
    # Vicuna-7B's published dimensions: hidden 4096, MLP 11008, vocabulary 32001 (untied head)
    language = sum(p.numel() for p in lm.model.language_model.parameters())
    assert language == 2 * 32001 * 4096 + 2 * llama_layer_parameters(4096, 11008) + 4096
    assert lm.model.query_tokens.shape == (1, 32, 768)  # 32 query tokens of the 768-wide Q-Former
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in lm.model.parameters())
    imgs = demo_images(2, seed=3)
    inputs = models.encode(lm, [models.format_prompt("instructblip", "Write the caption.")] * 2, imgs)
    out = lm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)  # the prompt, then exactly 4 new tokens
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]].cpu(), inputs["input_ids"].cpu())


def test_local_launcher_trains_on_the_gpu_as_on_the_cpu(tmp_path):
    """launcher=local use_gpu=true: the toy task's fp32 losses on CUDA (TF32 off) follow the CPU's."""
    from test_training import ToyClassifierTask, ToyConfig, write_toy

    from eama.engine.training import launch
    from eama.engine.training.config import run_dir
    from eama.engine.training.metrics import read_metrics

    common = dict(data=write_toy(tmp_path), output=str(tmp_path / "runs"), launcher="local", num_workers=2,
                  micro_batch_size=8, epochs=2, lr=1e-2, warmup_ratio=0.1, checkpoint_every=16)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        losses = {}
        for name, gpu in (("cpu", False), ("gpu", True)):
            cfg = ToyConfig(run_name=name, use_gpu=gpu, **common)
            assert launch.fit(ToyClassifierTask(cfg)).error is None
            losses[name] = [r["loss"] for r in read_metrics(run_dir(cfg))]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert len(losses["gpu"]) == 32
    torch.testing.assert_close(torch.tensor(losses["gpu"]), torch.tensor(losses["cpu"]), rtol=1e-3, atol=1e-4)
