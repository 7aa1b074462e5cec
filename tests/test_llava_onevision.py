"""LLaVA-OneVision: the view layout against the model's own ``pack_image_features``, the
``anyres_max`` downsampling path (features and vision attention), multi-image ``batch_num_images``,
a CLS tower's prefix path, and FoPru's ``cls`` axis refused in one line on SigLIP (no CLS).

The exactness suites (HF logits/tokens, ratio 1.0, counts inside the LLM, cache, batching, every
pruner, eager attention reference) run on this family through ``tiny.FAMILIES`` in
test_adapters.py, test_in_llm_methods.py, test_loglikelihood.py and test_cost.py.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import wrap
from tokenprune.adapters.llava_onevision import _bilinear_matrix, compose_high_res, high_res_layout
from tokenprune.pruner import PrunerNeeds
from tokenprune.zoo.tiny_llava_onevision import tiny_llava_onevision

from test_adapters import PROMPTS, images, lvlm_for


@functools.lru_cache(maxsize=None)
def variant(**kw):
    """A tiny OneVision with builder options (``vision`` given as key-value pairs, hashable)."""
    kw = {k: dict(v) if k == "vision" else v for k, v in kw.items()}
    return wrap(*tiny_llava_onevision(**kw))


def placed(lvlm, batch, views) -> torch.Tensor:
    """Every view's tokens written at its sequence positions, read back at the image placeholders
    in sequence order: ``[all image tokens of the batch, D]``, as HF's ``masked_scatter`` lays them."""
    ids = batch["input_ids"]
    seq = torch.zeros(*ids.shape, views[0].tokens.shape[-1])
    for v in views:
        seq[v.sample, v.seq_index] = v.tokens.float()
    return seq[ids == lvlm.model.config.image_token_id]


def hf_packed(lvlm, batch) -> torch.Tensor:
    """The model's own ``get_image_features`` (+ ``pack_image_features``), concatenated: ``[tokens, D]``."""
    with torch.no_grad():
        out = lvlm.model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"], return_dict=True)
    return torch.cat(out.pooler_output).float()


def test_view_layout_hand_checked_and_equal_to_pack_image_features():
    lvlm = lvlm_for("llava_onevision")  # 40 px crops of 5x5 tokens, pinpoints up to 2x2 crops, anyres_max_3
    batch = lvlm.prepare(images(), PROMPTS)
    views = lvlm.encode_images(batch, PrunerNeeds())
    # 96x96: best pinpoint 80x80 -> 2x2 crops, stitched 10x10, square (no unpadding);
    #   r = sqrt(100 / (3 * 25)) = 1.155 > 1.1 -> (10 // r, 10 // r) = 8x8, 8 newlines: 25 + 64 + 8 = 97.
    # 80x112: 2x2 crops, 10x10 stitched; width-bound: round(80 * 10 / 112) = 7 rows, padding (10 - 7) // 2 = 1
    #   each side -> 8x10; r = sqrt(80 / 75) = 1.033 <= 1.1: kept, 8 newlines: 25 + 80 + 8 = 113.
    assert [(v.sample, v.grid, v.prunable) for v in views] == [
        (0, (5, 5), True), (0, (8, 8), True), (0, (8, 1), False),
        (1, (5, 5), True), (1, (8, 10), True), (1, (8, 1), False),
    ]
    assert [v.tokens.shape[0] for v in views] == [25, 64, 8, 25, 80, 8]
    n_image = (batch["input_ids"] == lvlm.model.config.image_token_id).sum(1).tolist()
    assert n_image == [97, 113]  # the processor's placeholder count agrees
    with torch.no_grad():
        packed = lvlm.model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                     batch_num_images=batch["batch_num_images"], return_dict=True)
    assert [p.shape[0] for p in packed.pooler_output] == [97, 113]
    # the newline ends every high-res row: positions 25 + 9i + 8 of the image span
    for v, width in ((views[2], 8), (views[5], 10)):  # the newline ends every high-res row
        span = (batch["input_ids"][v.sample] == lvlm.model.config.image_token_id).nonzero().flatten()
        assert v.seq_index.tolist() == span[25 + width::width + 1].tolist()
    assert (placed(lvlm, batch, views) - hf_packed(lvlm, batch)).abs().max().item() <= 1e-6


