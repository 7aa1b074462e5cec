"""A pruner acting before and inside the LLM (PruneVid, HoliTom): the in-LLM stage sees the pre-LLM stage's tokens,
also when a sample has one view (whose grid no longer describes them)."""
from __future__ import annotations

import pytest
import torch

from tokenprune.pruner import LLMStage, PrunerNeeds, Reduction, Stage, TokenPruner

from test_adapters import images
from test_video_scope import PROMPTS, lvlm_for, video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _HalfThenHalf(TokenPruner):
    """Before the LLM: every other token of each view; before decoder layer 2: the first half of those."""

    stage = Stage.PRE_LLM
    extra_stages = (Stage.IN_LLM,)

    def __init__(self, ratio: float = 0.5):
        self.ratio = ratio
        self.seen = []

    @property
    def needs(self):
        return PrunerNeeds(llm_stages=(LLMStage(layer=2),))

    def num_kept(self, n_tokens, grid):
        return (n_tokens + 1) // 2

    def select(self, inputs):
        self.seen.append((inputs.layer, inputs.grid, inputs.num_tokens))
        n = inputs.num_tokens
        idx = torch.arange(0, n, 2) if inputs.layer == 0 else torch.arange((n + 1) // 2)
        return Reduction(indices=idx.expand(inputs.batch_size, -1))


@pytest.mark.parametrize("family, visual", [("llava_onevision", "image"), ("qwen2_vl", "image"),
                                            ("qwen2_vl", "video2"), ("internvl", "video4")])
def test_in_llm_stage_after_a_pre_llm_cut(family, visual):
    lvlm = lvlm_for(family)
    v = {"image": images(1)[0], "video2": video(2), "video4": video(4)}[visual]
    p = _HalfThenHalf()
    out = lvlm.generate([v], PROMPTS[:1], pruner=p, max_new_tokens=2)
    (_, grid, n), = [s for s in p.seen if s[0] >= 1]
    st = out.stats[0]
    assert grid[0] * grid[1] == n == st.visual_per_layer[0] < st.visual_tokens_in  # its grid counts what it got
    assert st.visual_per_layer == [n, n, (n + 1) // 2, (n + 1) // 2]
