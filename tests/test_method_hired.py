"""``hired``: HiRED's per-crop budgets on LLaVA-NeXT, as the official code (hasanar1f/HiRED@502d6dd) does them.

What is checked, against independent references:
1. hand-computed: the band budgets (the official flat raster reshape) and the spatial variant, the floors that
   make the total fall short, a kept cell lost in the padding, the LLaVA-1.5 rule;
2. the official functions transcribed near-verbatim (the fork's ``modeling_llava_next.py``
   ``HiRED_token_selection`` L518-559, ``HiRED_sub_img_budgets`` L490-516, the mask half of
   ``pack_HiRED_image_features`` L782-862 with its ``unpad_image``; ``modeling_llava.py`` ``HiRED_token_selection``
   L340-353) on random per-head maps: identical kept sets;
3. the official pipeline on the tiny LLaVA-NeXT's own tensors (``ViT_Attn_Hook``: q_proj / k_proj hooks on the
   first and the deep layer, softmax, CLS rows summed over heads; the selection; the mask stitched and unpadded)
   == the tokens the adapter + pruner place; the same for the tiny LLaVA-1.5;
4. LLaVA-NeXT and LLaVA-1.5 tiny models: ratio 1.0 == unpruned, the tokens each decoder layer receives (pre-hooks)
   == text + what the method reports, cached == uncached, batch == alone;
5. one-line refusals on every other family and on video, bad options.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.hired  # noqa: F401  (registers the pruner until methods/__init__ imports it)
from tokenprune.errors import OptionError
from tokenprune.methods.hired import budgets, top_mask
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs
from tokenprune.zoo import tiny
from test_adapters import images
from test_video_scope import PROMPTS, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def hired(ratio: float = 0.2, **kw):
    return tp.create_pruner("hired", ratio=ratio, **kw)


def cls_map(row: torch.Tensor) -> torch.Tensor:
    """``[..., 1, 1 + n]``: ``row`` ``[..., n]`` as a CLS row (CLS column first)."""
    return torch.cat([torch.zeros(*row.shape[:-1], 1), row], -1).unsqueeze(-2)


def clip_inputs(base_deep, base_top, crops_deep, layout, grid):
    """A one-image NeXT clip as the framework hands it: the base view (``[n]`` CLS rows of the deep and the first
    layer) and the high-res view (``[C, n]`` its crops' deep CLS rows, ``[h*w]`` its crop layout, ``grid``)."""
    n = base_deep.shape[-1]
    base = PruningInputs(tokens=torch.randn(1, n, 4), grid=(math.isqrt(n), math.isqrt(n)), vision_prefix=1,
                         vision_attention=cls_map(base_deep)[None], vision_attention2=cls_map(base_top)[None])
    high = PruningInputs(tokens=torch.randn(1, layout.numel(), 4), grid=grid, vision_prefix=1,
                         crop_attention=cls_map(crops_deep)[None], crop_layout=layout[None])
    tokens = torch.cat([base.tokens, high.tokens], 1)
    return PruningInputs(tokens=tokens, grid=(1, tokens.shape[1]), vision_prefix=1, view_inputs=[[base, high]],
                         view_grids=(base.grid, grid))


def stitched_layout(nph: int, npw: int, side: int, rows: slice = slice(None), cols: slice = slice(None)
                    ) -> torch.Tensor:
    """``crop * side^2 + cell`` of each cell of the stitched ``nph*side x npw*side`` grid, cut to ``rows, cols``."""
    r, c = torch.meshgrid(torch.arange(nph * side), torch.arange(npw * side), indexing="ij")
    index = ((r // side) * npw + c // side) * side * side + (r % side) * side + c % side
    return index[rows, cols].flatten()


# -- 1. by hand ----------------------------------------------------------------------------------------------
def test_band_and_spatial_budgets():
    # n = 16 (4x4 base), 4 crops, alpha .5: the base's top 8 by first-layer CLS attention are hits:
    # tokens 0 1 2 3 4 5 8 12.
    top = torch.zeros(16)
    top[[0, 1, 2, 3, 4, 5, 8, 12]] = torch.arange(8, 0, -1).float()
    # bands of 4 raster tokens (rows 0, 1, 2, 3): 4, 2, 1, 1 hits -> 12 * (.5, .25, .125, .125) = 6, 3, 1.5, 1.5
    # -> int: 6, 3, 1, 1 (11 of 12: the floors fall short)
    assert budgets(top, 4, 12, 0.5).tolist() == [6, 3, 1, 1]
    # spatial: quadrants of the 2x2 grid: 0 1 4 5 -> crop 0, 2 3 -> crop 1, 8 12 -> crop 2, none -> crop 3
    assert budgets(top, 4, 12, 0.5, "spatial", (2, 2), 4).tolist() == [6, 3, 3, 0]
    # a budget is at most n = 16
    assert budgets(top, 4, 64, 0.5).tolist() == [16, 16, 8, 8]
    with pytest.raises(OptionError, match="band"):  # 16 tokens do not split into 3 bands
        budgets(top, 3, 12, 0.5)


def test_hand_computed_image_with_padding():
    # 2x2 crops of 2x2 cells (n = 4, s = 2), V = 5, ratio .5: total = int(5 * 4 * .5) = 10, full = min(5, 4) = 4,
    # sub = min(6, 16) = 6. Base: its top 4 = all 4 tokens. Hits: top int(4 * .5) = 2 of the first-layer row:
    # tokens 0 and 3 -> bands (1 token each) 1, 0, 0, 1 -> budgets int(.5 * 6) = 3, 0, 0, 3.
    base_deep = torch.tensor([0.4, 0.3, 0.2, 0.1])
    base_top = torch.tensor([0.5, 0.1, 0.1, 0.3])
    crops = torch.tensor([[0.1, 0.4, 0.3, 0.2],   # crop 0: top 3 -> cells 1, 2, 3
                          [0.4, 0.3, 0.2, 0.1],
                          [0.4, 0.3, 0.2, 0.1],
                          [0.4, 0.1, 0.3, 0.2]])  # crop 3: top 3 -> cells 0, 2, 3
    # stitched 4x4 grid; unpadding removes the first and last rows (the padding): rows 1, 2 stay.
    # row 1: crop 0 cells 2 3, crop 1 cells 2 3; row 2: crop 2 cells 0 1, crop 3 cells 0 1.
    layout = stitched_layout(2, 2, 2, rows=slice(1, 3))
    assert layout.tolist() == [2, 3, 6, 7, 8, 9, 12, 13]
    red = hired(0.5)(clip_inputs(base_deep, base_top, crops, layout, (2, 4)))
    # base: 0 1 2 3; high-res (offset 4): crop 0 cells 2, 3 -> 4, 5; crop 3 cell 0 -> 10; crop 0's cell 1 and
    # crop 3's cells 2, 3 were kept but sit in the padding: gone (3 + 3 budget, 3 reach the LLM)
    assert red.indices.tolist() == [[0, 1, 2, 3, 4, 5, 10]]
    # partition=spatial: base token 0 -> crop 0 and token 3 -> crop 3: the same budgets here
    assert hired(0.5, partition="spatial")(clip_inputs(base_deep, base_top, crops, layout, (2, 4))).indices.tolist() \
        == [[0, 1, 2, 3, 4, 5, 10]]


def test_llava_1_5_rule():
    # one view of 16: min(16, int(16 * .3)) = 4 by the deep layer's CLS row
    row = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.7, 0.05, 0.6, 0.01, 0.02, 0.03, 0.04, 0.06, 0.07, 0.08]])
    red = hired(0.3)(PruningInputs(tokens=torch.randn(1, 16, 4), grid=(4, 4), vision_prefix=1,
                                   vision_attention=cls_map(row)))
    assert red.indices.tolist() == [[1, 3, 6, 8]]


