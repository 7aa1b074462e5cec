"""``hiprune``: HiPrune's anchors, buffers and registers, as the official code (Danielement321/HiPrune@6e83a12).

What is checked, against independent references:
1. hand-computed scores, anchor counts (Python's round), buffers without row wrap, registers after the -1
   penalty, the kept set, and the Qwen port's column sums re-picking an anchor (fewer than N' kept);
2. the official functions transcribed near-verbatim -- LLaVA ``llava_arch.py`` ``encode_images`` L140-184 (with
   its literal 24 and 575 on 24x24 views) and the Qwen2.5-VL port's selection (``qwen2_5_vl_HiPrune.py``
   L1854-1880) -- on random attention maps: identical kept sets;
3. the official pipelines on the tiny models' own tensors: LLaVA-1.5 (eager ``output_attentions`` of the
   tower, the transcribed ``encode_images``) and Qwen2.5-VL (the port's column sums of both blocks,
   ``view(-1, 4).mean``, its selection) == the tokens the adapter + pruner place;
4. every family's tiny model (images; videos where the family has them): ratio 1.0 == unpruned, the tokens each
   decoder layer receives (forward pre-hooks) == text + N', cached == uncached, batch == alone;
5. the contract, one-line errors.

The tiny towers have 3 layers, so the family checks use ``object_layer=2`` (the official 9 is out of range
there) and ``alpha=0.5`` (so that the small budgets get anchors: the official 0.1 gives none below N' = 26).
"""
from __future__ import annotations

import pytest
import torch

import tokenprune as tp
import tokenprune.methods.hiprune  # noqa: F401  (registers the pruner until methods/__init__ imports it)
import video_checks
from tokenprune.errors import OptionError
from tokenprune.methods.hiprune import anchor_count, anchor_set, hiprune_mask, received_attention
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs
from tokenprune.zoo import tiny
from test_adapters import images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def hiprune(ratio: float, **kw):
    return tp.create_pruner("hiprune", ratio=ratio, **kw)


def inputs_from(deep: torch.Tensor, obj: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> PruningInputs:
    """A view whose maps' column means are exactly ``deep`` / ``obj`` ``[B, N]``: every query row equal."""
    b, n = deep.shape

    def as_map(scores):
        row = torch.cat([torch.zeros(b, prefix), scores], 1)  # [B, T]
        return row[:, None].expand(-1, prefix + n, -1).clone()

    return PruningInputs(tokens=torch.randn(b, n, 4), grid=grid, vision_attention=as_map(deep),
                         vision_attention2=as_map(obj), vision_prefix=prefix)


# -- 1. by hand ----------------------------------------------------------------------------------------------
def test_attention_received_and_merged_patches():
    # T = 1 CLS + 4 patches; rows: CLS row then 4 patch rows. Column means over all 5 rows, CLS column dropped.
    attn = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2],
                         [0.0, 1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.5, 0.5, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 1.0],
                         [0.0, 0.0, 0.0, 0.0, 1.0]])[None]
    # columns 1..4: (.2 + 1 + .5) / 5 = .34, (.2 + .5) / 5 = .14, .2 / 5 = .04, (.2 + 1 + 1) / 5 = .44
    torch.testing.assert_close(received_attention(attn, 1, 1, 4), torch.tensor([[0.34, 0.14, 0.04, 0.44]]))
    # sums instead (the Qwen port): 1.7, .7, .2, 2.2; two patches per token: (1.7 + .7) / 2, (.2 + 2.2) / 2
    torch.testing.assert_close(received_attention(attn, 1, 2, 2, "sum"), torch.tensor([[1.2, 1.2]]))


def test_anchor_count_is_pythons_round_of_the_official_expression():
    # round(N' * 0.1 / 5): 3.84 -> 4, 2.56 -> 3, 1.28 -> 1; half to even: .5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert [anchor_count(n, 0.1) for n in (192, 128, 64, 25, 26, 75, 125)] == [4, 3, 1, 0, 1, 2, 2]


def test_buffers_have_no_row_wrap():
    # 4x4 grid. Anchor 4 (row 1's first token): 3 (row 0's LAST token, no wrap), 5, 0 (above), 8 (below).
    # Anchor 15 (last token): 14, 16 -> clamped 15, 11, 19 -> clamped 15.
    scores = torch.zeros(2, 16)
    scores[0, 4] = 1.0
    scores[1, 15] = 1.0
    got = anchor_set(scores, 1, 4)
    assert got[0].nonzero().flatten().tolist() == [0, 3, 4, 5, 8]
    assert got[1].nonzero().flatten().tolist() == [11, 14, 15]
    assert not anchor_set(scores, 0, 4).any()


