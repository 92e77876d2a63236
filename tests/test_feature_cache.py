"""Frozen image features are computed once per image in training: the cache's bound and order,
and the BGA / keyphrase inputs it feeds equal the uncached ones."""

from __future__ import annotations

import torch

from eama.engine import feature_cache
from eama.keyphrase import training as kp_training
from eama.mner import bga, bga_tagger


def test_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = feature_cache.FeatureCache(max_mb=2.5)
    mib = [torch.full((2**18,), float(i)) for i in range(3)]  # 1 MiB each (float32)
    cache.put("a", mib[0])
    cache.put("b", mib[1])
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", mib[2])  # 3 MiB > 2.5: the least recently used (b) leaves
    assert cache.get("b") is None and len(cache) == 2 and cache.bytes == 2 * 2**20
    assert torch.equal(cache.get("a"), mib[0]) and torch.equal(cache.get("c"), mib[2])
    cache.put("huge", torch.zeros(2**20))  # 4 MiB, more than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    assert feature_cache.FeatureCache(0).max_bytes == 0


def test_image_keys_follow_content_not_sample_ids():
    assert feature_cache.image_key(b"abc") == feature_cache.image_key(b"abc") != feature_cache.image_key(b"abd")
    assert feature_cache.image_key(None, "s3://b/x.jpg") == "uri:s3://b/x.jpg"
    assert feature_cache.image_key(None, None) is None


def test_bga_inputs_from_the_cache_equal_fresh_ones_and_skip_the_encoder(shared_data):
    from transformers import AutoTokenizer

    from eama.engine import encoders

    photos = [p.read_bytes() for p in sorted((shared_data / "news_sample" / "images").iterdir())[:3]]
    rows = [{"sample_id": f"s{i}", "tokens": ["x"], "image": p} for i, p in enumerate(photos)]
    rows.append({"sample_id": "bad", "tokens": ["y"], "image": b"not an image"})
    tok = AutoTokenizer.from_pretrained(encoders.locate("minilm"))
    spec = bga.BgaSpec(vision="efficientnet", image_width=1280, caption_proxy=False)
    fresh = bga_tagger.visual_inputs(rows, tok, spec)
    cache = feature_cache.FeatureCache(64)
    first = bga_tagger.visual_inputs(rows, tok, spec, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 3)  # the undecodable image is not kept
    # another split reusing the ids with other images, and the same images under new ids
    again = [dict(r, sample_id=f"t{i}") for i, r in enumerate(rows)]
    second = bga_tagger.visual_inputs(again, tok, spec, cache=cache)
    assert cache.hits == 3 and list(second["undecodable"]) == [3]
    for out in (first, second):
        assert torch.allclose(out["image_features"], fresh["image_features"], atol=1e-5)
        assert out["image_mask"].any(1).tolist() == [True, True, True, False]
    swapped = [dict(rows[0], image=photos[1]), dict(rows[1], image=photos[0])]  # ids kept, images swapped
    third = bga_tagger.visual_inputs(swapped, tok, spec, cache=cache)
    assert torch.allclose(third["image_features"][0], fresh["image_features"][1], atol=1e-5)


def test_keyphrase_region_features_from_the_cache_equal_fresh_ones(shared_data):
    photos = [p.read_bytes() for p in sorted((shared_data / "news_sample" / "images").iterdir())[:2]]
    rows = [{"sample_id": "a", "image": photos[0]}, {"sample_id": "b", "image": None},
            {"sample_id": "c", "image": photos[1]}]
    fresh, has = kp_training.region_features(rows, True)
    cache = feature_cache.FeatureCache(64)
    for expected_hits in (0, 2):
        cached, has_cached = kp_training.region_features(rows, True, cache)
        assert cache.hits == expected_hits
        assert torch.allclose(cached, fresh, atol=1e-5) and has_cached.tolist() == has.tolist() == [True, False, True]
    assert float(cached[1].abs().sum()) == 0
