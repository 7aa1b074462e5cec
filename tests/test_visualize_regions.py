"""Visual tokens mapped back to image regions (tokenprune.visualize), for every family.

* the regions line up with the adapter's views (order, grids, counts), stay in the image, and tile
  it (each view: no overlap, full cover of the part the model sees);
* the boxes are where the processor's pixels really come from: an image whose colour encodes the
  pixel coordinates is run through the model's processor, and each token's pixels decode to its
  box centre (independent of regions.py's arithmetic);
* drawn panels read back right: a checkerboard and a single kept token on a uniform grey image,
  saved as PNG, bright exactly at the kept tokens' centres and dim elsewhere;
* a few boxes computed by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.errors import OptionError
from tokenprune.visualize import ViewRegions, compose, draw_tokens, panel_layout, token_regions

PROMPT = "describe the image"

# (zoo model, image (width, height)): non-square images, so there is center crop (LLaVA),
# unpadding (LLaVA-NeXT), an off-square dynamic resolution (Qwen) and several tiles (InternVL).
CASES = [
    ("tiny-llava", (120, 70)),
    ("tokenprune-demo", (160, 90)),
    ("tiny-llava-next", (120, 70)),
    ("tiny-llava-next", (70, 120)),
    ("tiny-qwen2-vl", (120, 70)),
    ("tiny-qwen2.5-vl", (70, 120)),
    ("tiny-qwen3-vl", (120, 70)),
    ("tiny-internvl", (160, 40)),
    ("tiny-internvl", (64, 64)),
]
IDS = [f"{name}-{w}x{h}" for name, (w, h) in CASES]

_MODELS: dict[str, object] = {}


def _demo_cached() -> bool:
    from tokenprune.zoo import demo

    return (demo.cache_dir() / "demo-v1" / "smollm2.safetensors").exists()


def lvlm(name: str):
    if name == "tokenprune-demo" and not _demo_cached():
        pytest.skip("demo weights not converted yet (first conversion is slow; tests/test_demo.py covers it)")
    if name not in _MODELS:
        _MODELS[name] = tp.load(name)
    return _MODELS[name]


def prunable_views(model, image):
    return [v for v in model.encode([image], [PROMPT]).views if v.prunable]


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``[P, N]``: point p in box n (half-open, so shared edges count once)."""
    x, y = points[:, 0:1], points[:, 1:2]
    return (x >= boxes[None, :, 0]) & (x < boxes[None, :, 2]) & (y >= boxes[None, :, 1]) & (y < boxes[None, :, 3])


def _pixel_centres(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5], 1)


# -- 1. regions line up with the views and tile the image ----------------------------------------------
@pytest.mark.parametrize("name,size", CASES, ids=IDS)
def test_regions_match_the_views_and_tile_the_image(name, size):
    model = lvlm(name)
    width, height = size
    image = Image.new("RGB", size, (128, 128, 128))
    views = prunable_views(model, image)
    regions = token_regions(model, image, PROMPT, views=views)

    assert [r.grid for r in regions] == [tuple(v.grid) for v in views]
    assert [len(r.boxes) for r in regions] == [v.tokens.shape[0] for v in views]
    points = _pixel_centres(width, height)
    for r in regions:
        b = r.boxes
        assert b.shape == (r.grid[0] * r.grid[1], 4)
        assert (b[:, [0, 2]] >= 0).all() and (b[:, [0, 2]] <= width).all(), r.label
        assert (b[:, [1, 3]] >= 0).all() and (b[:, [1, 3]] <= height).all(), r.label
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all(), r.label
        # no two tokens of a view overlap: every pixel centre is in at most one box
        hits = _inside(points, b).sum(1)
        assert hits.max() <= 1, f"{r.label}: overlapping tokens"
        # the view covers the part of the image it sees: a rectangle, every pixel in it in one box
        x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
        seen = (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)
        assert (hits[seen] == 1).all(), f"{r.label}: holes inside the view"
        # token raster order: box centres increase along rows, then down columns
        c = ((b[:, 0] + b[:, 2]) / 2).reshape(r.grid)
        m = ((b[:, 1] + b[:, 3]) / 2).reshape(r.grid)
        assert (np.diff(c, axis=1) > 0).all() and (np.diff(m, axis=0) > 0).all(), r.label

    labels = [r.label for r in regions]
    extents = {r.label: (r.boxes[:, 0].min(), r.boxes[:, 1].min(), r.boxes[:, 2].max(), r.boxes[:, 3].max())
               for r in regions}
    full = (0, 0, width, height)
    if name in ("tiny-llava", "tokenprune-demo"):
        # shortest-edge resize + center crop of a wide image: full height, the centre of the width
        x0, y0, x1, y1 = extents["image"]
        assert (y0, y1) == (0, height) and 0 < x0 and x1 < width
        assert abs(x0 - (width - x1)) < width / 64  # centred to within one resized pixel
    elif name == "tiny-llava-next":
        assert labels == ["base", "high-res"]
        assert extents["base"] == full
        # unpadding keeps whole token rows: at most a sliver of less than a token is in none
        hi = regions[1].boxes
        pitch = max((hi[:, 2] - hi[:, 0]).max(), (hi[:, 3] - hi[:, 1]).max())
        x0, y0, x1, y1 = extents["high-res"]
        assert max(x0, y0, width - x1, height - y1) < pitch
        # the padded axis is the short one: the high-res grid is unpadded along it
        h, w = regions[1].grid
        assert (h < w) == (width > height)
    elif name.startswith("tiny-qwen"):
        assert labels == ["image"] and extents["image"] == full
    elif name == "tiny-internvl":
        tiles = [r for r in regions if r.label.startswith("tile")]
        assert labels == [r.label for r in tiles] + ["thumbnail"]
        assert len(tiles) == 4  # 4:1 -> a 4x1 canvas; square -> 2x2 (ties favour more tiles)
        assert extents["thumbnail"] == full
        # the tiles together cover the image exactly once
        union = _inside(points, np.concatenate([t.boxes for t in tiles])).sum(1)
        assert (union == 1).all()
        if size == (160, 40):
            assert [extents[t.label][0] for t in tiles] == [0, 40, 80, 120]


