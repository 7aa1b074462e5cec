"""Downsample (``downsample``): hand-computed sizes and factors; the official image path transcribed from
Chenfei-Liao/VTC-Bench@983e443 (``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py`` ``Qwen2_VL.generate_until``
L243-281, then qwen_vl_utils ``fetch_image``'s decode) on random images: identical pixels, and the processor's
tensors in the model identical to the processor run on the official image; on every tiny family: ratio 1.0 (no
JPEG) == unpruned, the visual tokens the LLM receives (forward pre-hooks) == the processor's count for the shrunk
image, cached == uncached, batch of 2 == alone; video frames shrunk.
"""
from __future__ import annotations

import base64
import inspect
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
import tokenprune.methods.downsample as ds  # registers "downsample" (methods/__init__.py does not import it yet)
from tokenprune.adapters.base import PrunableLVLM
from tokenprune.adapters.visuals import shrink_image, shrink_size, shrink_visual, transform_visuals
from tokenprune.pruner import PrunerNeeds, PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs

from test_adapters import FAMILIES, PROMPTS, LayerInputCounter, lvlm_for
from tokenprune.testing import check_cached_and_batched

pytestmark = pytest.mark.usefixtures("one_torch_thread", "encode_hook")  # see conftest.py
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def encode_hook():
    """The encode hook of /work/notes/downsample_base.diff until it lands in base.py: ``transform_visuals(images,
    needs)`` before the processor, nothing else."""
    if "transform_visuals" in inspect.getsource(PrunableLVLM.encode):
        yield
        return
    original = PrunableLVLM.encode

    def encode(self, images, prompts, needs=None, chat_template=True):
        return original(self, transform_visuals(images, needs), prompts, needs, chat_template=chat_template)

    PrunableLVLM.encode = encode
    yield
    PrunableLVLM.encode = original


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth random RGB image ``size = (w, h)`` (JPEG of pure noise is all artefacts)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, size[1] // 8), max(2, size[0] // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


# -- hand-computed ---------------------------------------------------------------------------------
def test_hand_computed_factors_and_sizes():
    assert [ds.factor_for(b) for b in (1.0, 0.25, 0.1111, 0.0625, 0.04, 0.01)] == [1, 2, 3, 4, 5, 10]  # VTC-Bench's pairs
    assert ds.factor_for(0.5) == pytest.approx(1.41421356) and ds.factor_for(0.1) == pytest.approx(3.16227766)
    assert shrink_size((100, 61), 3) == (33, 20)  # w // 3, h // 3
    assert shrink_size((100, 61), ds.factor_for(0.5)) == (70, 43)  # floor(70.71), floor(43.13)
    assert shrink_size((7, 5), 10) == (1, 1)  # never below one pixel
    img = photo((100, 61))
    assert shrink_image(img, 3).size == (33, 20) and shrink_image(img, 1, jpeg=False) is img
    assert shrink_image(img, 1).size == (100, 61) and shrink_image(img, 1).tobytes() != img.tobytes()  # JPEG at r = 1
    p = tp.create_pruner("downsample", ratio=0.25)
    assert p.shrink == 2 and p.uses_ratio and p.needs == ds.DownsampleNeeds(factor=2.0)
    assert p.needs != PrunerNeeds() and hash(p.needs) != hash(tp.create_pruner("downsample", ratio=0.1111).needs)
    assert tp.create_pruner("downsample", factor=4, ratio=0.9).shrink == 4 and not tp.create_pruner("downsample", factor=4).uses_ratio
    red = p(PruningInputs(tokens=torch.randn(2, 6, 3), grid=(2, 3)))  # every token of the shrunk image stays
    assert red.indices.tolist() == [list(range(6))] * 2 and red.grid == (2, 3)
    for ratio in (1.0, 0.5, 0.1):
        check_pruner_contract(tp.create_pruner("downsample", ratio=ratio), synthetic_inputs(grid=(6, 8)))


def test_bad_options_are_one_line():
    for kwargs, match in [({"factor": 0.5}, "factor must be >= 1"), ({"factor": "x"}, "factor must be a number"),
                          ({"jpeg": "yes"}, "jpeg must be true or false"), ({"quality": 0}, "quality must be >= 1"),
                          ({"quality": 100}, "quality must be in 1..95"), ({"video": 1}, "video must be true or false"),
                          ({"ratio": 1.5}, r"\(0, 1\]")]:
        with pytest.raises(tp.OptionError, match=match) as exc:
            tp.create_pruner("downsample", **kwargs)
        assert "\n" not in str(exc.value)