def test_hand_computed_selection():
    # 4x4 grid, N' = 8 (ratio .5), alpha .5 -> T = round(8 * .5 / 5) = round(.8) = 1 anchor.
    # Object layer: token 4 received most -> A = {0, 3, 4, 5, 8} (|A| = 5), 3 registers.
    # Deep layer: 4 (an anchor: .9 - 1 < 0), then 10, 15, 2, 7 -> registers 10, 15, 2.
    obj = torch.full((1, 16), 0.01)
    obj[0, 4] = 0.5
    obj[0, 9] = 0.2  # second best: not an anchor (T = 1)
    deep = torch.full((1, 16), 0.01)
    deep[0, [4, 10, 15, 2, 7]] = torch.tensor([0.9, 0.3, 0.2, 0.1, 0.05])
    red = hiprune(0.5, alpha=0.5)(inputs_from(deep, obj, (4, 4)))
    assert red.indices.tolist() == [[0, 2, 3, 4, 5, 8, 10, 15]]
    torch.testing.assert_close(red.scores, deep)
    # alpha 0.1 (official): T = round(.16) = 0, no anchors: the deep top 8
    red = hiprune(0.5)(inputs_from(deep, obj, (4, 4)))
    assert red.indices.tolist() == [[0, 1, 2, 3, 4, 7, 10, 15]]  # 4, 10, 15, 2, 7, then ties .01 -> 0, 1, 3


def test_column_sums_can_pick_an_anchor_again():
    # The Qwen port: scores are column sums (1 on average). Anchor 4 receives 3.0 at the deep layer: 3 - 1 = 2
    # still ranks first, the deep top-3 is {4, 10, 15}, and the union keeps 5 + 2 = 7 < N' = 8 tokens.
    obj = torch.full((1, 16), 0.5)
    obj[0, 4] = 3.0
    deep = torch.full((1, 16), 0.5)
    deep[0, [4, 10, 15]] = torch.tensor([3.0, 1.4, 1.2])
    kept, anchors = hiprune_mask(obj, deep, 8, 1, 4)
    assert kept[0].nonzero().flatten().tolist() == [0, 3, 4, 5, 8, 10, 15]
    p = hiprune(0.5, alpha=0.5, received="sum")
    assert p.adaptive and not hiprune(0.5).adaptive
    inputs = inputs_from(deep / 17, obj / 17, (4, 4))  # maps whose column sums (17 rows) are deep / obj
    assert p(inputs).indices.tolist() == [[0, 3, 4, 5, 8, 10, 15]]
    assert hiprune(0.5, alpha=0.5)(inputs).indices.shape == (1, 8)  # means (<= 1): exactly N'


# -- 2. the official functions -------------------------------------------------------------------------------
def official_llava_encode_images(all_image_attentions, mm_vision_select_layer, HIPRUNE_RETENTION, HIPRUNE_ALPHA,
                                 HIPRUNE_OBJECT_LAYER, side=24, last=575):
    """HiPrune@6e83a12 LLaVA/llava/model/llava_arch.py ``encode_images`` L140-184, the index mask only (features
    and projector left out; the env vars as arguments; ``.cuda()`` dropped). ``side`` / ``last`` stand for the
    literal 24 / 575 (their defaults), so the same transcription runs on the tiny models' 8x8 grids."""
    B, N = all_image_attentions[0].shape[0], all_image_attentions[0].shape[-1] - 1
    visual_token_num = int(int(HIPRUNE_RETENTION) / B)
    deep_attention = all_image_attentions[mm_vision_select_layer]
    deep_attention = deep_attention.mean(dim=1).mean(dim=1)[:, 1:]  # Global attention
    shallow_attention = all_image_attentions[int(HIPRUNE_OBJECT_LAYER) - 1]
    shallow_attention = shallow_attention.mean(dim=1).mean(dim=1)[:, 1:]  # Global attention
    shallow_token_num = round(visual_token_num * float(HIPRUNE_ALPHA) / 5)
    index_masks = []
    for i in range(B):
        shallow_token_indices = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
        shallow_token_indices = torch.cat([shallow_token_indices,
                                           shallow_token_indices - 1,
                                           shallow_token_indices + 1,
                                           shallow_token_indices - side,
                                           shallow_token_indices + side], dim=1)  # (B, T * 5)
        shallow_token_indices = shallow_token_indices.clamp(0, last)
        shallow_token_indices = torch.unique(shallow_token_indices, sorted=False).unsqueeze(0)
        deep_token_num = visual_token_num - shallow_token_indices.shape[1]
        available_index_mask = torch.zeros(1, N, dtype=torch.bool)  # (B, N)
        available_index_mask.scatter_(1, shallow_token_indices, 1)
        deep_attention[i] -= available_index_mask.int().squeeze()
        deep_token_indices = torch.topk(deep_attention[i].unsqueeze(0), k=deep_token_num, dim=1)[1]  # (B, T)
        token_indices = torch.cat([shallow_token_indices, deep_token_indices], dim=1)
        token_indices = torch.sort(token_indices, dim=1)[0]  # (B, T)
        index_mask = torch.zeros(1, N, dtype=torch.bool)  # (B, N)
        index_mask.scatter_(1, token_indices, True)  # (B, N)
        index_masks.append(index_mask)
    return torch.cat(index_masks, dim=0)