def test_view_mismatch_is_an_error_not_a_wrong_picture():
    model = lvlm("tiny-llava")
    image = Image.new("RGB", (64, 64))
    views = prunable_views(model, image)
    views[0].grid = (4, 16)
    with pytest.raises(OptionError, match="does not match"):
        token_regions(model, image, views=views)


# -- 2. the processor's pixels come from the boxes -------------------------------------------------------
def coordinate_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y (pixel centres, as a fraction of the size), blue constant."""
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    rgb = np.stack([np.broadcast_to(x[None], (height, width)), np.broadcast_to(y[:, None], (height, width)),
                    np.full((height, width), 0.5)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def decoded_centres(model, image: Image.Image) -> list[np.ndarray]:
    """Per prunable view, each token's ``(x, y)``: the mean colour of the processor pixels the
    adapter feeds that token, decoded. Layouts written out here independently of regions.py."""
    width, height = image.size
    batch = model.prepare([image], [PROMPT])
    cfg, ip = model.model.config, model.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)

    def blocks(img, gh, gw, bh, bw):  # [3, H, W] normalised -> [gh * gw, 3] block means, raster
        img = img[:, :gh * bh, :gw * bw].float()
        rgb = img.reshape(3, gh, bh, gw, bw).mean((2, 4)).permute(1, 2, 0).reshape(-1, 3)
        return rgb * std + mean

    def xy(rgb):
        return (rgb[:, :2] * torch.tensor([width, height])).numpy()

    if model.family == "llava":
        p = cfg.vision_config.patch_size
        img = batch["pixel_values"][0]
        return [xy(blocks(img, img.shape[1] // p, img.shape[2] // p, p, p))]
    if model.family in ("qwen2_vl", "qwen3_vl"):  # patches in merge order: token t = patches 4t..4t+3
        px = batch["pixel_values"].view(-1, ip.merge_size ** 2, 3, ip.temporal_patch_size, ip.patch_size, ip.patch_size)
        return [xy(px.float().mean((1, 3, 4, 5)) * std + mean)]
    if model.family == "internvl":  # pixel shuffle: token (i, j) = patches (2i..2i+1, 2j..2j+1)
        p = cfg.vision_config.patch_size[0]
        tiles = batch["pixel_values"]
        s = tiles.shape[-1] // p // 2
        return [xy(blocks(t, s, s, 2 * p, 2 * p)) for t in tiles]
    if model.family == "llava_next":  # base, then the crops stitched and unpadded (centred)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        p = cfg.vision_config.patch_size
        side = cfg.vision_config.image_size // p
        crops = batch["pixel_values"][0]
        nph, npw = get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        per_crop = [blocks(crops[1 + k], side, side, p, p).view(side, side, 3) for k in range(nph * npw)]
        stitched = torch.cat([torch.cat(per_crop[r * npw:(r + 1) * npw], 1) for r in range(nph)], 0)
        h, w = unpad_image(torch.zeros(1, nph * side, npw * side), (height, width)).shape[1:]
        dh, dw = (nph * side - h) // 2, (npw * side - w) // 2
        return [xy(blocks(crops[0], side, side, p, p)), xy(stitched[dh:dh + h, dw:dw + w].reshape(-1, 3))]
    raise AssertionError(model.family)


@pytest.mark.parametrize("name,size", CASES, ids=IDS)
def test_boxes_are_where_the_processor_pixels_come_from(name, size):
    model = lvlm(name)
    image = coordinate_image(*size)
    regions = token_regions(model, image, PROMPT)
    decoded = decoded_centres(model, image)
    assert len(decoded) == len(regions)
    for r, d in zip(regions, decoded):
        b = r.boxes
        whole = np.isclose(b[:, 2] - b[:, 0], (b[:, 2] - b[:, 0]).max()) & \
            np.isclose(b[:, 3] - b[:, 1], (b[:, 3] - b[:, 1]).max())  # tokens not clipped at a padded edge
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
        error = np.abs(centres - d)[whole] / np.array(size)
        assert whole.sum() >= len(b) // 2
        assert error.max() < 0.005, f"{r.label}: token centres off by {error.max():.4f} of the image"


# -- 3. boxes by hand ---------------------------------------------------------------------------------------
def test_hand_computed_boxes_tiny_llava():
    model = lvlm("tiny-llava")  # CLIP processor: shortest edge 64, center crop 64x64; 8 px patches
    square = token_regions(model, Image.new("RGB", (128, 128)))[0]
    assert square.grid == (8, 8)
    np.testing.assert_allclose(square.boxes[0], [0, 0, 16, 16])
    np.testing.assert_allclose(square.boxes[9], [16, 16, 32, 32])  # row 1, column 1
    np.testing.assert_allclose(square.boxes[63], [112, 112, 128, 128])

    # 128x96: resized to 85x64 (int(64 * 128 / 96) = 85), cropped at x = (85 - 64) // 2 = 10
    wide = token_regions(model, Image.new("RGB", (128, 96)))[0]
    sx = 128 / 85
    np.testing.assert_allclose(wide.boxes[0], [10 * sx, 0, 18 * sx, 12])
    np.testing.assert_allclose(wide.boxes[7], [66 * sx, 0, 74 * sx, 12])  # row 0, last column
    np.testing.assert_allclose(wide.boxes[63], [66 * sx, 84, 74 * sx, 96])


def test_hand_computed_boxes_qwen_and_internvl():
    # Qwen2-VL, 8 px patches merged 2x2: 120x70 -> smart_resize to 128x64 -> 8x4 tokens of 16 px
    qwen = token_regions(lvlm("tiny-qwen2-vl"), Image.new("RGB", (120, 70)))[0]
    assert qwen.grid == (4, 8)
    np.testing.assert_allclose(qwen.boxes[0], [0, 0, 16 * 120 / 128, 16 * 70 / 64])
    np.testing.assert_allclose(qwen.boxes[9], [16 * 120 / 128, 16 * 70 / 64, 32 * 120 / 128, 32 * 70 / 64])
    # InternVL, 32 px tiles, 4 px patches shuffled 2x2: 160x40 -> 4x1 tiles of 40x40 original pixels
    regions = token_regions(lvlm("tiny-internvl"), Image.new("RGB", (160, 40)))
    np.testing.assert_allclose(regions[1].boxes[0], [40, 0, 50, 10])  # tile 2, first token
    np.testing.assert_allclose(regions[-1].boxes[5], [40, 10, 80, 20])  # thumbnail, row 1 column 1


def test_hand_computed_boxes_demo_center_crop():
    # DINOv2 preprocessing: shortest edge 224, center crop 224, 14 px patches (16x16 tokens).
    # 448x336 -> 298x224 (int(224 * 448 / 336) = 298), crop at x = (298 - 224) // 2 = 37
    regions = token_regions(lvlm("tokenprune-demo"), Image.new("RGB", (448, 336)))[0]
    sx = 448 / 298
    assert regions.grid == (16, 16)
    np.testing.assert_allclose(regions.boxes[0], [37 * sx, 0, 51 * sx, 21])
    np.testing.assert_allclose(regions.boxes[17], [51 * sx, 21, 65 * sx, 42])


# -- 4. drawn panels read back ------------------------------------------------------------------------------
GREY, DIM = 128, 0.25


def _readback(panel: Image.Image, tmp_path, tag: str) -> np.ndarray:
    path = tmp_path / f"{tag}.png"
    panel.save(path)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _token_pixels(layout, regions, heat: bool = False):
    """``{(view, token): (x, y)}`` panel pixel at each token's box centre (tokens >= 3 px drawn)."""
    out = {}
    for g in layout.groups:
        for v in g.views:
            for i, (x0, y0, x1, y1) in enumerate(regions[v].boxes):
                if min(x1 - x0, y1 - y0) * g.scale < 3:
                    continue
                x, y = g.to_panel((x0 + x1) / 2, (y0 + y1) / 2, heat=heat)
                out[v, i] = (int(x), int(y))
    return out


