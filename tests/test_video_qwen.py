"""Video and multi-image prompts on Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tiny models).

What is checked, against references that do not share tokenprune's code path:
1. the torchvision-free video preprocessor: a clip of two equal frames gives the pixels of the
   Hugging Face PIL image processor bit for bit; resize targets hand-computed from Qwen's rules
   (per-frame budget for Qwen2/2.5-VL, over ``t * h * w`` for Qwen3-VL); odd frame counts padded
   with the last frame; frame sampling refused;
2. a video of two equal frames gives exactly the image path's tokens (and DeepStack features, and
   vision attention);
3. unpruned video (4 frames at the model's patch multiples, and 3 frames that are resized) and
   multi-image prompts: logits == the Hugging Face forward on the same processor tensors, tokens ==
   Hugging Face ``generate``;
4. views: one per image / per temporal patch, ``seq_index`` == that temporal patch's
   ``<|video_pad|>`` positions, frame / time / clip / image fields, Qwen3-VL's timestamp text,
   Qwen2.5-VL's ``second_per_grid_ts``; vision attention per temporal patch == an eager reference;
5. every built-in pruner on a batch of (video, two images): ratio 1.0 == unpruned, tokens entering
   each decoder layer == the budget (video and multi-image), cached == uncached, batch == alone.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.adapters import wrap
from tokenprune.errors import OptionError
from tokenprune.media import Video
from tokenprune.media.processors.qwen import QwenVideoProcessor
from tokenprune.pruner import PrunerNeeds
from tokenprune.zoo import tiny
from video_checks import BUILTIN_PRUNERS, check_counts, check_pruner_on, check_unpruned_matches_hf

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@functools.lru_cache(maxsize=None)
def lvlm_for(family: str):
    return wrap(*getattr(tiny, f"tiny_{family}")())


def unit(family: str) -> int:
    """Pixels per merged token side: 2 x patch (8 px tiny Qwen2/2.5-VL, 16 px tiny Qwen3-VL)."""
    return 32 if family.startswith("qwen3") else 16


def frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def clip(family: str) -> Video:
    """4 frames of 4x4 merged tokens (no resize), source fps 4: times 0, .25, .5, .75 s."""
    u = unit(family)
    return Video.from_frames(frames(4, 4 * u, 4 * u, seed=1), fps=4.0)


def resized_clip(family: str) -> Video:
    """3 frames (padded to 4) of a size that is not a patch multiple: resized."""
    size = (100, 140) if family.startswith("qwen3") else (72, 100)
    return Video.from_frames(frames(3, *size, seed=2), fps=1.0)


def two_images(family: str) -> list[Image.Image]:
    """Two images of different sizes (no resize): 4x5 and 3x4 tokens (Qwen2/2.5), 5x5 and 5x6 (Qwen3)."""
    u = unit(family)
    shapes = [(5 * u, 5 * u), (5 * u, 6 * u)] if family.startswith("qwen3") else [(4 * u, 5 * u), (3 * u, 4 * u)]
    return [Image.fromarray(frames(1, h, w, seed=3 + i)[0]) for i, (h, w) in enumerate(shapes)]


# -- 1. the preprocessor ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_two_equal_frames_give_the_image_processors_pixels(family):
    lvlm = lvlm_for(family)
    u = unit(family)
    frame = frames(1, 5 * u, 6 * u, seed=5)[0]  # inside both the image and the video budget
    video = lvlm.prepare([Video.from_frames([frame, frame])], PROMPTS[:1])
    image = lvlm.prepare([Image.fromarray(frame)], PROMPTS[:1])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 10, 12]]
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])


def test_resize_targets_hand_computed():
    qwen2, qwen3 = QwenVideoProcessor.for_family("qwen2_vl"), QwenVideoProcessor.for_family("qwen3_vl")
    # Qwen2-VL: 28 px factor, 128..768 tokens per frame whatever the frame count: 480/28 = 17.1 -> 17,
    # 640/28 = 22.9 -> 23, 476 * 644 = 306544 px within [100352, 602112].
    assert qwen2.resized_size(4, 480, 640) == qwen2.resized_size(16, 480, 640) == (476, 644)
    # Qwen3-VL: 32 px factor, budget over t*h*w = [131072, 786432]: 2 frames of 480x640 fit (614400 px);
    # 4 do not (1228800): beta = sqrt(1228800 / 786432) = 1.25 -> 384 x 512.
    assert qwen3.resized_size(2, 480, 640) == (480, 640)
    assert qwen3.resized_size(4, 480, 640) == (384, 512)
    # tiny Qwen2-VL (16 px factor): 72x100 -> round(4.5) = 4, round(6.25) = 6 -> 64 x 96
    tiny2 = QwenVideoProcessor(patch_size=8, size={"shortest_edge": 16 * 16 * 4, "longest_edge": 16 * 16 * 64})
    assert tiny2.resized_size(3, 72, 100) == (64, 96)


def test_odd_frame_count_repeats_the_last_frame():
    proc = QwenVideoProcessor(patch_size=8, size={"shortest_edge": 256, "longest_edge": 16 * 16 * 64})
    out = proc([frames(3, 32, 48, seed=6)])
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]
    # [t, h*w, C, frame, p, p]: the second temporal patch holds frame 3 twice, the first two different frames
    px = out["pixel_values_videos"].view(2, 24, 3, 2, 8, 8)
    assert torch.equal(px[1, :, :, 0], px[1, :, :, 1])
    assert not torch.equal(px[0, :, :, 0], px[0, :, :, 1])


def test_video_settings_come_from_the_checkpoint(tmp_path):
    """The adapter's video processor takes a saved ``video_preprocessor_config.json`` (found as
    transformers finds it, from the tokenizer's path), else transformers' Qwen2-VL video defaults;
    patch sizes always from the model's vision config."""
    lvlm = lvlm_for("qwen2_vl")
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 512, "longest_edge": 4096}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "patch_size": 14}))
    old, lvlm.tokenizer.name_or_path = lvlm.tokenizer.name_or_path, str(tmp_path)
    try:
        saved = lvlm.video_processor()
    finally:
        lvlm.tokenizer.name_or_path = old
    assert (saved.size, saved.image_mean, saved.patch_size) == ({"shortest_edge": 512, "longest_edge": 4096},
                                                                 (0.5,) * 3, 8)
    default = lvlm.video_processor()
    assert default.size == {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    assert default.image_mean == tuple(lvlm.processor.image_processor.image_mean) and default.budget == "frame"
    assert lvlm_for("qwen3_vl").video_processor().budget == "clip"


def test_frame_sampling_is_refused():
    proc = QwenVideoProcessor(patch_size=8)
    with pytest.raises(OptionError, match="already sampled"):
        proc([frames(4, 32, 32)], do_sample_frames=True)


# -- 2. two equal frames == the image path ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_video_of_two_equal_frames_gives_the_image_features(family):
    lvlm = lvlm_for(family)
    u = unit(family)
    frame = frames(1, 5 * u, 6 * u, seed=7)[0]
    needs = PrunerNeeds(vision_attention_layer=-2, vision_features=True)
    (video,) = lvlm.encode_images(lvlm.prepare([Video.from_frames([frame, frame])], PROMPTS[:1]), needs)
    (image,) = lvlm.encode_images(lvlm.prepare([Image.fromarray(frame)], PROMPTS[:1]), needs)
    assert video.grid == image.grid == (5, 6)
    assert torch.equal(video.tokens, image.tokens)
    assert torch.equal(video.vision_attention, image.vision_attention)
    assert video.encoder_seqs == image.encoder_seqs and video.encoder_windows == image.encoder_windows
    if family.startswith("qwen3"):
        assert video.deepstack.shape == (3, 30, 64)
        assert torch.equal(video.deepstack, image.deepstack)
    assert (video.clip, video.image, video.frame, video.time) == (0, None, 0, 0.0)
    assert (image.clip, image.image, image.frame, image.time) == (None, 0, None, None)


# -- 3. unpruned == Hugging Face ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES + ("qwen3_vl_moe",))
def test_unpruned_video_matches_hugging_face(family):
    check_unpruned_matches_hf(lvlm_for(family), [clip(family), resized_clip(family)], PROMPTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_multi_image_matches_hugging_face(family):
    check_unpruned_matches_hf(lvlm_for(family), [two_images(family)], PROMPTS[1:])


# -- 4. views -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_views_of_a_video_and_two_images(family):
    lvlm = lvlm_for(family)
    batch = lvlm.prepare([clip(family), two_images(family)], PROMPTS)
    views = lvlm.encode_images(batch, PrunerNeeds())
    ids = batch["input_ids"]
    video_pos = (ids[0] == lvlm.model.config.video_token_id).nonzero().flatten()
    image_pos = (ids[1] == lvlm.model.config.image_token_id).nonzero().flatten()
    assert len(video_pos) == 32 and len(image_pos) == (55 if family.startswith("qwen3") else 32)

    v0, v1, i0, i1 = views
    assert [v.sample for v in views] == [0, 0, 1, 1]
    # one view per temporal patch of 2 frames: frames 0 and 2, at 0 s and 0.5 s (fps 4)
    assert [(v.clip, v.image, v.frame, v.time, v.grid) for v in (v0, v1)] == [(0, None, 0, 0.0, (4, 4)),
                                                                              (0, None, 2, 0.5, (4, 4))]
    assert torch.equal(v0.seq_index, video_pos[:16]) and torch.equal(v1.seq_index, video_pos[16:])
    grids = [(5, 5), (5, 6)] if family.startswith("qwen3") else [(4, 5), (3, 4)]
    assert [(v.clip, v.image, v.frame, v.time, v.grid) for v in (i0, i1)] == [(None, 0, None, None, grids[0]),
                                                                              (None, 1, None, None, grids[1])]
    n0 = grids[0][0] * grids[0][1]
    assert torch.equal(i0.seq_index, image_pos[:n0]) and torch.equal(i1.seq_index, image_pos[n0:])
    assert [v.encoder_seqs for v in views] == [(64,), (64,), (4 * n0,), (4 * grids[1][0] * grids[1][1],)]
    if family == "qwen2_5_vl":  # windows of 2x2 merged tokens, never across a temporal patch
        assert v0.encoder_windows == v1.encoder_windows == (16, 16, 16, 16)
    if family.startswith("qwen3"):
        # between temporal patches: <|vision_end|>, the timestamp text, <|vision_start|> -- never in a view
        assert int(v1.seq_index[0]) - int(v0.seq_index[-1]) > 3
    else:
        assert int(v1.seq_index[0]) == int(v0.seq_index[-1]) + 1


def test_qwen2_5_vl_seconds_per_temporal_patch():
    lvlm = lvlm_for("qwen2_5_vl")
    batch = lvlm.prepare([clip("qwen2_5_vl")], PROMPTS[:1])
    # 4 frames of a 4-frame source at 4 fps: sampled at 4 fps, 2 frames per temporal patch = 0.5 s
    assert batch["second_per_grid_ts"].tolist() == [0.5]
    pos = lvlm.position_ids(batch)[0, 0]  # temporal axis
    video_pos = (batch["input_ids"][0] == lvlm.model.config.video_token_id).nonzero().flatten()
    # tokens_per_second (4) x 0.5 s: the second temporal patch is 2 temporal positions later
    assert int(pos[video_pos[16]] - pos[video_pos[0]]) == 2


def test_qwen3_vl_timestamps_precede_each_temporal_patch():
    lvlm = lvlm_for("qwen3_vl")
    video = clip("qwen3_vl")
    texts = lvlm.prompt_texts(PROMPTS[:1], True, [video])
    out = lvlm.processor(text=texts, return_text_replacement_offsets=True, **lvlm.video_inputs([video]))
    (offset,) = out["text_replacement_offsets"][0]
    # the template's one <|vision_start|><|video_pad|><|vision_end|> becomes, per temporal patch, the
    # mean time of its two frames ((0 + .25) / 2, (.5 + .75) / 2) and its own start / pads / end
    block = "<|vision_start|>" + "<|video_pad|>" * 16 + "<|vision_end|>"
    assert offset["replacement"] == f"<0.1 seconds>{block}<0.6 seconds>{block}"
    tokens = lvlm.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert tokens.count("<|vision_start|>") == tokens.count("<|vision_end|>") == 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_raw_prompt_places_the_video(family):
    """``chat_template=False``: tokenprune's ``<video>`` becomes the start / pad / end triplet, which
    Qwen3-VL's processor expands per temporal patch (one start / end pair each, no outer pair)."""
    lvlm = lvlm_for(family)
    assert lvlm.video_placeholder == "<|vision_start|><|video_pad|><|vision_end|>"
    batch = lvlm.prepare([clip(family)], ["<video> what is in the image ?"], chat_template=False)
    tokens = lvlm.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens.count("<|video_pad|>") == 32
    assert tokens.count("<|vision_start|>") == tokens.count("<|vision_end|>") == (2 if family == "qwen3_vl" else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_attention_per_temporal_patch_matches_eager(family):
    lvlm = lvlm_for(family)
    batch = lvlm.prepare([two_images(family), clip(family)], PROMPTS)
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    ref = lvlm.reference_vision_attention(batch, -2)  # images, then the video's temporal patches
    assert len(views) == len(ref) == 4
    for v, r in zip(views, ref):
        assert v.vision_attention.shape == (v.tokens.shape[0] * 4,) * 2
        torch.testing.assert_close(v.vision_attention, r, rtol=0, atol=1e-5)
    assert not torch.allclose(views[2].vision_attention, views[3].vision_attention)  # really per temporal patch


# -- 5. every pruner on video and multi-image -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BUILTIN_PRUNERS)
def test_pruner_on_video_and_multi_image(family, name):
    lvlm = lvlm_for(family)
    pair = two_images(family)
    check_pruner_on(lvlm, [clip(family), pair], PROMPTS, name, new_tokens=4)
    check_counts(lvlm, pair, PROMPTS[1], name)