# -- 2. the official functions -------------------------------------------------------------------------------
def official_sub_img_budgets(spatial_distribution, num_patches, sub_img_budget, num_vision_tokens, grid_shape):
    """HiRED@502d6dd modeling_llava_next.py ``HiRED_sub_img_budgets`` L490-516 (``get_anyres_image_grid_shape`` of
    the image size passed in as ``grid_shape``, under the fork's own names)."""
    num_sub_img_patches = num_patches - 1
    num_patch_width, num_patch_height = grid_shape
    assert num_patch_width * num_patch_height == num_sub_img_patches
    spatial_distribution = spatial_distribution.reshape(num_patch_height, num_patch_width, -1)
    sum_img_mask = spatial_distribution.sum(dim=-1)
    sum_img_mask = sum_img_mask.reshape(-1)
    budget_ratio = sum_img_mask / sum_img_mask.sum()
    num_topk_others = (budget_ratio * sub_img_budget).int()
    return torch.clamp(num_topk_others, max=num_vision_tokens)


def official_token_selection(top_layer_attn, bottom_layer_attn, num_patches, full_image_patch, num_vision_tokens,
                             token_budget_rate, alpha, grid_shapes):
    """HiRED@502d6dd modeling_llava_next.py ``HiRED_token_selection`` L518-559."""
    top_layer_attn = top_layer_attn[:, :, 0, -num_vision_tokens:]
    bottom_layer_attn = bottom_layer_attn[:, :, 0, -num_vision_tokens:]
    top_layer_attn = torch.split(top_layer_attn, num_patches, dim=0)
    bottom_layer_attn = torch.split(bottom_layer_attn, num_patches, dim=0)
    masks = []
    for idx, top_attn, bottom_attn in zip(range(len(num_patches)), top_layer_attn, bottom_layer_attn):
        bottom_attn = bottom_attn.sum(dim=1)
        top_attn = top_attn.sum(dim=1)
        mask = torch.zeros_like(bottom_attn, dtype=torch.bool)
        num_patch = bottom_attn.shape[0]
        num_total_budget = int(num_patch * num_vision_tokens * token_budget_rate)
        full_img_budget = min(int(num_total_budget * alpha), num_vision_tokens)
        total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * num_vision_tokens)
        full_bottom_attn = bottom_attn[full_image_patch]
        full_top_attn = top_attn[full_image_patch]
        sub_img_attn = bottom_attn[full_image_patch + 1:]
        mask[full_image_patch, full_bottom_attn.topk(full_img_budget, largest=True).indices] = True
        if total_sub_img_budget > 0:
            spatial_distribution = torch.zeros_like(top_attn[full_image_patch], dtype=torch.bool)
            spatial_distribution[full_top_attn.topk(int(num_vision_tokens * (1 - alpha)), largest=True).indices] = True
            sub_img_budgets = official_sub_img_budgets(spatial_distribution, num_patch, total_sub_img_budget,
                                                       num_vision_tokens, grid_shapes[idx])
            for i, num_topk_other in enumerate(sub_img_budgets):
                mask[i + 1, sub_img_attn[i].topk(num_topk_other, largest=True).indices] = True
        masks.append(mask)
    return tuple(masks)