@pytest.mark.parametrize("name,size", CASES, ids=IDS)
def test_drawn_kept_tokens_read_back(name, size, tmp_path):
    model = lvlm(name)
    image = Image.new("RGB", size, (GREY,) * 3)
    regions = token_regions(model, image, PROMPT)
    checker = [np.indices(r.grid).sum(0).reshape(-1) % 2 for r in regions]
    hot_view = len(regions) - 1
    hot_token = len(regions[hot_view]) // 2 + 1
    one_hot = [np.zeros(len(r)) for r in regions]
    one_hot[hot_view][hot_token] = 1
    patterns = {"checker": (checker, None), "one_hot": (one_hot, one_hot)}
    for tag, (kept, scores) in patterns.items():
        panel = draw_tokens(image, regions, kept, scores=scores, title=name, caption="an answer", dim=DIM)
        layout = panel_layout(image.size, regions, scores=scores is not None, title=name, caption="an answer")
        assert panel.size == (layout.width, layout.height)
        pixels = _readback(panel, tmp_path, f"{tag}")
        spots = _token_pixels(layout, regions)
        assert len(spots) == sum(len(r) for r in regions), "every token is drawn at least 3 px wide here"
        bright = {key for key, (x, y) in spots.items() if abs(pixels[y, x] - GREY).max() <= 2}
        dark = {key for key, (x, y) in spots.items() if abs(pixels[y, x] - round(GREY * DIM)).max() <= 2}
        expected = {(v, i) for v, k in enumerate(kept) for i in np.flatnonzero(k)}
        assert bright == expected, tag
        assert dark == set(spots) - expected, tag
        if scores is not None:  # per view min-max: the hot token is inferno's top, every other token
            from matplotlib import colormaps  # its bottom (constant views included)

            top, bottom = (0.8 * np.array(colormaps["inferno"](x)[:3]) * 255 + 0.2 * GREY for x in (1.0, 0.0))
            heat = _token_pixels(layout, regions, heat=True)
            assert len(heat) == len(spots)
            for (v, i), (x, y) in heat.items():
                want = top if (v, i) == (hot_view, hot_token) else bottom
                assert np.abs(pixels[y, x] - want).max() <= 3, (v, i)


