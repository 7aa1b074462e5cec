"""DyCoke (``dycoke``): hand-computed frame plans, TTM selections and decode selections; both official stages
transcribed from KD-TAO/DyCoke@dd74634 (TTM: ``dycole_ttm``; decoding: ``PrunableDynamicCache.dycoke_pruning`` /
``update_cache`` driven by ``Qwen2Model.forward``'s per-layer loop) and compared on random inputs; and on every
video family's tiny model: the official TTM on the model's own views (same kept positions), ratio 1.0 with p 0
== unpruned (the method's no-op: ratio 1.0 alone still selects while decoding), the tokens entering each decoder
layer at prefill == text + the official count, the entries layers >= L attend to at each decode step == text +
int(N (1 - p)) video tokens where it re-selected (all elsewhere), cached == uncached with the decode selection
(the no-cache reference selects step for step the same entries), a batch of two videos == each alone; an image
sample and scope="frame" refused in one line; the framework's contract checks."""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.dycoke as dy  # registers "dycoke" (methods/__init__.py does not import it yet)
from tokenprune.adapters.pre_llm import prune_views
from tokenprune.errors import OptionError
from tokenprune.pruner import DecodePlan, DecodeState, PruningInputs, Stage
from tokenprune.testing import check_pruner_contract, synthetic_inputs

from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, lvlm_for, video

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def clip_inputs(tokens: torch.Tensor) -> PruningInputs:
    """What the adapter hands a clip pruner at scope clip: ``tokens`` ``[B, T, n, D]``, frames of a video."""
    b, t, n, d = tokens.shape
    return PruningInputs(tokens=tokens.flatten(1, 2), grid=(1, t * n), view_grids=((1, n),) * t,
                         token_views=torch.arange(t).repeat_interleave(n).expand(b, -1),
                         view_times=torch.arange(t, dtype=torch.float64).expand(b, -1) / 2,
                         view_features=tokens.mean(2), sample_ids=[f"s{i}" for i in range(b)])


def unit(degrees: list[float]) -> torch.Tensor:
    """2-D unit vectors at the given angles: the cosine of two is the cosine of their angle difference."""
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], -1).float()


# -- hand-computed -----------------------------------------------------------------------------------------

def test_frame_plans_by_hand():
    w, d = ("whole", None), ("drop", None)
    # T = 8: pairs (0,1) (2,3) (4,5) (6,7); windows range(0, 4, 4) = [0]: frame 2 against 0; the last window
    # (4..7) is skipped, frame 6 stays whole
    assert dy.ttm_plan(8) == [w, ("pair", 0), ("window", 0), ("pair", 2), w, ("pair", 4), w, ("pair", 6)]
    # T = 5: one window (range(0, 1, 4)); the odd last frame is never appended by the pair loop: dropped
    assert dy.ttm_plan(5) == [w, ("pair", 0), ("window", 0), ("pair", 2), d]
    assert dy.ttm_plan(5, "keep")[4] == w
    # T = 4: no window (the official torch.stack of no window raises); T = 2, T = 1
    assert dy.ttm_plan(4) == [w, ("pair", 0), w, ("pair", 2)]
    assert dy.ttm_plan(2) == [w, ("pair", 0)] and dy.ttm_plan(1) == [w]
    # T = 32: windows at 0, 4, .., 24 (7); whole: 0, 4, .., 28 and 30 (9); compared 23
    plan = dy.ttm_plan(32)
    assert [i for i, (kind, _) in enumerate(plan) if kind == "window"] == [2, 6, 10, 14, 18, 22, 26]
    assert [i for i, (kind, _) in enumerate(plan) if kind == "whole"] == [0, 4, 8, 12, 16, 20, 24, 28, 30]