def test_downsampling_path_non_square_grid_features_and_attention():
    """``anyres_max_1``: 80x112's unpadded 8x10 grid, r = sqrt(80 / 25) = 1.789 -> (8 // r, 10 // r) = 4x5."""
    lvlm = variant(max_num_patches=1)
    img = images()[1:]
    batch = lvlm.prepare(img, PROMPTS[:1])
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    assert [v.grid for v in views] == [(5, 5), (4, 5), (4, 1)]
    assert (placed(lvlm, batch, views) - hf_packed(lvlm, batch)).abs().max().item() <= 1e-6
    ref = lvlm.reference_vision_attention(batch, -2)
    prunable = [v for v in views if v.prunable]
    for v, r in zip(prunable, ref):
        assert v.vision_attention.shape == r.shape
        assert (v.vision_attention - r).abs().max().item() <= 1e-6
    # scores follow the features' map: W = Wh (x) Ww (the formula) applied to the unpadded projected
    # crop tokens gives the model's downsampled tokens
    with torch.no_grad():
        tower = lvlm.model.model.vision_tower
        hidden = tower(batch["pixel_values"][0, :5], output_hidden_states=True).hidden_states[-1]
        feats = lvlm.model.model.multi_modal_projector(hidden)  # [5 crops, 25, D]
    grid = feats[1:].view(2, 2, 5, 5, -1).permute(0, 2, 1, 3, 4).reshape(10, 10, -1)[1:9]  # stitched, unpadded
    w = torch.kron(_bilinear_matrix(8, 4), _bilinear_matrix(10, 5))
    assert (w @ grid.reshape(80, -1) - views[1].tokens).abs().max().item() <= 1e-5
    # and the model's logits are unchanged by the adapter
    out = lvlm.generate(img, PROMPTS[:1], max_new_tokens=1)
    with torch.no_grad():
        ref_logits = lvlm.model(**batch).logits[:, -1].float()
    assert (out.first_logits - ref_logits).abs().max().item() <= 1e-5


def test_compose_high_res_equals_dense_w_a_wt():
    """The crop-by-crop rectangles sum to the dense ``W A W^T``: a 100x200 image on 3x3 crops of 3x3 tokens,
    stitched 9x9, unpadded to rows 2..6 (5x9), ``anyres_max_1``: r = sqrt(45 / 9) = 2.236 -> 2x4, whose
    rows and columns both blend tokens of neighbouring crops; with a prefix (CLS) row and column."""
    torch.manual_seed(0)
    layout = high_res_layout((100, 200), [[90, 90]], 30, 3, 1)
    assert (layout.crops, layout.top, layout.unpadded, layout.out) == ((3, 3), 2, (5, 9), (2, 4))
    nph, npw = layout.crops
    c, s = nph * npw, layout.side
    maps = torch.rand(c, 1 + s * s, 1 + s * s).softmax(-1)
    got = compose_high_res(maps, layout, prefix=1)
    rows, cols = torch.meshgrid(torch.arange(nph * s), torch.arange(npw * s), indexing="ij")
    crop, token = ((rows // s) * npw + cols // s).flatten(), ((rows % s) * s + cols % s).flatten()
    block = maps[crop[:, None], 1 + token[:, None], 1 + token[None, :]] * (crop[:, None] == crop[None, :])
    sel = torch.zeros(nph * s, npw * s, dtype=torch.bool)
    h, w = layout.unpadded
    sel[layout.top:layout.top + h, layout.left:layout.left + w] = True
    sel = sel.flatten()
    wmat = torch.kron(_bilinear_matrix(h, layout.out[0]), _bilinear_matrix(w, layout.out[1]))
    assert layout.downsampled
    expected = wmat @ block[sel][:, sel] @ wmat.T
    assert (got[1:, 1:] - expected).abs().max().item() <= 1e-6
    assert (got[0, 1:] - wmat @ maps[crop, 0, 1 + token][sel]).abs().max().item() <= 1e-6
    assert (got[1:, 0] - wmat @ maps[crop, 1 + token, 0][sel]).abs().max().item() <= 1e-6


def test_cls_prefix_tower_matches_hugging_face_and_eager_reference():
    """A CLIP tower with ``vision_feature_select_strategy="default"`` (CLS dropped): the prefix row and
    column of the composed map, downsampled (96x96 -> 8x8)."""
    lvlm = variant(strategy="default", vision=(("model_type", "clip_vision_model"), ("projection_dim", 32)))
    imgs = images()
    batch = lvlm.prepare(imgs, PROMPTS)
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2)) if v.prunable]
    assert [v.grid for v in views] == [(5, 5), (8, 8), (5, 5), (8, 10)] and views[1].vision_prefix == 1
    for v, r in zip(views, lvlm.reference_vision_attention(batch, -2)):
        assert v.vision_attention.shape == r.shape == (1 + v.tokens.shape[0],) * 2
        assert (v.vision_attention - r).abs().max().item() <= 1e-6
    out = lvlm.generate(imgs[:1], PROMPTS[:1], max_new_tokens=1)
    b1 = lvlm.prepare(imgs[:1], PROMPTS[:1])
    with torch.no_grad():
        ref_logits = lvlm.model(**b1).logits[:, -1].float()
    assert (out.first_logits - ref_logits).abs().max().item() <= 1e-5
    kept = lvlm.generate(imgs, PROMPTS, pruner=tp.create_pruner("fopru_rank", ratio=0.5, score_axis="cls"), max_new_tokens=1)
    assert [s.visual_tokens_kept for s in kept.stats] == [13 + 32, 13 + 40]


