"""tokenprune.load through the real from_pretrained path, on a tiny model saved locally."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.zoo.tiny import tiny_llava


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_load_equals_wrap(saved_llava):
    path, model, processor = saved_llava
    loaded = tp.load(str(path))
    wrapped = tp.wrap(model, processor)
    p = tp.create_pruner("fopru_rank", ratio=0.25)
    a = loaded.generate([image()], ["what is in the image ?"], pruner=p, max_new_tokens=4)
    b = wrapped.generate([image()], ["what is in the image ?"], pruner=p, max_new_tokens=4)
    assert torch.equal(a.token_ids, b.token_ids) and a.stats == b.stats
    assert a.stats[0].visual_tokens_kept == 16 and a.stats[0].visual_tokens_in == 64


def test_load_refuses_unsupported_model_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(tp.UnknownNameError, match="supported: .*llava"):
        tp.load(str(tmp_path))


def test_generate_input_errors(saved_llava):
    _, model, processor = saved_llava
    lvlm = tp.wrap(model, processor)
    with pytest.raises(tp.OptionError, match="1 visuals and 2 prompts; give one image, list of images or video per prompt"):
        lvlm.generate([image()], ["a", "b"])
    with pytest.raises(tp.OptionError, match="max_new_tokens"):
        lvlm.generate([image()], ["a"], max_new_tokens=0)
    with pytest.raises(tp.OptionError, match="do_sample=True is not supported"):
        lvlm.generate([image()], ["a"], do_sample=True)
    out = lvlm.generate([image()], ["a"], max_new_tokens=2, do_sample=False, num_beams=1, temperature=0)
    assert out.stats[0].new_tokens >= 1


@pytest.mark.parametrize("name", ["fopru_rank", "fastv", "pool"])
def test_bfloat16_runs_and_counts_the_same(name):
    model, processor = tiny_llava()
    lvlm32 = tp.wrap(model, processor)
    p = tp.create_pruner(name, ratio=0.25)
    ref = lvlm32.generate([image()], ["what is in the image ?"], pruner=p, max_new_tokens=3)
    lvlm16 = tp.wrap(model.to(torch.bfloat16), processor)
    out = lvlm16.generate([image()], ["what is in the image ?"], pruner=p, max_new_tokens=3)
    assert out.stats[0].tokens_per_layer == ref.stats[0].tokens_per_layer
    assert torch.isfinite(out.first_logits).all()
    # bf16 logits stay close to fp32 ones on a tiny model (loose: bf16 has 8 bits of mantissa)
    assert (out.first_logits - ref.first_logits).abs().max().item() < 0.1