def official_qwen_select(attn_list, n_image_tokens, n_image_features, HIPRUNE_QWEN_RETENTION, HIPRUNE_ALPHA,
                         HIPRUNE_OBJECT_LAYER, width):
    """HiPrune@6e83a12 Qwen2_5_VL/qwen2_5_vl_HiPrune.py ``Qwen2_5_VLForConditionalGeneration.forward`` L1855-1880
    (the select mask; ``width = image_grid_thw[0][2] / spatial_merge_size``). ``attn_list``: per block, the
    tower's ``attn.mean(heads).sum(queries).view(-1, 4).mean(-1)[reverse_indices]`` (L571-576)."""
    shallow_attention = attn_list[HIPRUNE_OBJECT_LAYER - 1]
    deep_attention = attn_list[-1].clone()
    select_mask = torch.zeros_like(deep_attention, dtype=torch.bool)
    visual_token_num = round(n_image_tokens * HIPRUNE_QWEN_RETENTION)
    shallow_token_num = round((visual_token_num * HIPRUNE_ALPHA) / 5)
    shallow_token_indices = torch.topk(shallow_attention, k=shallow_token_num).indices
    shallow_token_indices = torch.cat([shallow_token_indices,
                                       shallow_token_indices - 1,
                                       shallow_token_indices + 1,
                                       shallow_token_indices - width,
                                       shallow_token_indices + width])
    shallow_token_indices = shallow_token_indices.clamp(0, n_image_tokens - 1)
    shallow_token_indices = torch.unique(shallow_token_indices, sorted=False)
    deep_token_num = visual_token_num - shallow_token_indices.shape[0]
    available_index_mask = torch.zeros(n_image_features, dtype=torch.bool)
    available_index_mask.scatter_(0, shallow_token_indices, 1)
    deep_attention -= available_index_mask.int()
    deep_token_indices = torch.topk(deep_attention, k=deep_token_num).indices
    retain = torch.cat([shallow_token_indices, deep_token_indices])
    select_mask[retain] = True
    return select_mask


def random_maps(seed: int, b: int, t: int, layers: int, temperature: float = 3.0) -> tuple[torch.Tensor, ...]:
    """Per layer ``[B, H=2, T, T]`` row-softmax attention, as ``output_attentions`` returns it; a column bias shared
    by the layers makes some keys receive much attention at every layer (sinks, objects), so anchors also rank
    high at the deep layer."""
    g = torch.Generator().manual_seed(seed)
    shared = 2 * torch.randn(b, 1, 1, t, generator=g)
    return tuple((temperature * torch.randn(b, 2, t, t, generator=g) + shared).softmax(-1) for _ in range(layers))