def test_multi_image_sample_batch_num_images():
    """Two images in one prompt (``batch_num_images=[2]``): each is one base crop + one newline,
    as ``get_image_features`` decides; the layout matches the model's packed features."""
    lvlm = lvlm_for("llava_onevision")
    imgs = images()
    text = lvlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}],
        add_generation_prompt=True, tokenize=False)
    batch = dict(lvlm.processor(images=[imgs], text=[text], return_tensors="pt"))
    assert batch["batch_num_images"].tolist() == [2]
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    assert [(v.grid, v.prunable) for v in views] == [((5, 5), True), ((1, 1), False)] * 2
    assert (placed(lvlm, batch, views) - hf_packed(lvlm, batch)).abs().max().item() <= 1e-6
    ref = lvlm.reference_vision_attention(batch, -2)
    assert all((v.vision_attention - r).abs().max().item() <= 1e-6 for v, r in zip(views[::2], ref))


def test_fopru_cls_axis_refused_in_one_line_on_siglip():
    lvlm = lvlm_for("llava_onevision")
    assert lvlm.model.config.vision_feature_select_strategy == "full"  # SigLIP: no CLS to drop
    with pytest.raises(tp.OptionError) as err:
        lvlm.generate(images(1), PROMPTS[:1], pruner=tp.pruner_from_spec("fopru_rank:score_axis=cls", ratio=0.5),
                      max_new_tokens=1)
    message = str(err.value)
    assert "\n" not in message and "score_axis='cls'" in message and "CLS" in message
    # the CLS-based presets fall back to FoPru's column mean here, as on Qwen2-VL
    out = lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("fastervlm", ratio=0.5), max_new_tokens=1)
    assert out.stats[0].visual_tokens_kept == 13 + 32


def test_anyres_max_other_than_digits_is_refused():
    from tokenprune.adapters.llava_onevision import max_num_patches

    assert max_num_patches("anyres_max_9") == 9
    with pytest.raises(tp.OptionError, match="anyres_max_N"):
        max_num_patches("anyres")


# -- token regions (tokenprune.visualize): LLaVA-NeXT's geometry + the downsampled grid's footprints --------
@pytest.mark.parametrize("size", [(120, 70), (70, 120), (96, 96)], ids=["wide", "tall", "downsampled"])
def test_regions_match_the_views_and_tile_the_image(size):
    from test_visualize_regions import test_regions_match_the_views_and_tile_the_image as check

    check("tiny-llava-onevision", size)  # the generic checks: grids, bounds, no overlap, no holes, raster order


@pytest.mark.parametrize("max_patches,size,grid", [(3, (96, 96), (8, 8)), (1, (112, 80), (4, 5))])
def test_region_centres_are_where_the_downsampled_pixels_come_from(max_patches, size, grid):
    """Each high-res token's box centre == the centre of the processor pixels the model blends into it
    (block means of the crops, stitched, unpadded, then the bilinear ``W`` from the formula)."""
    from test_visualize_regions import coordinate_image

    from tokenprune.visualize import token_regions

    lvlm = variant(max_num_patches=max_patches)
    image = coordinate_image(*size)
    width, height = size
    regions = token_regions(lvlm, image, "describe the image")
    assert regions[1].grid == grid
    ip = lvlm.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    crops = lvlm.prepare([image], ["describe the image"])["pixel_values"][0].float()  # [5, 3, 40, 40]
    blocks = crops.reshape(5, 3, 5, 8, 5, 8).mean((3, 5)).permute(0, 2, 3, 1)  # [crop, 5, 5, rgb]
    stitched = blocks[1:].view(2, 2, 5, 5, 3).permute(0, 2, 1, 3, 4).reshape(10, 10, 3)
    layout = lvlm._layout((height, width))
    (h, w), top, left = layout.unpadded, layout.top, layout.left
    kron = torch.kron(_bilinear_matrix(h, grid[0]), _bilinear_matrix(w, grid[1]))
    rgb = kron @ stitched[top:top + h, left:left + w].reshape(-1, 3) * std + mean
    decoded = (rgb[:, :2] * torch.tensor([width, height])).numpy()
    b = regions[1].boxes
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    # tokens blending a partly padded (clipped) row are darkened by the padding: compare whole ones
    whole = np.isclose(b[:, 2] - b[:, 0], (b[:, 2] - b[:, 0]).max()) & \
        np.isclose(b[:, 3] - b[:, 1], (b[:, 3] - b[:, 1]).max())
    assert whole.sum() >= len(b) // 2
    assert (np.abs(centres - decoded)[whole] / np.array(size)).max() < 0.005