def test_counts_by_hand():
    p = tp.create_pruner("dycoke")
    assert (p.ratio, p.k, p.p, p.layer, p.threshold, p.stable, p.odd_frame) == (0.3, 0.7, 0.8, 3, 0.9, "full", "drop")
    assert p.frame_keep(196) == 58  # int(0.30000000000000004 * 196) = int(58.8)
    # OneVision, 196 a frame: T=8: 3 whole + 5 x 58; T=16: 5 + 11 x 58; T=32: 9 + 23 x 58 (the docstring's table)
    assert [p.clip_count(t, 196) for t in (8, 16, 32)] == [878, 1618, 3098]
    assert p.clip_count(5, 196) == 196 + 3 * 58  # frame 4 dropped
    assert tp.create_pruner("dycoke", odd_frame="keep").clip_count(5, 196) == 2 * 196 + 3 * 58
    # the official float arithmetic: k = 0.9 -> (1 - 0.9) * 10 = 0.9999999999999998 -> 0 tokens of a 10-token frame
    assert tp.create_pruner("dycoke", ratio=0.1).frame_keep(10) == 0
    assert tp.create_pruner("dycoke", ratio=1.0).clip_count(5, 9) == 45  # ratio 1: the clip whole
    assert p.num_kept(48, (6, 8)) == 48  # an input of one frame is kept whole
    assert p.decode_plan(28) == DecodePlan(select_layer=3)
    assert p.acts_in(Stage.PRE_LLM) and p.acts_in(Stage.DECODE) and not p.acts_in(Stage.IN_LLM)
    assert p.scope == "clip" and p.clip_inputs and p.quantised and p.adaptive and p.uses_ratio
    assert (p.position_policy, p.position_policy_mrope) == ("compact", "keep")


def test_ttm_selection_by_hand():
    # 5 frames of 4 tokens (2-D unit vectors), ratio .5 -> k .5 -> m = int(.5 * 4) = 2 tokens of a compared frame.
    f0 = unit([0, 0, 0, 0])
    f1 = unit([10, 80, 5, 60])        # cos with f0: .985 .174 .996 .5 -> least similar: 1 (.174), 3 (.5)
    f2 = unit([70, 0, 2, 45])         # vs f0 (window): .342 1 .999 .707 -> 0, 3 (its pair stage kept it whole)
    f3 = unit([70, 20, 90, 45])       # vs f2 (pair): 1 .940 .035 1 -> 2, 1
    f4 = unit([1, 2, 3, 4])           # T odd: dropped
    x = torch.stack([f0, f1, f2, f3, f4])[None]
    red = tp.create_pruner("dycoke", ratio=0.5)(clip_inputs(x))
    assert red.indices.tolist() == [[0, 1, 2, 3, 5, 7, 8, 11, 13, 14]]
    assert red.tokens is None and red.num_kept == tp.create_pruner("dycoke", ratio=0.5).clip_count(5, 4)
    torch.testing.assert_close(red.scores[0, 4:8], 1 - torch.tensor([0.985, 0.174, 0.996, 0.5]), atol=1e-3, rtol=0)
    assert red.scores[0, :4].tolist() == [2.0] * 4 and red.scores[0, 16:].tolist() == [0.0] * 4
    # odd_frame=keep: frame 4 whole; ratio .25: m = 1 (tokens 1 of f1, 0 of f2, 2 of f3)
    assert tp.create_pruner("dycoke", ratio=0.5, odd_frame="keep")(clip_inputs(x)).indices[0, -4:].tolist() == \
        [16, 17, 18, 19]
    assert tp.create_pruner("dycoke", ratio=0.25)(clip_inputs(x)).indices.tolist() == [[0, 1, 2, 3, 5, 8, 14]]
    # ties go to the lower index: frame 1 == frame 0 everywhere -> tokens 0, 1 of it
    same = torch.stack([f0, f0])[None]
    assert tp.create_pruner("dycoke", ratio=0.5)(clip_inputs(same)).indices.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_ratio_one_and_one_frame_inputs_keep_everything():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 9, 8, generator=g)
    assert tp.create_pruner("dycoke", ratio=1.0)(clip_inputs(x)).indices.tolist() == [list(range(63))] * 2
    bare = synthetic_inputs(grid=(6, 8))  # no clip layout: one frame, kept whole at any ratio
    assert tp.create_pruner("dycoke", ratio=0.1)(bare).indices.tolist() == [list(range(48))] * 3


