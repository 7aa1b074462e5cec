"""Across every video family: each pre-LLM pruner at the scope it is not run at by default, position
policies on 3-D video positions, prompts longer than the context, and vision FLOPs per frame.

The family files (test_video_qwen.py, test_video_llava.py, test_video_internvl.py) check every
pruner at its default scope; here the same checks (ratio 1.0 == unpruned, counts entering each
decoder layer by forward pre-hooks, cached == uncached, batch == alone) run at the other scope.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from test_adapters import images
from tokenprune.adapters import wrap
from tokenprune.cost import sample_cost
from tokenprune.errors import ContextOverflowError, OptionError
from tokenprune.zoo import tiny
from tokenprune.zoo.tiny_llava_next_video import tiny_llava_next_video
from video_checks import BUILTIN_PRUNERS, CLIP_SCOPE_PRUNERS, check_pruner_on, check_unpruned_matches_hf

VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl"]
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@functools.lru_cache(maxsize=None)
def lvlm_for(family: str):
    build = tiny_llava_next_video if family == "llava_next_video" else getattr(tiny, f"tiny_{family}")
    return wrap(*build())


def video(frames: int = 4, side: int = 48, seed: int = 0) -> tp.Video:
    rng = np.random.default_rng(seed)
    return tp.Video.from_frames(rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8), fps=2.0)


def other_scope(name: str) -> str | None:
    """The scope ``name`` is not run at by default, if it has one."""
    p = tp.create_pruner(name)
    others = [s for s in type(p).scopes if s != p.scope]
    return others[0] if others else None


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("name", CLIP_SCOPE_PRUNERS)
def test_every_pruner_at_its_other_scope_on_video(family, name):
    scope = other_scope(name)
    assert scope is not None
    check_pruner_on(lvlm_for(family), [video(), images(1)[0]], PROMPTS, name, scope=scope, new_tokens=4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video",
                                    "internvl"])
@pytest.mark.parametrize("name", CLIP_SCOPE_PRUNERS)
def test_every_pruner_at_its_other_scope_on_multi_image(family, name):
    """(LLaVA-1.5 and LLaVA-NeXT: tests/test_multi_image.py.)"""
    imgs = images(3, seed=2)
    check_pruner_on(lvlm_for(family), [[imgs[0], imgs[1]], imgs[2]], PROMPTS, name, scope=other_scope(name),
                    new_tokens=4)


def test_next_video_multi_image_matches_hugging_face():
    imgs = images(3, seed=2)
    check_unpruned_matches_hf(lvlm_for("llava_next_video"), [[imgs[0], imgs[1]]], PROMPTS[:1], new_tokens=4)


@pytest.mark.parametrize("name", BUILTIN_PRUNERS)
def test_next_video_multi_image_every_pruner(name):
    """LLaVA-NeXT-Video's images go through the LLaVA-NeXT path: a multi-image prompt beside a video."""
    imgs = images(3, seed=2)
    check_pruner_on(lvlm_for("llava_next_video"), [[imgs[0], imgs[1]], video()], PROMPTS, name, new_tokens=4)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_clip_scope_moves_the_budget_between_frames(family):
    """At scope clip, fopru_rank's per-frame counts follow the scores, not an equal share; the total is the
    clip's keep_count."""
    lvlm = lvlm_for(family)
    p = tp.create_pruner("fopru_rank", ratio=0.25, scope="clip")
    enc = lvlm.encode([video(8)], PROMPTS[:1], p.needs)
    frames = [v for v in enc.views if v.prunable]
    from tokenprune.adapters.pre_llm import prune_views

    kept = torch.cat([o[0] for o in prune_views(enc.views, p, ["0"], lvlm.project_features)])
    per_frame = [int(torch.isin(v.seq_index, kept).sum()) for v in frames]
    n = sum(v.tokens.shape[0] for v in frames)
    assert sum(per_frame) == tp.keep_count(0.25, n)
    assert len(set(per_frame)) > 1  # random weights: the frames' scores differ


def test_compact_positions_refused_on_3d_video_positions():
    lvlm = lvlm_for("qwen2_vl")
    with pytest.raises(OptionError, match="3-D") as err:
        lvlm.generate([video()], PROMPTS[:1], pruner=tp.create_pruner("fastv", ratio=0.5), position_policy="compact",
                      max_new_tokens=1)
    assert "\n" not in str(err.value)
    pdrop = tp.create_pruner("pdrop", ratio=0.5, layers=[1, 2, 3])
    assert pdrop.default_position_policy(True) == "compact"  # its own convention on Qwen ...
    assert lvlm._position_policy(None, pdrop, [video()]) == "keep"  # ... kept positions on a video
    assert lvlm._position_policy(None, pdrop, images(1)) == "compact"  # images unchanged
    assert lvlm_for("llava_onevision")._position_policy("compact", pdrop, [video()]) == "compact"  # 1-D: allowed


def test_a_prompt_longer_than_the_context_is_one_line_naming_the_sample(monkeypatch):
    lvlm = lvlm_for("qwen2_vl")
    short = len(lvlm.prepare([images(1)[0]], PROMPTS[:1])["input_ids"][0])
    monkeypatch.setattr(type(lvlm), "context_length", lambda self: short + 1)
    with pytest.raises(ContextOverflowError, match="context of") as err:
        lvlm.generate([images(1)[0], video(8)], PROMPTS, max_new_tokens=1)
    assert err.value.rows == [1] and "\n" not in str(err.value)
    lvlm.generate([images(1)[0]], PROMPTS[:1], max_new_tokens=1)  # what fits still runs