def official_unpad_mask(tensor, original_size):
    """HiRED@502d6dd modeling_llava_next.py ``unpad_image`` (the 2-D mask branch)."""
    original_height, original_width = original_size
    current_height, current_width = tensor.shape
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[padding: current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, padding: current_width - padding]


def official_pack_mask(image_features_mask, num_patch_height, num_patch_width, height, image_size):
    """HiRED@502d6dd ``pack_HiRED_image_features`` L793-845, the mask only, ``image_newline=None``: (base mask,
    crops' mask stitched and unpadded, flattened). The grid's sides are passed in the right order (the fork's
    names are swapped, which only matters on non-square grids; see the method's docstring)."""
    base_image_mask = image_features_mask[0]
    other_images_mask = image_features_mask[1:]
    width = height
    other_images_mask = other_images_mask.view(num_patch_height, num_patch_width, height, width)
    other_images_mask = other_images_mask.permute(0, 2, 1, 3).contiguous()
    other_images_mask = other_images_mask.flatten(0, 1).flatten(1, 2)
    other_images_mask = official_unpad_mask(other_images_mask, image_size)
    return base_image_mask, other_images_mask.flatten()


def official_llava_selection(bottom_layer_attn, num_vision_tokens, token_budget_rate):
    """HiRED@502d6dd modeling_llava.py ``HiRED_token_selection`` L340-353."""
    attn = bottom_layer_attn[0, :, 0, -num_vision_tokens:]
    attn = attn.sum(dim=0)
    mask = torch.zeros_like(attn, dtype=torch.bool)
    num_topk = min(num_vision_tokens, int(num_vision_tokens * token_budget_rate))
    mask[attn.topk(num_topk, largest=True).indices] = True
    return mask