def test_decode_selection_by_hand():
    p = tp.create_pruner("dycoke", p=0.6)
    # 8 entries: 0-1 system text, 2-6 video (N = 5 -> int(5 * 0.4) = 2 kept), 7 the new token
    visual = torch.tensor([[False, False, True, True, True, True, True, False]])
    mask = torch.ones_like(visual)
    a0 = torch.tensor([[0.1, 0.1, 0.05, 0.3, 0.1, 0.25, 0.05, 0.05]])
    memory: dict = {}
    s0 = p.decode_select(DecodeState(attention=a0, visual=visual, mask=mask, step=0, layer=3, memory=memory))
    assert s0.tolist() == [[True, True, False, True, False, True, False, True]]  # video 3 (.3), 5 (.25)
    # step 1: video attention (.05, .3, .1, .25, .05) -> (.05, .29, .1, .26, .05): cosine .999 >= .9 -> everything
    a1 = torch.tensor([[0.1, 0.1, 0.05, 0.29, 0.1, 0.26, 0.05, 0.02, 0.03]])
    v1, m1 = torch.cat([visual, visual[:, :1]], 1), torch.ones(1, 9, dtype=torch.bool)
    s1 = p.decode_select(DecodeState(attention=a1, visual=v1, mask=m1, step=1, layer=3, memory=memory))
    assert s1.all()
    # step 2: the attention moves to video 2, 6: (.3, .01, .01, .01, .3) -> cosine with step 1's .21 -> re-select
    a2 = torch.tensor([[0.1, 0.1, 0.3, 0.01, 0.01, 0.01, 0.3, 0.1, 0.07, 0.1]])
    v2, m2 = torch.cat([v1, visual[:, :1]], 1), torch.ones(1, 10, dtype=torch.bool)
    s2 = p.decode_select(DecodeState(attention=a2, visual=v2, mask=m2, step=2, layer=3, memory=memory))
    assert s2.tolist() == [[True, True, True, False, False, False, True, True, True, True]]
    assert [m.item() for m in memory["moved"]] == [True, False, True]
    # stable="previous": step 1 keeps step 0's selection, the new entry (8) added
    q, memory = tp.create_pruner("dycoke", p=0.6, stable="previous"), {}
    q.decode_select(DecodeState(attention=a0, visual=visual, mask=mask, step=0, layer=3, memory=memory))
    s1 = q.decode_select(DecodeState(attention=a1, visual=v1, mask=m1, step=1, layer=3, memory=memory))
    assert s1.tolist() == [[True, True, False, True, False, True, False, True, True]]
    # the official int(N * (1 - p)): N = 10, p = .8 -> int(10 * 0.19999999999999996) = 1, not 2
    v = torch.tensor([[True] * 10 + [False]])
    s = tp.create_pruner("dycoke", p=0.8).decode_select(
        DecodeState(attention=torch.rand(1, 11), visual=v, mask=torch.ones_like(v), step=0, layer=3))
    assert int((s & v).sum()) == 1


def test_options_are_validated_in_one_line():
    for bad in (dict(p=1.5), dict(p=-0.1), dict(layer=0), dict(threshold="x"), dict(stable="reuse"),
                dict(odd_frame="pad"), dict(ratio=0.0)):
        with pytest.raises(OptionError) as err:
            tp.create_pruner("dycoke", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="scope"):
        tp.create_pruner("dycoke", scope="frame")


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(ratio):
    """tests/test_contract.py's checks (which run on registered pruners only: methods/__init__.py does not import
    dycoke yet): synthetic inputs without a clip layout are one frame."""
    check_pruner_contract(tp.create_pruner("dycoke", ratio=ratio), synthetic_inputs(grid=(6, 8)))
    check_pruner_contract(tp.create_pruner("dycoke", ratio=0.3), synthetic_inputs(grid=(5, 7), patch_merge=4, seed=3))
    check_pruner_contract(tp.create_pruner("dycoke", ratio=ratio), clip_inputs(torch.randn(3, 6, 9, 8)))


# -- the official rules, transcribed from the official code ----------------------------------------------