def test_a_sweep_skips_and_records_what_does_not_fit(monkeypatch):
    from tokenprune.benchmarks.sweep import _fitting
    from tokenprune.benchmarks.tasks.base import Sample

    class Prompt:
        def prompt(self, s):
            return s.question

    lvlm = lvlm_for("qwen2_vl")
    chunk = [Sample(id="img", image=images(1)[0], question=PROMPTS[0], answers=["a"]),
             Sample(id="long", image=video(16), question=PROMPTS[0], answers=["a"]),
             Sample(id="short", image=video(2), question=PROMPTS[0], answers=["a"])]
    fits = max(len(lvlm.prepare([v], PROMPTS[:1])["input_ids"][0]) for v in (images(1)[0], video(2)))
    assert len(lvlm.prepare([video(16)], PROMPTS[:1])["input_ids"][0]) > fits
    monkeypatch.setattr(type(lvlm), "context_length", lambda self: fits)
    skipped: list = []
    assert [s.id for s in _fitting(lvlm, chunk, Prompt(), skipped)] == ["img", "short"]
    assert [s.id for s in skipped] == ["long"] and f"context of {fits}" in skipped[0].reason


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl"])
def test_vision_flops_count_every_frame(family):
    """A frame costs what the same picture costs as an image: Qwen's 2 equal frames are one temporal patch,
    like an image; InternVL's frame is one tile, like an image of the tile's size. 4x the frames, 4x the cost."""
    lvlm = lvlm_for(family)
    side = 32 if family == "internvl" else 48
    frame = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    per_image = 2 if family.startswith("qwen") else 1  # frames one image stands for

    def vision(visual) -> float:
        out = lvlm.generate([visual], PROMPTS[:1], max_new_tokens=1)
        return sample_cost(lvlm.model.config, lvlm.vision_spec(), out.stats[0]).vision

    image = vision(Image.fromarray(frame))
    one = vision(tp.Video.from_frames(np.stack([frame] * per_image), fps=2.0))
    four = vision(tp.Video.from_frames(np.stack([frame] * (4 * per_image)), fps=2.0))
    assert image > 0 and one == pytest.approx(image, rel=1e-9)
    assert four == pytest.approx(4 * image, rel=1e-9)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "internvl"])
def test_a_temporal_pruner_gets_the_whole_clip(family):
    """A clip_inputs pruner at scope clip: one call with the clip's tokens frame by frame, each frame's own
    vision attention map, time and mean token -- compared with the views themselves."""
    seen = {}

    class Spy(type(tp.create_pruner("random"))):
        clip_inputs = True

        @property
        def needs(self):
            return tp.PrunerNeeds(vision_attention_layer=-1)

        def select(self, inputs):
            seen["inputs"] = inputs
            return super().select(inputs)

    spy = Spy(ratio=0.5)
    spy._scope = "clip"
    lvlm = lvlm_for(family)
    clip = tp.Video.from_frames(np.random.default_rng(1).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8), fps=2.0,
                                indices=(0, 2, 4, 6))
    enc = lvlm.encode([clip], PROMPTS[:1], spy.needs)
    frames = [v for v in enc.views if v.prunable]
    from tokenprune.adapters.pre_llm import prune_views

    prune_views(enc.views, spy, ["0"], lvlm.project_features)
    got = seen["inputs"]
    assert got.clip_tokens().shape[:2] == (1, len(frames))
    assert torch.equal(got.clip_tokens()[0], torch.stack([v.tokens for v in frames]))
    assert torch.equal(got.view_attention[0], torch.stack([v.vision_attention for v in frames]))
    torch.testing.assert_close(got.view_features[0], torch.stack([v.tokens.mean(0) for v in frames]))
    assert got.view_times[0].tolist() == [v.time for v in frames]
    assert got.view_times[0].tolist() == sorted(got.view_times[0].tolist()) and got.view_times[0, 0] == 0.0
    assert got.token_views[0].tolist() == [j for j, v in enumerate(frames) for _ in range(v.tokens.shape[0])]


def test_next_video_flops_embed_every_patch_and_project_the_pooled_tokens():
    """LLaVA-NeXT-Video pools 2x2 before the projector: the tower embeds and encodes all s^2 patches of each
    frame (+ CLS), the projector sees s^2 / 4 tokens."""
    from tokenprune.cost import vision_flops

    lvlm = lvlm_for("llava_next_video")
    vc = lvlm.model.config.vision_config
    s = vc.image_size // vc.patch_size
    out = lvlm.generate([video(4, side=vc.image_size)], PROMPTS[:1], max_new_tokens=1)
    stats = out.stats[0]
    assert stats.vision_seqs == [s * s + 1] * 4 and stats.vision_patches == 4 * s * s
    assert stats.visual_tokens_in == 4 * (s // 2) ** 2
    got = sample_cost(lvlm.model.config, lvlm.vision_spec(), stats).vision
    assert got == vision_flops(lvlm.vision_spec(), [s * s + 1] * 4, 4 * s * s, 4 * (s // 2) ** 2)