def heads_maps(g: torch.Generator, v: int, t: int, heads: int = 4) -> torch.Tensor:
    """``[V, H, T, T]`` row-softmax maps."""
    return (3 * torch.randn(v, heads, t, t, generator=g)).softmax(-1)


# (crop grid (rows, cols), side, image size (h, w) giving unpadding, ratio, alpha)
OFFICIAL_CASES = [((2, 2), 24, (600, 800), 0.2, 0.5), ((2, 2), 24, (800, 520), 0.1, 0.5),
                  ((1, 2), 24, (300, 700), 0.3, 0.5), ((3, 1), 12, (900, 280), 0.25, 0.4),
                  ((2, 2), 8, (64, 64), 0.5, 0.7), ((2, 2), 24, (672, 672), 0.05, 0.5)]


@pytest.mark.parametrize("grid, side, size, rate, alpha", OFFICIAL_CASES)
@pytest.mark.parametrize("seed", range(2))
def test_equals_official_on_random_maps(grid, side, size, rate, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    nph, npw = grid
    n, v = side * side, nph * npw + 1
    top, bottom = heads_maps(g, v, 1 + n), heads_maps(g, v, 1 + n)
    # the fork calls grid_shape (rows, cols) "(num_patch_width, num_patch_height)" and reshapes by (npw, nph): the
    # same flat bands whatever the order
    masks = official_token_selection(top, bottom, [v], 0, n, rate, alpha, [(nph, npw)])
    base_ref, high_ref = official_pack_mask(masks[0], nph, npw, side, size)
    index = torch.arange(nph * npw * n).view(nph * npw, n)
    layout = official_pack_mask(torch.cat([torch.zeros(1, n, dtype=torch.long), index]), nph, npw, side, size)[1]
    h = official_unpad_mask(torch.zeros(nph * side, npw * side), size).shape[0]
    inputs = clip_inputs(bottom[0].mean(0)[0, 1:], top[0].mean(0)[0, 1:], bottom[1:].mean(1)[:, 0, 1:], layout,
                         (h, layout.numel() // h))
    red = hired(rate, alpha=alpha)(inputs)
    expected = torch.cat([base_ref, high_ref]).nonzero().flatten()
    assert red.indices[0].tolist() == expected.tolist()
    assert red.num_kept <= int(v * n * rate)


def test_the_official_cases_lose_cells_in_the_padding_and_to_floors():
    floors, padding = 0, 0
    for (nph, npw), side, size, rate, alpha in OFFICIAL_CASES:
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            n, v = side * side, nph * npw + 1
            top, bottom = heads_maps(g, v, 1 + n), heads_maps(g, v, 1 + n)
            masks = official_token_selection(top, bottom, [v], 0, n, rate, alpha, [(nph, npw)])
            base_ref, high_ref = official_pack_mask(masks[0], nph, npw, side, size)
            floors += int(masks[0].sum()) < int(v * n * rate)
            padding += int(base_ref.sum() + high_ref.sum()) < int(masks[0].sum())
    assert floors >= 3 and padding >= 3


def spatial_sub_img_budgets(spatial_distribution, num_patches, sub_img_budget, num_vision_tokens, grid_shape):
    """``partition=spatial``, written independently: the official ``HiRED_sub_img_budgets`` with the flat
    ``reshape(nph, npw, -1)`` replaced by the hits of the base region over each crop (the base grid cut into
    ``nph x npw`` equal blocks)."""
    nph, npw = grid_shape
    side = math.isqrt(num_vision_tokens)
    blocks = spatial_distribution.view(nph, side // nph, npw, side // npw).sum(dim=(1, 3)).reshape(-1)
    return torch.clamp((blocks / blocks.sum() * sub_img_budget).int(), max=num_vision_tokens)


@pytest.mark.parametrize("grid, side, size, rate, alpha", [c for c in OFFICIAL_CASES if c[1] % c[0][0] == 0
                                                           and c[1] % c[0][1] == 0])
def test_spatial_partition_on_random_maps(grid, side, size, rate, alpha, monkeypatch):
    g = torch.Generator().manual_seed(5)
    nph, npw = grid
    n, v = side * side, nph * npw + 1
    top, bottom = heads_maps(g, v, 1 + n), heads_maps(g, v, 1 + n)
    monkeypatch.setitem(globals(), "official_sub_img_budgets", spatial_sub_img_budgets)
    masks = official_token_selection(top, bottom, [v], 0, n, rate, alpha, [(nph, npw)])
    base_ref, high_ref = official_pack_mask(masks[0], nph, npw, side, size)
    index = torch.arange(nph * npw * n).view(nph * npw, n)
    layout = official_pack_mask(torch.cat([torch.zeros(1, n, dtype=torch.long), index]), nph, npw, side, size)[1]
    h = official_unpad_mask(torch.zeros(nph * side, npw * side), size).shape[0]
    inputs = clip_inputs(bottom[0].mean(0)[0, 1:], top[0].mean(0)[0, 1:], bottom[1:].mean(1)[:, 0, 1:], layout,
                         (h, layout.numel() // h))
    red = hired(rate, alpha=alpha, partition="spatial")(inputs)
    assert red.indices[0].tolist() == torch.cat([base_ref, high_ref]).nonzero().flatten().tolist()


@pytest.mark.parametrize("rate", [0.2, 0.05, 0.5])
def test_equals_official_llava_1_5_rule(rate):
    g = torch.Generator().manual_seed(3)
    bottom = heads_maps(g, 1, 577, heads=16)
    ref = official_llava_selection(bottom, 576, rate)
    red = hired(rate)(PruningInputs(tokens=torch.randn(1, 576, 4), grid=(24, 24), vision_prefix=1,
                                    vision_attention=bottom.mean(1)[:, :1]))
    assert red.indices[0].tolist() == ref.nonzero().flatten().tolist()


# -- 3. the official pipeline on the tiny models -------------------------------------------------------------
def hooked_cls_attention(lvlm, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """HiRED ``ViT_Attn_Hook`` (L48-96): forward hooks on ``q_proj`` / ``k_proj`` of each layer, ``softmax(q k^T
    head_dim^-0.5)`` per head (``[views, H, T, T]``)."""
    tower = lvlm.model.model.vision_tower
    cfg = lvlm.model.config.vision_config
    outs, handles = {}, []
    for layer in layers:
        # the fork's ``vision_tower.vision_model.encoder.layers``; transformers 5's CLIPVisionModel holds them directly
        attn = getattr(tower, "vision_model", tower).encoder.layers[layer].self_attn
        for proj, name in ((attn.k_proj, "k"), (attn.q_proj, "q")):
            handles.append(proj.register_forward_hook(
                lambda m, i, o, key=(layer, name): outs.__setitem__(key, o)))
    try:
        with torch.no_grad():
            tower(pixels, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    maps = []
    for layer in layers:
        query, key = outs[(layer, "q")], outs[(layer, "k")]
        batch_size, num_tokens, embedding_dim = query.shape
        head_dim = embedding_dim // cfg.num_attention_heads
        query = query.view(batch_size, num_tokens, cfg.num_attention_heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, num_tokens, cfg.num_attention_heads, head_dim).transpose(1, 2)
        maps.append(F.softmax((query @ key.transpose(-2, -1)) * head_dim ** -0.5, dim=-1).float())
    return maps


def placed(lvlm, visuals, pruner):
    """The sequence slots of the tokens the adapter + pruner place for one sample, and its prunable views."""
    from tokenprune.adapters.pre_llm import prune_views

    enc = lvlm.encode(visuals, PROMPTS[:1], pruner.needs)
    kept = [k for v, k in zip(enc.views, prune_views(enc.views, pruner, ["0"], lvlm.project_features)) if v.prunable]
    return [v for v in enc.views if v.prunable], torch.cat([k[0] for k in kept])


@pytest.mark.parametrize("which", [0, 1])  # 96x96 (2x2 crops, no padding), 80x112 (2x2, unpadded rows)
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_llava_next_places_the_official_selection(which, rate):
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    lvlm = lvlm_for("llava_next")
    cfg = lvlm.model.config
    image = images(2)[which]
    batch = lvlm.prepare([image], PROMPTS[:1])
    size = batch["image_sizes"][0].tolist()
    crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    pixels = batch["pixel_values"][0, :crops]
    n_layers = cfg.vision_config.num_hidden_layers
    top, bottom = hooked_cls_attention(lvlm, pixels, (0, n_layers - 2))  # the fork's 0 and 22 of 24
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    masks = official_token_selection(top, bottom, [crops], 0, side * side, rate, 0.5, [(nph, npw)])
    base_ref, high_ref = official_pack_mask(masks[0], nph, npw, side, size)
    views, seq = placed(lvlm, [image], hired(rate))
    span = torch.cat([v.seq_index for v in views])  # base then high-res tokens (newlines are not views' tokens)
    assert torch.equal(seq, span[torch.cat([base_ref, high_ref])])


def test_llava_places_the_official_llava_1_5_selection():
    lvlm = lvlm_for("llava")
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    n_layers = lvlm.model.config.vision_config.num_hidden_layers
    (bottom,) = hooked_cls_attention(lvlm, batch["pixel_values"], (n_layers - 2,))
    ref = official_llava_selection(bottom, 64, 0.3)
    views, seq = placed(lvlm, images(1), hired(0.3))
    assert torch.equal(seq, views[0].seq_index[ref])


# -- 4. the families where it is defined ---------------------------------------------------------------------
DEFINED = ["llava_next", "llava", "timm_lvlm"]  # timm_lvlm: a LLaVA-1.5-style model on a timm ViT with CLS


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f in DEFINED])
def test_images_on_the_defined_families(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "hired", ratio=0.3, new_tokens=3)


def test_a_multi_image_sample_on_llava_next():
    visuals = [images(2), images(1, seed=1)[0]]  # two images in one prompt, then one
    prompts = ["<image> and <image>: what differs ?", PROMPTS[1]]
    check_pruner_on(lvlm_for("llava_next"), visuals, prompts, "hired", ratio=0.3, new_tokens=3)


# -- 5. refusals, options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f not in DEFINED])
def test_other_families_refuse_in_one_line(family):
    with pytest.raises(OptionError) as err:
        lvlm_for(family).generate(images(1), PROMPTS[:1], pruner=hired(), max_new_tokens=1)
    assert "\n" not in str(err.value) and "hired" in str(err.value)


def test_video_refuses_in_one_line():
    with pytest.raises(OptionError, match="video") as err:
        lvlm_for("llava_next_video").generate([video()], PROMPTS[:1], pruner=hired(), max_new_tokens=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(alpha="x"), dict(deep_layer="x"), dict(top_layer=0.5),
                                 dict(partition="quadrant"), dict(ratio=0), dict(scope="frame")])
def test_bad_options_are_one_line(bad):
    with pytest.raises(OptionError) as err:
        tp.create_pruner("hired", **{"ratio": 0.2, **bad})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.2, 0.05])
def test_contract(ratio):
    check_pruner_contract(hired(ratio), synthetic_inputs(grid=(6, 8)))  # a bare call: one view each, LLaVA-1.5's rule
    red = hired(ratio)(synthetic_inputs(grid=(6, 8)))
    assert red.num_kept == (48 if ratio == 1.0 else max(1, int(48 * ratio)))


def test_defaults_and_needs():
    p = tp.create_pruner("hired")
    assert (p.ratio, p.alpha, p.deep_layer, p.top_layer, p.partition) == (0.2, 0.5, -2, 0, "band")
    needs = p.needs
    layers = (needs.vision_attention_layer, needs.vision_attention_layer2, needs.vision_attention_rows)
    assert layers == (-2, 0, "prefix")
    assert p.adaptive and p.scope == "clip" and p.default_position_policy(mrope=False) == "compact"
    assert top_mask(torch.tensor([[0.2, 0.5, 0.5, 0.1]]), 2).tolist() == [[False, True, True, False]]