def official_dycole_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """KD-TAO/DyCoke@dd74634 llava/model/llava_arch.py, ``dycole_ttm``, verbatim."""
    # Split frames into tokens
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    # Calculate similarities between adjacent even frames
    similarities = []
    for i in range(0, num_frames - 1, 2):
        # Get tokens for adjacent frames
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]

        # Calculate cosine similarity between normalized tokens
        frame1_norm = torch.nn.functional.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2_tokens, p=2, dim=1)
        similarity = torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1)
        similarities.append(similarity)

    similarities = torch.stack([torch.tensor(similarity) for similarity in similarities])

    # Process even frames
    modified_image_feature = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]

        avg_similarity = similarities[i // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices

        modified_image_feature.append(frame1_tokens)
        modified_image_feature.append(frame2_tokens[tokens_to_keep])

    # Process odd frames
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]

        similarity = torch.nn.functional.cosine_similarity(frame1_tokens, frame2_tokens, dim=1)
        odd_similarities.append(similarity)

    odd_similarities = torch.stack([torch.tensor(similarity) for similarity in odd_similarities])

    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]

        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices

        modified_image_feature[i] = frame1_tokens
        modified_image_feature[i + 2] = frame2_tokens[tokens_to_keep]

    # Combine all tokens
    combined_tokens = torch.cat(modified_image_feature, dim=0)
    return combined_tokens