# -- the official image path, transcribed ------------------------------------------------------------------
def official_downsample(visual: Image.Image, image_ratio: int) -> Image.Image:
    """VTC-Bench qwen2_vl.py ``generate_until`` L253-265 (single image) and qwen_vl_utils ``fetch_image`` (decode of the
    ``data:image/jpeg;base64`` string, ``convert("RGB")``), before its ``smart_resize``."""
    if image_ratio > 1:
        w, h = visual.size
        visual = visual.resize((w // image_ratio, h // image_ratio), resample=Image.BICUBIC)
    base64_image = visual.convert("RGB")
    buffer = BytesIO()
    base64_image.save(buffer, format="JPEG")
    base64_bytes = base64.b64encode(buffer.getvalue())
    base64_string = base64_bytes.decode("utf-8")
    image = f"data:image/jpeg;base64,{base64_string}"
    _, base64_data = image.split("base64,", 1)
    data = base64.b64decode(base64_data)
    image_obj = Image.open(BytesIO(data))
    return image_obj.convert("RGB")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget", ["1", "0.25", "0.1111", "0.0625", "0.04", "0.01"])  # analyze_results.py's
def test_shrunk_image_equals_official_on_random_images(seed, budget):
    r = {"1": 1, "0.25": 2, "0.1111": 3, "0.0625": 4, "0.04": 5, "0.01": 10}[budget]  # BUDGET_TO_DOWNSAMPLE
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
    img = photo(size, seed)
    if seed == 2:
        img = img.convert("RGBA")  # the official converts to RGB before saving
    p = tp.create_pruner("downsample", ratio=float(budget))
    ours = p.needs.transform_visual(img)
    ref = official_downsample(img, r)
    assert ours.size == ref.size == (size[0] // r, size[1] // r) and ours.mode == "RGB"
    assert ours.tobytes() == ref.tobytes()
    two = p.needs.transform_visual([img, photo((64, 48), seed + 10)])  # a multi-image prompt: each image
    assert [x.tobytes() for x in two] == [ref.tobytes(), official_downsample(photo((64, 48), seed + 10), r).tobytes()]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_processor_gets_the_official_image(family):
    lvlm = lvlm_for(family)
    img = photo((160, 112), 4)
    p = tp.create_pruner("downsample", ratio=0.25)
    enc = lvlm.encode([img], PROMPTS[:1], lvlm.vision_needs(p))
    ref = lvlm.prepare([official_downsample(img, 2)], PROMPTS[:1])
    assert torch.equal(enc.batch["input_ids"].cpu(), ref["input_ids"])
    assert torch.equal(enc.batch["pixel_values"].cpu(), ref["pixel_values"])


# -- every family --------------------------------------------------------------------------------------
def n_visual(lvlm, visual, prompt) -> int:
    """The visual tokens the processor makes of ``visual`` (LLaVA-NeXT's newlines left out)."""
    batch = lvlm.prepare([visual], [prompt])
    return sum(v.tokens.shape[0] for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_every_family(family):
    lvlm = lvlm_for(family)
    imgs = [photo((224, 224), 0), photo((176, 240), 1)]
    ref = lvlm.generate(imgs, PROMPTS, max_new_tokens=NEW_TOKENS)
    one = lvlm.generate(imgs, PROMPTS, pruner=tp.create_pruner("downsample", ratio=1.0, jpeg=False), max_new_tokens=NEW_TOKENS)
    assert torch.equal(one.token_ids, ref.token_ids)
    assert (one.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    p = tp.create_pruner("downsample", ratio=0.0625)  # r = 4
    shrunk = official_downsample(imgs[0], 4)
    n_full, n_small = n_visual(lvlm, imgs[0], PROMPTS[0]), n_visual(lvlm, shrunk, PROMPTS[0])
    batch = lvlm.prepare([shrunk], PROMPTS[:1])
    n_text = batch["input_ids"].shape[1] - n_small
    counter = LayerInputCounter(lvlm.runner.layers)  # what each decoder layer receives, measured inside the model
    try:
        out = lvlm.generate(imgs[:1], PROMPTS[:1], pruner=p, max_new_tokens=1)
    finally:
        counter.close()
    assert [counter.lengths[i][0] for i in range(len(lvlm.runner.layers))] == [n_text + n_small] * len(lvlm.runner.layers)
    assert out.stats[0].visual_tokens_kept == out.stats[0].visual_tokens_in == n_small
    if family.startswith("qwen"):  # dynamic resolution: the shrunk image has fewer tokens
        assert n_small < n_full
    elif family == "llava":  # fixed input size: the same count, less detail
        assert n_small == n_full
    else:  # any-res crops, InternVL tiles: as many or fewer (the tiny InternVL: 160 px 80 tokens, 40 px 16)
        assert n_small <= n_full

    check_cached_and_batched(lvlm, imgs, PROMPTS, p, NEW_TOKENS)


def test_video_frames_are_shrunk_and_official_no_op_kept():
    video = tp.Video.from_frames([np.asarray(photo((64, 48), i)) for i in range(4)], fps=2.0)
    small = shrink_visual(video, 2.0)
    assert small.size == (24, 32) and small.num_frames == 4 and small.indices == video.indices and small.fps == video.fps
    ref = np.stack([np.asarray(f.resize((32, 24), Image.BICUBIC)) for f in video.pil_frames()])
    assert np.array_equal(small.frames, ref)  # resized only: no JPEG on frames
    assert shrink_visual(video, 2.0, video=False) is video
    lvlm = lvlm_for("qwen2_vl")
    full = lvlm.generate([video], PROMPTS[:1], max_new_tokens=1)
    out = lvlm.generate([video], PROMPTS[:1], pruner=tp.create_pruner("downsample", ratio=0.25), max_new_tokens=1)
    assert out.stats[0].visual_tokens_in < full.stats[0].visual_tokens_in
    same = lvlm.generate([video], PROMPTS[:1], pruner=tp.create_pruner("downsample", ratio=0.25, video=False), max_new_tokens=1)
    assert torch.equal(same.first_logits, full.first_logits)
