"""GPU paths: run where CUDA is visible (e.g. `pytest -m gpu` on a GPU node); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from conftest import load_job
from eama.engine import images
from eama.news import demo, models

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible"),
]


def test_tiny_model_generates_in_bf16_on_cuda():
    lm = models.load_model("tiny-llava", device="cuda")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    imgs = [images.load_rgb(images.normalize_image(s["image"])) for s in demo.generate_samples(4, seed=2)]
    answers = models.generate_text(lm, ["Write the caption."] * 4, imgs, max_new_tokens=6)
    assert len(answers) == 4


def test_caption_corpus_places_one_mllm_actor_per_gpu(ray_local, demo_corpus, tmp_path):
    cap = load_job("caption_corpus")
    manifest = cap.main(["--input", str(demo_corpus), "--output", str(tmp_path / "out"), "device=cuda",
                         "max_new_tokens=8"])
    assert manifest["this_run"]["written"] == 24
    assert "GPU" in manifest["plan"]["MLLM"] and "cuda" in manifest["plan"]["MLLM"]


def test_real_shape_random_model_fits_and_generates():
    lm = models.build_real_shape("instructblip-vicuna-7b", "cuda", num_layers=2)
    imgs = [images.load_rgb(images.normalize_image(s["image"])) for s in demo.generate_samples(2, seed=3)]
    assert len(models.generate_text(lm, ["Write the caption."] * 2, imgs, max_new_tokens=4)) == 2