def test_partial_values_in_between_and_bad_inputs(tmp_path):
    model = lvlm("tiny-qwen2-vl")
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    regions = token_regions(model, image)
    kept = [np.full(len(regions[0]), 0.5)]
    pixels = _readback(draw_tokens(image, regions, kept, dim=0.0), tmp_path, "half")
    for x, y in _token_pixels(panel_layout(image.size, regions), regions).values():
        assert abs(pixels[y, x] - 100).max() <= 2  # 0 + (1 - 0) * 0.5 of 200
    with pytest.raises(ValueError, match="values for"):
        draw_tokens(image, regions, [np.ones(3)])
    with pytest.raises(ValueError, match="arrays for"):
        draw_tokens(image, regions, [])
    with pytest.raises(ValueError):
        ViewRegions("image", (2, 2), np.zeros((3, 4)))


def test_compose_grid():
    panels = [Image.new("RGB", (100, 80 + 10 * i), "red") for i in range(3)]
    row = compose(panels)
    assert row.size == (3 * 100 + 4 * 12, 100 + 2 * 12)
    grid = compose(panels, columns=2)
    assert grid.size == (2 * 100 + 3 * 12, 2 * 100 + 3 * 12)
    arr = np.asarray(grid)
    assert (arr[0, 0] == 255).all() and (arr[12, 12] == [255, 0, 0]).all()