def official_kept(x: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official TTM on one clip ``x`` ``[T, n, D]``: (kept token indices into ``T * n``, ascending; their
    tokens). The official output is in its own order (by similarity within a frame): each row is matched back
    to the input row it is a copy of (random rows are unique)."""
    flat = x.flatten(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.tensor(tensor) in the official stack
        out = official_dycole_ttm(flat, x.shape[1], k)
    where = {row.numpy().tobytes(): i for i, row in enumerate(flat)}
    assert len(where) == flat.shape[0]
    idx = torch.tensor([where[row.numpy().tobytes()] for row in out], dtype=torch.long)
    order = idx.argsort()
    return idx[order], out[order]


@pytest.mark.parametrize("t", [5, 6, 7, 8, 9, 12, 13, 32])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.15, 0.77])
def test_ttm_equals_the_official_rule_on_random_clips(t, ratio):
    g = torch.Generator().manual_seed(100 * t + int(ratio * 100))
    n, d = (196, 16) if t == 32 else (16, 24)
    drift = torch.randn(1, n, d, generator=g)
    x = drift + 0.8 * torch.randn(2, t, n, d, generator=g).cumsum(1)  # frames drifting: similarities spread
    pruner = tp.create_pruner("dycoke", ratio=ratio)
    red = pruner(clip_inputs(x))
    assert red.num_kept == pruner.clip_count(t, n)
    for b in range(2):
        keep, tokens = official_kept(x[b], pruner.k)
        assert red.indices[b].tolist() == keep.tolist()
        assert (red.apply(x.flatten(1, 2))[b] - tokens).abs().max().item() == 0.0  # a selection: the very tokens


class OfficialDycokeConfigs:
    """KD-TAO/DyCoke@dd74634 llava/model/language_model/llava_qwen.py, ``DycokeConfigs``, verbatim."""

    def __init__(self):
        self.dycoke_layer_idx = 3
        self.dycoke_radio = 0.8
        self.image_token_start_index = 14
        self.image_token_length = None
        self.similarity = None
        self.attention_score = None


class OfficialPrunableCache:
    """modeling_qwen2.py, ``PrunableDynamicCache``: ``kv_cache``, ``update_cache`` and ``dycoke_pruning`` verbatim
    (the key/value storage, which ``update`` gathers at ``kv_cache``, left out)."""

    def __init__(self) -> None:
        self.kv_cache = None

    def update_cache(self, image_attention, config):
        # Pre-calculate values to avoid repeated computation
        start_idx = config.image_token_start_index
        img_len = config.image_token_length
        num_keep = int(img_len * (1 - config.dycoke_radio))

        # Get top indices in one operation
        top_indices = torch.topk(image_attention, num_keep, sorted=False)[1] + start_idx

        # Create ranges efficiently using single arange call
        device = image_attention.device
        full_range = torch.arange(config.seq_length_with_past, device=device)
        keep_indexs = torch.cat([
            full_range[:start_idx],
            top_indices,
            full_range[start_idx + img_len:]
        ])

        # Convert to list once at end
        self.kv_cache = keep_indexs.tolist()

    def dycoke_pruning(self, attn, layer_idx, config):
        attention_avg = attn[1].mean(1)[0, -1]
        start_idx = config.image_token_start_index
        img_len = config.image_token_length
        image_attention = attention_avg[start_idx:start_idx + img_len]

        if config.attention_score is not None:
            config.similarity = F.cosine_similarity(
                image_attention,
                config.attention_score,
                dim=0
            )
        else:
            config.similarity = 0
        config.attention_score = image_attention

        if config.similarity < 0.9:
            self.update_cache(image_attention, config)


def official_decode_step(cache, config, dycoke_l, n_layers, attn_weights, seq_length, past_key_values_length):
    """modeling_qwen2.py, ``Qwen2Model.forward``: the ``if self.dycoke:`` branch of the layer loop at one decode
    step (``position_ids.shape[1] == 1``); ``attn_weights`` ``[1, H, 1, K]`` is what layer ``dycoke_l - 1``
    returns (``output_attentions`` is forced on). Returns the ``kv_cache`` each layer's attention reads."""
    used, layer_outputs = [], None
    for layer_idx in range(n_layers):
        config.seq_length_with_past = seq_length + past_key_values_length
        if layer_idx < dycoke_l:
            cache.kv_cache = None
        elif layer_idx == dycoke_l and cache.kv_cache is None and seq_length == 1:
            cache.dycoke_pruning(layer_outputs, layer_idx, config)
        used.append(cache.kv_cache)
        layer_outputs = (None, attn_weights if layer_idx == dycoke_l - 1 else None)
    return used


def attention_walk(seed: int, steps: int, heads: int, prompt: int) -> list[torch.Tensor]:
    """``[1, H, 1, K]`` attention rows of ``steps`` decode steps (``K`` grows by one a step): the logits drift a
    little on most steps and jump on some, so the cosine crosses 0.9 both ways."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(heads, prompt + steps, generator=g)
    out = []
    for s in range(steps):
        jump = torch.rand(1, generator=g).item() < 0.35
        logits = logits + (3.0 if jump else 0.08) * torch.randn(logits.shape, generator=g)
        out.append(logits[:, :prompt + s + 1].softmax(-1)[None, :, None, :])
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p,layer", [(0.8, 3), (0.7, 2), (0.55, 5)])
def test_decode_selection_equals_the_official_rule(seed, p, layer):
    """Per step, the entries layers >= L attend to == the official kv_cache (None: every entry); layers < L: all.
    The official span is [start, start + image_token_length): given here as the N video tokens (the official
    sets image_token_length = N - 1, see the module docstring), start 14 (OneVision's system prompt)."""
    start, n_video, prompt, steps, n_layers = 14, 40, 70, 16, 8
    pruner = tp.create_pruner("dycoke", p=p, layer=layer)
    cache, config = OfficialPrunableCache(), OfficialDycokeConfigs()
    config.dycoke_layer_idx, config.dycoke_radio, config.image_token_length = layer, p, n_video
    memory: dict = {}
    moved = []
    for step, attn in enumerate(attention_walk(seed, steps, 4, prompt)):
        k = attn.shape[-1]
        used = official_decode_step(cache, config, layer, n_layers, attn, 1, k - 1)
        assert used[:layer] == [None] * layer and len({id(u) for u in used[layer:]}) == 1
        expected = torch.ones(1, k, dtype=torch.bool)
        if used[layer] is not None:
            expected = torch.zeros(1, k, dtype=torch.bool)
            expected[0, used[layer]] = True
        visual = torch.zeros(1, k, dtype=torch.bool)
        visual[0, start:start + n_video] = True
        state = DecodeState(attention=attn.mean(1)[0, -1][None],  # the head mean the official takes
                            visual=visual, mask=torch.ones_like(visual), step=step, layer=layer, memory=memory)
        got = pruner.decode_select(state)
        assert got.tolist() == expected.tolist(), f"step {step}"
        moved.append(used[layer] is not None)
    assert moved[0] and any(moved[1:]) and not all(moved)  # both branches exercised


def test_decode_selection_batched_equals_each_alone():
    walks = [attention_walk(s, 10, 4, 50) for s in (1, 2)]
    visual = torch.zeros(2, 60, dtype=torch.bool)
    visual[0, 5:30] = True
    visual[1, 8:40] = True  # another video length
    pruner = tp.create_pruner("dycoke")
    both: dict = {}
    alone = [{}, {}]
    for step in range(10):
        attn = torch.cat([w[step].mean(1)[0, -1][None] for w in walks])
        k = attn.shape[1]
        sel = pruner.decode_select(DecodeState(attention=attn, visual=visual[:, :k],
                                               mask=torch.ones(2, k, dtype=torch.bool), step=step, layer=3,
                                               memory=both))
        for i in range(2):
            one = pruner.decode_select(DecodeState(attention=attn[i:i + 1], visual=visual[i:i + 1, :k],
                                                   mask=torch.ones(1, k, dtype=torch.bool), step=step, layer=3,
                                                   memory=alone[i]))
            assert torch.equal(one[0], sel[i])


# -- on every video family's tiny model --------------------------------------------------------------------

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl"]
RATIO, STEPS = 0.5, 5


def clip_for(family: str, seed: int = 0) -> tp.Video:
    """6 views (Qwen: 12 frames, temporal patches of 2): one window (frame 2 against 0), pairs (4, 5)."""
    return video(12 if family.startswith("qwen") else 6, seed=seed)


class Spy(dy.DyCokePruner):
    """dycoke recording every decode selection: (step, selection, moved, visual, attention)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[tuple] = []

    def decode_select(self, state):
        sel = super().decode_select(state)
        self.calls.append((state.step, sel.clone(), state.memory["moved"][-1].clone(), state.visual.clone(),
                           state.attention.clone()))
        return sel


class DecodeMasks:
    """Forward pre-hooks recording, per decoder layer, the attention mask of each decode step (1 query row)."""

    def __init__(self, layers):
        self.masks: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
        self.handles = [layer.register_forward_pre_hook(functools.partial(self._hook, i), with_kwargs=True)
                        for i, layer in enumerate(layers)]

    def _hook(self, i, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            mask = kwargs.get("attention_mask")  # None: an unpadded layout, every entry visible (as HF decodes)
            self.masks[i].append(None if mask is None else mask[:, 0, 0].bool().clone())

    def close(self):
        for h in self.handles:
            h.remove()


def run(lvlm, clips, pruner, use_cache=True, ids=("a", "b"), prompts=PROMPTS):
    """``(output, [B, steps, V] logits of every LM-head call)``."""
    logits = []
    hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
    try:
        out = lvlm.generate(clips, list(prompts[:len(clips)]), pruner=pruner, max_new_tokens=STEPS, ignore_eos=True,
                            use_cache=use_cache, sample_ids=list(ids[:len(clips)]))
    finally:
        hook.remove()
    return out, torch.stack(logits, 1)


def kept_positions(lvlm, clip, pruner) -> list[int]:
    """The sequence positions of the visual tokens the pruner keeps of one clip (through the adapter's views)."""
    enc = lvlm.encode([clip], PROMPTS[:1], pruner.needs)
    visual = {i for v in enc.views if v.prunable for i in v.seq_index.tolist()}
    return sorted(s for seq, *_ in prune_views(enc.views, pruner, ["0"], lvlm.project_features)
                  for s in seq.tolist() if s in visual)


def official_on_views(lvlm, clip, pruner) -> list[int]:
    """The official TTM on the model's own views: the sequence positions it keeps."""
    enc = lvlm.encode([clip], PROMPTS[:1], pruner.needs)
    frames = [v for v in enc.views if v.prunable]
    keep, _ = official_kept(torch.stack([v.tokens for v in frames]).float(), pruner.k)
    return torch.cat([v.seq_index for v in frames])[keep].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    clips = [clip_for(family, 0), clip_for(family, 1)]
    pruner = tp.create_pruner("dycoke", ratio=RATIO)
    # stage 1 on the model's own views: the official rule's kept positions
    enc = lvlm.encode(clips[:1], PROMPTS[:1], pruner.needs)
    frames = [v for v in enc.views if v.prunable]
    t, n = len(frames), frames[0].tokens.shape[0]
    assert t == 6
    visual_positions = {i for v in frames for i in v.seq_index.tolist()}
    kept = kept_positions(lvlm, clips[0], pruner)
    assert kept == official_on_views(lvlm, clips[0], pruner)
    expected = pruner.clip_count(t, n)
    assert len(kept) == expected == 2 * n + 4 * int(0.5 * n) < t * n
    # the no-op: ratio 1.0 and p 0 == unpruned (ratio 1.0 alone keeps every token but still selects while decoding)
    ref, ref_logits = run(lvlm, clips, None)
    full, full_logits = run(lvlm, clips, tp.create_pruner("dycoke", ratio=1.0, p=0.0))
    assert torch.equal(full.token_ids, ref.token_ids)
    torch.testing.assert_close(full_logits, ref_logits, rtol=0, atol=1e-4)
    assert (full.first_logits - ref.first_logits).abs().max().item() <= 1e-5
    # prefill: every layer receives text + the official count; decoding: layers < L attend to every cache entry,
    # layers >= L to the text + int(N (1 - p)) video entries where the step re-selected, to every entry elsewhere
    n_text = lvlm.prepare(clips[:1], PROMPTS[:1])["input_ids"].shape[1] - len(visual_positions)
    spy = Spy(ratio=RATIO, threshold=0.9)
    counter, masks = LayerInputCounter(lvlm.runner.layers), DecodeMasks(lvlm.runner.layers)
    try:
        out = lvlm.generate(clips[:1], PROMPTS[:1], pruner=spy, max_new_tokens=STEPS, ignore_eos=True)
    finally:
        counter.close()
        masks.close()
    layers = len(lvlm.runner.layers)
    assert [counter.lengths[i][0] for i in range(layers)] == [n_text + expected] * layers
    assert out.stats[0].visual_tokens_kept == expected
    assert [c[0] for c in spy.calls] == list(range(STEPS - 1))
    keep = int(expected * (1 - 0.8))
    for step, (_, sel, moved, visual, _) in enumerate(spy.calls):
        entries = n_text + expected + step + 1
        for i in range(layers):
            m = masks.masks[i][step]
            m = None if m is None else m[0]
            assert (entries if m is None else int(m.sum())) == (entries if i < 3 or not moved[0] else entries - expected + keep)
            if i >= 3:
                assert m is not None
                assert torch.equal(m, sel[0])
        assert int((sel[0] & visual[0]).sum()) == (keep if moved[0] else expected)
    assert spy.calls[0][2].item()  # step 0 always selects
    # cached == uncached with the decode selection: at the default threshold (on these tiny models the attention
    # stays put after step 0: every entry from step 1 on), re-selecting at every step, and with stable="previous"
    for threshold, stable in ((0.9, "full"), (2.0, "full"), (0.9, "previous")):
        spy = Spy(ratio=RATIO, threshold=threshold, stable=stable)
        cached, step_logits = run(lvlm, clips, spy)
        n_cached = len(spy.calls)
        uncached, ref_logits = run(lvlm, clips, spy, use_cache=False)
        assert torch.equal(cached.token_ids, uncached.token_ids)
        torch.testing.assert_close(step_logits, ref_logits, rtol=0, atol=1e-4)
        mine, theirs = spy.calls[:n_cached], spy.calls[n_cached:]  # the reference selected on its own attention
        assert [c[0] for c in mine] == [c[0] for c in theirs] == list(range(STEPS - 1))
        for a, b in zip(mine, theirs):
            assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
            torch.testing.assert_close(a[4], b[4], rtol=0, atol=1e-5)
        if stable == "previous":  # every step keeps step 0's int(N (1 - p)) video entries
            assert all(torch.equal((c[1] & c[3]).sum(1), (mine[0][1] & mine[0][3]).sum(1)) for c in mine)
            assert int((mine[0][1] & mine[0][3]).sum(1).max()) < int(mine[0][3].sum(1).min())
        if threshold > 1:
            assert all(bool(c[2].all()) for c in mine)
            # and the selection is real: without the decode stage (p = 0) the later logits move
            _, no_select = run(lvlm, clips, tp.create_pruner("dycoke", ratio=RATIO, p=0.0))
            torch.testing.assert_close(no_select[:, 0], step_logits[:, 0], rtol=0, atol=1e-5)
            assert (no_select[:, 1:] - step_logits[:, 1:]).abs().max() > 1e-4
        # a batch of two == each alone
        for i, sid in enumerate(("a", "b")):
            alone, alone_logits = run(lvlm, clips[i:i + 1], spy, ids=(sid,), prompts=PROMPTS[i:i + 1])
            assert torch.equal(alone.token_ids[0], cached.token_ids[i]) and alone.stats[0] == cached.stats[i]
            torch.testing.assert_close(alone_logits[0], step_logits[i], rtol=0, atol=1e-4)


def test_scoring_applies_the_decode_selection():
    """Teacher-forced scoring (step by step, as decoding selects) == the generated tokens' logits."""
    lvlm = lvlm_for("llava_onevision")
    p = tp.create_pruner("dycoke", ratio=RATIO, threshold=2.0)
    clips = [clip_for("llava_onevision", s) for s in (0, 1)]
    enc = lvlm.encode(clips, PROMPTS, lvlm.vision_needs(p))
    inputs = lvlm._assemble(enc.batch, enc.views, p, "compact", ["a", "b"])[0]
    logits = []
    hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
    try:
        res = lvlm.runner.generate(inputs, STEPS, pruner=p, ignore_eos=True)
    finally:
        hook.remove()
    expected = torch.stack(logits, 1).log_softmax(-1).gather(2, res.tokens[..., None])[..., 0]
    scored = lvlm.runner.score(inputs, res.tokens, torch.ones_like(res.tokens, dtype=torch.bool), pruner=p)
    torch.testing.assert_close(scored.logprobs, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_an_image_sample_is_refused_in_one_line(family):
    with pytest.raises(OptionError, match="video") as err:
        lvlm_for(family).generate([images(1)[0]], PROMPTS[:1], pruner=tp.create_pruner("dycoke"), max_new_tokens=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_videos_of_different_lengths_in_one_batch(family):
    """A 6-view and a 5-view clip (the odd last view dropped, as the official rule does): each keeps its own
    official count and N, selects on its own while decoding; cached == uncached, the batch == each alone.
    (The OneVision, NeXT-Video and InternVL processors batch videos of one frame count only.)"""
    lvlm = lvlm_for(family)
    frames = 2 if family.startswith("qwen") else 1
    clips = [video(6 * frames, seed=0), video(5 * frames, seed=1)]
    spy = Spy(ratio=RATIO, threshold=2.0)
    cached, logits = run(lvlm, clips, spy)
    # Qwen2.5-VL, 9 tokens a view: 6 views 2 x 9 + 4 x 4 = 34, 5 views 9 + 3 x 4 = 21 (view 4 dropped); decoding
    # selects int(34 * .19999999999999996) = 6 and int(21 * ...) = 4. Qwen3-VL, 4 a view: 2 x 4 + 4 x 2 = 16 and
    # 4 + 3 x 2 = 10; int(16 * ...) = 3 and int(10 * .19999999999999996) = int(1.9999999999999996) = 1.
    counts, selected = ([34, 21], [6, 4]) if family == "qwen2_5_vl" else ([16, 10], [3, 1])
    assert [s.visual_tokens_kept for s in cached.stats] == counts
    assert kept_positions(lvlm, clips[1], spy) == official_on_views(lvlm, clips[1], spy)
    assert spy.calls[0][3].sum(1).tolist() == counts
    assert (spy.calls[0][1] & spy.calls[0][3]).sum(1).tolist() == selected
    uncached, ref_logits = run(lvlm, clips, spy, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    for i, sid in enumerate(("a", "b")):
        alone, alone_logits = run(lvlm, clips[i:i + 1], spy, ids=(sid,), prompts=PROMPTS[i:i + 1])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i]) and alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone_logits[0], logits[i], rtol=0, atol=1e-4)


def test_a_layer_past_the_decoder_is_one_line():
    with pytest.raises(OptionError, match="use a layer in 1..3") as err:
        lvlm_for("llava_onevision").generate([clip_for("llava_onevision")], PROMPTS[:1],
                                             pruner=tp.create_pruner("dycoke", layer=4), max_new_tokens=2)
    assert "\n" not in str(err.value)
