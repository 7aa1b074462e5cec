"""``scope``: one budget per frame / image view, or one across a whole clip (all views of a sample).

Hand-computed selections on crafted views (two 1x4 "frames" whose FoPru column scores are known),
the option's validation, and an end-to-end check on a multi-view model (LLaVA-NeXT crops): the
clip's kept tokens are the top ``keep_count(ratio, N)`` of the per-view scores computed
independently from the eager vision-attention reference.
"""
from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters.base import View
from tokenprune.adapters.pre_llm import prune_views
from tokenprune.errors import OptionError

FRAME0 = [0.4, 0.3, 0.2, 0.1]
FRAME1 = [0.05, 0.05, 0.8, 0.1]


def frame_view(scores: list[float], first_pos: int, frame: int) -> View:
    """A 1x4 view whose attention rows all equal ``scores``: FoPru's column mean is ``scores`` and its
    row mean is constant (variance 0), so the variance rule picks the column mean."""
    s = torch.tensor(scores)
    return View(sample=0, tokens=torch.arange(4.0)[:, None].repeat(1, 3) + 10 * frame, grid=(1, 4),
                seq_index=torch.arange(first_pos, first_pos + 4), vision_attention=s.expand(4, 4).clone(),
                image=None, clip=0, frame=frame, time=float(frame))


def kept_positions(out) -> list[int]:
    return sorted(torch.cat([seq for seq, *_ in out]).tolist())


def test_default_scopes_follow_each_method():
    assert tp.create_pruner("fopru_rank").scope == "frame"
    assert tp.create_pruner("divprune").scope == "clip"  # LightCompress selects over the whole video
    assert tp.create_pruner("fastv").scope == "clip"  # in-LLM: the whole sequence
    assert tp.create_pruner("fopru_rank", scope="clip").scope == "clip"
    assert tp.pruner_from_spec("fopru_rank:scope=clip:ratio=0.25").options == {
        "ratio": 0.25, "vision_layer": -2, "score_axis": "auto", "scope": "clip"}
    assert "scope" not in tp.create_pruner("fopru_rank").options  # unchanged labels for image runs


@pytest.mark.parametrize("spec, match", [
    ("fopru_rank:scope=video", "scope"),
    ("fastv:scope=frame", "inside the LLM"),
    ("pool:scope=clip", "scope='frame'"),
    ("fopru_row:scope=clip", "scope='frame'"),
    ("vispruner:scope=clip", "scope='frame'"),
    ("visionzip:scope=clip", "scope='frame'"),
])
def test_bad_scopes_are_one_line(spec, match):
    with pytest.raises(OptionError, match=match) as err:
        tp.pruner_from_spec(spec)
    assert "\n" not in str(err.value)


def test_frame_scope_keeps_a_budget_per_frame():
    views = [frame_view(FRAME0, 10, 0), frame_view(FRAME1, 20, 1)]
    out = prune_views(views, tp.create_pruner("fopru_rank", ratio=0.5), ["s"], lambda x: x)
    # frame 0: 0.4, 0.3 -> tokens 0, 1; frame 1: 0.8, then 0.1 (token 3) -> tokens 2, 3
    assert [o[0].tolist() for o in out] == [[10, 11], [22, 23]]


def test_clip_scope_ranks_across_frames():
    views = [frame_view(FRAME0, 10, 0), frame_view(FRAME1, 20, 1)]
    out = prune_views(views, tp.create_pruner("fopru_rank", ratio=0.5, scope="clip"), ["s"], lambda x: x)
    # all 8 scores: 0.8 (f1 t2), 0.4, 0.3, 0.2 (f0 t0..t2): frame 0 keeps 3 tokens, frame 1 one
    assert kept_positions(out) == [10, 11, 12, 22]
    seq, tokens, sources, _ = out[0]
    assert torch.equal(tokens[:, 0], torch.tensor([0.0, 1.0, 2.0, 12.0]))  # the tokens themselves travel
    assert torch.equal(sources, seq) and out[1][0].numel() == 0


def test_clip_scope_hands_token_readers_the_whole_clip():
    seen = {}

    class Spy(type(tp.create_pruner("random"))):
        def select(self, inputs):
            seen.update(grid=inputs.grid, token_views=inputs.token_views, view_grids=inputs.view_grids,
                        ids=list(inputs.sample_ids))
            return super().select(inputs)

    spy = Spy(ratio=0.25)
    spy._scope = "clip"
    views = [frame_view(FRAME0, 10, 0), frame_view(FRAME1, 20, 1)]
    out = prune_views(views, spy, ["clipA"], lambda x: x)
    assert seen["grid"] == (1, 8) and seen["view_grids"] == ((1, 4), (1, 4))
    assert seen["token_views"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert seen["ids"] == ["clipA"]  # one seed per clip, not per frame
    assert len(kept_positions(out)) == tp.keep_count(0.25, 8)


def test_clip_scope_end_to_end_matches_an_eager_ranking():
    """LLaVA-NeXT: base view + stitched crops; clip scope keeps the global top-k of FoPru's per-view scores,
    the scores computed here from the eager ``output_attentions`` reference, not the adapter's recorder."""
    from test_adapters import PROMPTS, images, lvlm_for

    from tokenprune.methods.fopru import fopru_scores
    from tokenprune.pruner import PruningInputs, keep_count, topk_indices

    lvlm = lvlm_for("llava_next")
    img, prompt = images(1), PROMPTS[:1]
    p = tp.create_pruner("fopru_rank", ratio=0.25, scope="clip")
    enc = lvlm.encode(img, prompt, p.needs)
    views = [v for v in enc.views if v.prunable]
    scores = [fopru_scores(PruningInputs(tokens=v.tokens[None], grid=v.grid, vision_attention=v.vision_attention[None],
                                         vision_prefix=v.vision_prefix, patch_merge=v.patch_merge))[0] for v in views]
    flat = torch.cat(scores)
    expected = torch.cat([v.seq_index for v in views])[topk_indices(flat[None], keep_count(0.25, flat.numel()))[0]]
    got = prune_views(enc.views, p, ["0"], lvlm.project_features)
    assert sorted(torch.cat([o[0] for o, v in zip(got, enc.views) if v.prunable]).tolist()) == sorted(expected.tolist())
    per_view = [int(o[0].numel()) for o, v in zip(got, enc.views) if v.prunable]
    frame = prune_views(enc.views, tp.create_pruner("fopru_rank", ratio=0.25), ["0"], lvlm.project_features)
    assert per_view != [int(o[0].numel()) for o, v in zip(frame, enc.views) if v.prunable]  # budgets really moved