@pytest.mark.parametrize("retention", [192, 128, 64, 300])
@pytest.mark.parametrize("seed", range(2))
def test_equals_official_llava_on_24x24_views(retention, seed):
    maps = random_maps(seed, 2, 577, 4)  # 4 "layers"; object layer 2 (attentions[1]), deep -2 (attentions[2])
    p = hiprune(retention / 576, object_layer=2, deep_layer=-2)
    assert p.num_kept(576, (24, 24)) == retention
    inputs = PruningInputs(tokens=torch.randn(2, 576, 4), grid=(24, 24), vision_prefix=1,
                           vision_attention=maps[-2].mean(1), vision_attention2=maps[1].mean(1))
    red = p(inputs)
    for i in range(2):  # the official encode_images runs on one image (its budget is divided by B)
        ref = official_llava_encode_images(tuple(m[i:i + 1].clone() for m in maps), -2, retention, 0.1, 2)
        assert red.indices[i].tolist() == ref[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("grid, ratio, alpha", [((12, 16), 0.334, 0.1), ((24, 20), 0.223, 0.1), ((9, 7), 0.5, 0.5),
                                                ((5, 11), 0.45, 0.5)])
@pytest.mark.parametrize("seed", range(3))
def test_equals_official_qwen_port_on_random_views(grid, ratio, alpha, seed):
    """Column sums over every query row (the port's ``received``), 4 patches per token, ``width`` the token grid's;
    where the sums let the deep top-k pick anchors again the official mask (and ours) keeps fewer than N'."""
    n = grid[0] * grid[1]
    maps = random_maps(seed, 1, 4 * n, 3, temperature=4.0)
    heads = [m.mean(1) for m in maps]  # [1, P, P]
    attn_list = [h[0].sum(dim=0).view(-1, 4).mean(dim=-1) for h in heads]  # L571-575 (no window order here)
    ref = official_qwen_select(attn_list, n, n, ratio, alpha, 2, grid[1])
    p = hiprune(ratio, alpha=alpha, object_layer=2, deep_layer=-1, received="sum")
    assert p.num_kept(n, grid) == round(n * ratio)  # no .5 cases here: half-up == Python's round
    red = p(PruningInputs(tokens=torch.randn(1, n, 4), grid=grid, patch_merge=4, vision_attention=heads[-1],
                          vision_attention2=heads[1]))
    assert red.indices[0].tolist() == ref.nonzero().flatten().tolist()


def test_the_qwen_cases_exercise_a_re_picked_anchor():
    short = 0
    for grid, ratio, alpha in [((9, 7), 0.5, 0.5), ((5, 11), 0.45, 0.5)]:
        n = grid[0] * grid[1]
        for seed in range(3):
            heads = [m.mean(1) for m in random_maps(seed, 1, 4 * n, 3, temperature=4.0)]
            attn_list = [h[0].sum(dim=0).view(-1, 4).mean(dim=-1) for h in heads]
            short += int(official_qwen_select(attn_list, n, n, ratio, alpha, 2, grid[1]).sum() < round(n * ratio))
    assert short >= 1


# -- 3. the official pipelines on the tiny models ------------------------------------------------------------
def placed(lvlm, visuals, pruner):
    """``(views, seq slots kept)`` of one sample: what the adapter + pruner place."""
    from tokenprune.adapters.pre_llm import prune_views

    enc = lvlm.encode(visuals, PROMPTS[:1], pruner.needs)
    kept = [k for v, k in zip(enc.views, prune_views(enc.views, pruner, ["0"], lvlm.project_features)) if v.prunable]
    return [v for v in enc.views if v.prunable], torch.cat([k[0] for k in kept])


def test_llava_places_the_official_index_mask():
    lvlm = lvlm_for("llava")
    tower = lvlm.model.model.vision_tower
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # clip_encoder.py: output_attentions=True (eager)
    try:
        with torch.no_grad():
            att = tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = old
    side = 8
    p = hiprune(32 / 64, alpha=0.5, object_layer=2)  # N' = 32, T = round(3.2) = 3 anchors
    ref = official_llava_encode_images(tuple(a.float() for a in att), lvlm.model.config.vision_feature_layer, 32, 0.5,
                                       2, side=side, last=side * side - 1)[0]
    views, seq = placed(lvlm, images(1), p)
    assert torch.equal(seq, views[0].seq_index[ref])


def test_qwen2_5_vl_places_the_official_ports_selection():
    """Blocks 1 and 2 made full-attention (the port's FlashAttention class recomputes an unmasked softmax in
    every block; our adapter scores full-attention blocks): the port's column sums of each block, its
    selection, == what the adapter + ``hiprune:object_layer=2:deep_layer=-1:received=sum`` place."""
    from tokenprune.adapters import wrap

    lvlm = wrap(*tiny.tiny_qwen2_5_vl())
    lvlm.model.model.visual.fullatt_block_indexes = [1, 2]
    p = hiprune(0.5, alpha=0.5, object_layer=2, deep_layer=-1, received="sum")
    for image in images(2):
        batch = lvlm.prepare([image], PROMPTS[:1])
        attn_list = [m.sum(dim=0).view(-1, 4).mean(dim=-1)  # original patch order = the port's after reverse_indices
                     for m in (lvlm.reference_vision_attention(batch, layer)[0] for layer in (0, 1, 2))]
        _, h, w = batch["image_grid_thw"][0].tolist()
        n = h * w // 4
        ref = official_qwen_select(attn_list, n, n, 0.5, 0.5, 2, w // 2)
        views, seq = placed(lvlm, [image], p)
        assert torch.equal(seq, views[0].seq_index[ref])


# -- 4. every family -----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_options(monkeypatch):
    """The shared family checks create pruners by name and ratio: give them the tiny towers' object layer."""
    def make(name, ratio, scope=None):
        scoped = {} if scope is None else {"scope": scope}
        return tp.create_pruner(name, ratio=ratio, object_layer=2, alpha=0.5, **scoped)

    monkeypatch.setattr(video_checks, "make", make)


@pytest.mark.parametrize("family", tiny.FAMILIES)  # timm_lvlm where timm is installed
def test_images_on_every_family(family, tiny_options):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "hiprune", new_tokens=3)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_and_an_image_on_every_video_family(family, tiny_options):
    visuals, prompts = [video(), images(1)[0]], PROMPTS
    check_pruner_on(lvlm_for(family), visuals, prompts, "hiprune", new_tokens=3)


def test_counts_with_the_official_alpha_and_the_qwen_setting(monkeypatch):
    # the official alpha 0.1 (no anchors at these budgets), and the Qwen port's column sums (an adaptive count)
    monkeypatch.setattr(video_checks, "make", lambda name, ratio, scope=None: tp.create_pruner(
        name, ratio=ratio, object_layer=2))
    video_checks.check_counts(lvlm_for("llava"), images(1)[0], PROMPTS[0], "hiprune", 0.25)
    monkeypatch.setattr(video_checks, "make", lambda name, ratio, scope=None: tp.create_pruner(
        name, ratio=ratio, object_layer=2, alpha=0.5, deep_layer=-1, received="sum"))
    video_checks.check_counts(lvlm_for("qwen2_5_vl"), images(1)[0], PROMPTS[0], "hiprune", 0.5)


# -- 5. contract, options, errors ----------------------------------------------------------------------------
def with_second_map(inputs: PruningInputs, seed: int) -> PruningInputs:
    g = torch.Generator().manual_seed(seed)
    inputs.vision_attention2 = (3 * torch.randn(inputs.vision_attention.shape, generator=g)).softmax(-1)
    return inputs


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(ratio):
    check_pruner_contract(hiprune(ratio), with_second_map(synthetic_inputs(grid=(6, 8)), 1))
    check_pruner_contract(hiprune(ratio, alpha=0.5), with_second_map(synthetic_inputs(grid=(10, 10), seed=2), 2))
    check_pruner_contract(hiprune(ratio, alpha=0.5, received="sum"),
                          with_second_map(synthetic_inputs(grid=(5, 7), patch_merge=4, vision_prefix=0, seed=3), 3))


@pytest.mark.parametrize("bad", [dict(alpha=-0.1), dict(alpha=1.5), dict(alpha="x"), dict(object_layer=0),
                                 dict(object_layer="x"), dict(deep_layer=1.5), dict(received="max"), dict(ratio=0)])
def test_bad_options_are_one_line(bad):
    with pytest.raises(OptionError) as err:
        tp.create_pruner("hiprune", **{"ratio": 0.5, **bad})
    assert "\n" not in str(err.value)


def test_one_line_refusals():
    with pytest.raises(OptionError, match="alpha") as err:  # 5 T = 10 > N' = 9: the official top-k would fail
        hiprune(9 / 36, alpha=1.0)(with_second_map(synthetic_inputs(grid=(6, 6)), 0))
    assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="frame"):
        hiprune(0.5, scope="clip")
    inputs = with_second_map(synthetic_inputs(grid=(4, 4)), 0)
    inputs.vision_received, inputs.vision_received2 = torch.rand(3, 16), torch.rand(3, 16)
    assert hiprune(0.5)(inputs).indices.shape == (3, 8)  # pooled frames: the adapter's column means
    with pytest.raises(OptionError, match="received='mean'") as err:
        hiprune(0.5, received="sum")(inputs)
    assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="out of range") as err:  # the official object layer 9 on a 3-layer tower
        lvlm_for("llava").generate(images(1), PROMPTS[:1], pruner=hiprune(0.5), max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_needs_and_defaults():
    p = tp.create_pruner("hiprune")
    assert p.ratio == 192 / 576 and p.alpha == 0.1 and p.object_layer == 9 and p.deep_layer == -2
    needs = p.needs
    assert (needs.vision_attention_layer, needs.vision_attention_layer2, needs.vision_attention_rows) == (-2, 8, "all")
    assert p.scope == "frame" and p.default_position_policy(mrope=True) == "keep"
    assert p.default_position_policy(mrope=False) == "compact"
