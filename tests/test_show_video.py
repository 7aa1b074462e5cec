"""`tokenprune show` on video: token -> frame regions, kept tokens recorded per frame, frame strips.

* regions: per family, a video whose colours encode pixel coordinates (and the frame index) goes
  through the real processor; each token's processor pixels decode back to the centre of its box
  in the right frame (the decoding is written out here from each family's tensor layout);
* recording: per frame, the recorded kept mask equals the sequence positions the adapter's
  ``prune_views`` keeps, computed by calling it directly, at scope frame and clip (including the
  per-view rankings that never call ``select``); in-LLM indices map back by sequence position;
  what a sweep stores per frame reads back;
* strips: the drawn figure has one cell per shown frame and row, kept tokens at full brightness,
  dropped ones dimmed, merged in between, the right frame in each cell; the CLI and galleries.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.media import write_video
from tokenprune.adapters import load as _load  # tests patch tokenprune.adapters.load to hand out the cached models
from tokenprune.adapters.pre_llm import prune_views
from tokenprune.cli import main
from tokenprune.pruner import Reduction
from tokenprune.visualize import ViewRegions, token_regions
from tokenprune.visualize.draw import PAD
from tokenprune.visualize.record import MERGED, Kept, KeptRecorder, ViewSizes, _Call, _Placed, _Scored, record_kept, view_sizes
from tokenprune.visualize.strip import StripRow, draw_strip, pick_frames, strip_layout

av = pytest.importorskip("av")

PROMPT = "what happens ?"
_MODELS: dict[str, object] = {}


def lvlm(name: str):
    if name not in _MODELS:
        _MODELS[name] = _load(name)
    return _MODELS[name]


def coordinate_video(width: int, height: int, frames: int) -> tp.Video:
    """Red = x, green = y (pixel centres, as a fraction of the size), blue = 0.2 + 0.2 * frame index."""
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    out = []
    for f in range(frames):
        rgb = np.stack([np.broadcast_to(x[None], (height, width)), np.broadcast_to(y[:, None], (height, width)),
                        np.full((height, width), 0.2 + 0.2 * f)], -1)
        out.append((rgb * 255).round().astype(np.uint8))
    return tp.Video.from_frames(out, fps=2.0)


def decoded(model, video: tp.Video) -> list[np.ndarray]:
    """Per frame view, each token's ``(x, y, blue)``: the mean colour of the processor pixels the
    adapter feeds it, decoded. Layouts written out from each family's tensors, not from regions.py."""
    batch = model.prepare([video], [PROMPT])
    vp = model.processor.video_processor
    mean, std = torch.tensor(vp.image_mean), torch.tensor(vp.image_std)
    height, width = video.size

    def xyb(rgb):  # [n, 3] normalised -> [n, 3] (x px, y px, blue)
        rgb = rgb * std + mean
        return torch.stack([rgb[:, 0] * width, rgb[:, 1] * height, rgb[:, 2]], 1).numpy()

    def blocks(img, g):  # [3, S, S] -> [g * g, 3] block means, raster
        s = img.shape[-1] // g
        return img[:, :g * s, :g * s].float().reshape(3, g, s, g, s).mean((2, 4)).permute(1, 2, 0).reshape(-1, 3)

    if model.family in ("qwen2_vl", "qwen3_vl"):  # [t*gh*gw, 3*tps*p*p], token = m*m patches, t outermost
        t, gh, gw = batch["video_grid_thw"][0].tolist()
        m, tps, p = vp.merge_size, vp.temporal_patch_size, vp.patch_size
        px = batch["pixel_values_videos"].view(t, gh * gw // m ** 2, m * m, 3, tps, p, p)
        return [xyb(px[k].float().mean((1, 3, 4, 5))) for k in range(t)]
    views = [v for v in model.encode([video], [PROMPT]).views if v.prunable]
    g = views[0].grid[0]
    frames = batch["pixel_values"] if model.family == "internvl" else batch["pixel_values_videos"][0]
    if model.family == "llava_onevision":  # per-patch colours, then the model's bilinear pooling to g x g
        side = frames.shape[-1] // model.model.config.vision_config.patch_size
        out = []
        for f in frames:
            patches = blocks(f, side).T.reshape(1, 3, side, side)
            pooled = torch.nn.functional.interpolate(patches, size=(g, g), mode="bilinear", align_corners=False)
            out.append(xyb(pooled.reshape(3, -1).T))
        return out
    return [xyb(blocks(f, g)) for f in frames]  # NeXT-Video: 2x2 average pooling; InternVL: 2x2 pixel shuffle


# -- 1. regions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-llava-next-video",
                                  "tiny-internvl"])
def test_video_regions_are_where_the_processor_pixels_come_from(name):
    model = lvlm(name)
    width, height, frames = 120, 70, 4  # not square: a squash, a smart resize, or a centre crop
    video = coordinate_video(width, height, frames)
    views = [v for v in model.encode([video], [PROMPT]).views if v.prunable]
    regions = token_regions(model, video, PROMPT, views=views)
    assert [r.grid for r in regions] == [tuple(v.grid) for v in views]
    assert [r.frame for r in regions] == [v.frame for v in views]
    qwen = name.startswith("tiny-qwen")
    assert [r.frames for r in regions] == ([(0, 1), (2, 3)] if qwen else [(f,) for f in range(frames)])
    got = decoded(model, video)
    assert len(got) == len(regions)
    for r, d in zip(regions, got):
        b = r.boxes
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
        error = np.abs(centres - d[:, :2]) / np.array([width, height])
        assert error.max() < 0.01, f"{name} {r.label}: token centres off by {error.max():.4f} of the frame"
        blue = np.mean([0.2 + 0.2 * f for f in r.frames])  # the frames the view's tokens come from
        assert np.abs(d[:, 2] - blue).max() < 0.01, r.label
        assert (b[:, [0, 2]] >= 0).all() and (b[:, [0, 2]] <= width).all()
    if name == "tiny-llava-next-video":  # shortest edge 32 -> 54x32 (int(32 * 120 / 70)), crop 32 at x = 11
        sx = width / 54
        np.testing.assert_allclose(regions[0].boxes[0], [11 * sx, 0, 19 * sx, height / 4])
    if name == "tiny-qwen2-vl":  # the grid covers the whole smart-resized frame: tokens are the frame cut in grid cells
        gh, gw = regions[0].grid
        np.testing.assert_allclose(regions[1].boxes[gw + 1], [width / gw, height / gh, 2 * width / gw, 2 * height / gh])


# -- 2. recording ----------------------------------------------------------------------------------------------
def _positions_kept(model, enc, pruner) -> dict[int, np.ndarray]:
    """Per frame, the kept mask from the sequence positions prune_views keeps (called directly here)."""
    out = prune_views(enc.views, pruner, ["0"], model.project_features)
    kept_seq = torch.cat([o[0] for o, v in zip(out, enc.views) if v.prunable]).numpy()
    return {v.frame: np.isin(v.seq_index.numpy(), kept_seq) for v in enc.views if v.prunable}


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-qwen2-vl"])
@pytest.mark.parametrize("spec", ["fopru_rank", "fopru_rank:scope=clip", "divprune"])
def test_kept_per_frame_equals_the_kept_sequence_positions(name, spec):
    model = lvlm(name)
    video = coordinate_video(64, 48, 4)
    pruner = tp.pruner_from_spec(spec, ratio=0.25)
    enc = model.encode([video], [PROMPT], model.vision_needs(pruner))
    with record_kept(pruner) as rec:
        out = model.generate([video], [PROMPT], pruner=pruner, max_new_tokens=1, encoded=enc, sample_ids=["0"])
    assert "select" not in vars(pruner) and "token_scores" not in vars(pruner)
    kept = rec.kept("0", view_sizes(enc.views, 0))
    want = _positions_kept(model, enc, pruner)
    got = kept.per_frame(kept.stages[-1])
    assert sorted(got) == sorted(want) and all((got[f] == want[f]).all() for f in want), spec
    assert int(kept.stages[-1].sum()) == out.stats[0].visual_per_layer[0]
    if pruner.scope == "clip":  # one budget over the clip: frames keep different counts
        assert int(kept.stages[-1].sum()) == tp.keep_count(0.25, sum(kept.views))
    if spec == "fopru_rank:scope=clip":  # no select call: the scores come from token_scores, top-k across frames
        top = np.sort(np.argsort(-kept.scores, kind="stable")[:int(kept.stages[-1].sum())])
        assert np.nonzero(kept.stages[-1])[0].tolist() == top.tolist()


def test_in_llm_kept_per_frame_and_sweep_rows():
    """FastV on a video: kept count = the budget at the layers after K; the sweep's JSON per frame reads back."""
    from tokenprune.benchmarks.sweep import _kept_json

    model = lvlm("tiny-llava-onevision")
    video = coordinate_video(64, 48, 4)
    pruner = tp.pruner_from_spec("fastv", ratio=0.25)
    enc = model.encode([video], [PROMPT], model.vision_needs(pruner))
    with record_kept(pruner) as rec:
        out = model.generate([video], [PROMPT], pruner=pruner, max_new_tokens=1, encoded=enc, sample_ids=["0"])
    kept = rec.kept("0", view_sizes(enc.views, 0))
    assert int(kept.stages[-1].sum()) == out.stats[0].visual_per_layer[-1] == tp.keep_count(0.25, 36)
    stored = _kept_json(rec, "0", view_sizes(enc.views, 0))
    assert stored["frames"] == [0, 1, 2, 3] and stored["grids"] == [[3, 3]] * 4
    np.testing.assert_allclose(stored["times"], video.times)
    back = Kept.from_json(json.loads(json.dumps(stored)))
    assert all((back.per_frame()[f] == v).all() for f, v in kept.per_frame().items())
    assert "frames" not in Kept(views=[4], stages=[np.ones(4, bool)], merged=np.zeros(4, bool)).to_json()


def test_in_llm_indices_map_back_by_sequence_position():
    """Views given in an order that is not the sequence's: view 0 at positions 7-8, view 1 at 1-3. In-LLM
    token j is the j-th in the sequence: [v1.0, v1.1, v1.2, v0.0, v0.1]; keeping 0 and 3 keeps v1.0 and v0.0."""
    rec = KeptRecorder(in_llm=True, calls=[_Call(["a"], 0, 5, Reduction(indices=torch.tensor([[0, 3]]),
                                                                         scores=torch.tensor([[5.0, 4, 3, 2, 1]])))])
    sizes = ViewSizes([2, 3], seq=[torch.tensor([7, 8]), torch.tensor([1, 2, 3])], grids=[(1, 2), (1, 3)],
                      frames=[2, 0], times=[1.0, 0.0])
    kept = rec.kept("a", sizes)
    assert [v.tolist() for v in kept.per_view(kept.stages[0])] == [[True, False], [True, False, False]]
    assert kept.scores.tolist() == [2, 1, 5, 4, 3]
    assert {f: v.tolist() for f, v in kept.per_frame().items()} == {2: [1.0, 0.0], 0: [1.0, 0.0, 0.0]}
    plain = rec.kept("a", [2, 3])  # counts only: the views are taken to be in sequence order
    assert plain.stages[0].tolist() == [True, False, False, True, False]


def test_clip_scope_kept_tokens_given_to_the_first_view_map_back_by_position():
    """A clip ranking (no select call): every kept token travels with view 0, its position says its frame."""
    views = [SimpleNamespace(sample=0, prunable=True, seq_index=torch.tensor([3, 4, 5])),
             SimpleNamespace(sample=0, prunable=False, seq_index=torch.tensor([6])),
             SimpleNamespace(sample=0, prunable=True, seq_index=torch.tensor([7, 8, 9]))]
    kept_seq = torch.tensor([4, 8, 9])
    out = [(kept_seq, None, kept_seq, None), (views[1].seq_index, None, views[1].seq_index, None),
           (kept_seq[:0], None, kept_seq[:0], None)]
    rec = KeptRecorder(in_llm=False, placed=[_Placed(views, ["s"], out)],
                       scored=[_Scored(["s/0", "s/1"], torch.tensor([[1.0, 9, 2], [0.0, 8, 7]]))])
    kept = rec.kept("s", [3, 3])
    assert [v.tolist() for v in kept.per_view(kept.value)] == [[0, 1, 0], [0, 1, 1]]
    assert kept.scores.tolist() == [1, 9, 2, 0, 8, 7]
    with pytest.raises(KeyError):
        rec.kept("t", [3, 3])


# -- 3. strips -------------------------------------------------------------------------------------------------
GREY0, STEP, DIM = 60, 6, 0.25


def _grey_video(frames: int, size=(40, 30)) -> tp.Video:
    """Frame f a flat grey of GREY0 + STEP * f (so a cell shows which frame it drew)."""
    w, h = size
    return tp.Video.from_frames([np.full((h, w, 3), GREY0 + STEP * f, np.uint8) for f in range(frames)], fps=4.0)


def _regions(frames: int, span: int = 1, size=(40, 30)) -> list[ViewRegions]:
    """One 3x4 view of 10x10 px tokens per ``span`` frames."""
    from tokenprune.visualize.regions import _grid_boxes

    w, h = size
    return [ViewRegions(f"frame {f}", (3, 4), _grid_boxes(3, 4, h / 3, w / 4), clip=0, frame=f,
                        frames=tuple(range(f, min(f + span, frames))), time=f / 4.0) for f in range(0, frames, span)]


def test_strip_cells_and_token_brightness(tmp_path):
    video = _grey_video(20)
    regions = _regions(20)
    checker = [np.indices((3, 4)).sum(0).reshape(-1) % 2 for _ in regions]
    merged = [np.full(12, MERGED) for _ in regions]
    rows = [StripRow("none", [np.ones(12)] * len(regions), "answer: a"), StripRow("checker", checker, "answer: b"),
            StripRow("merged", merged, "answer: c")]
    fig = draw_strip(video, regions, rows, header="a header", cell=80, max_frames=8, dim=DIM)
    layout = strip_layout((40, 30), regions, rows, header="a header", cell=80, max_frames=8)
    assert fig.size == (layout.width, layout.height)
    shown = pick_frames(20, 8)
    assert shown == [0, 3, 5, 8, 11, 14, 16, 19]
    assert [f for f, _ in layout.cells] == shown and len(layout.xs) == 8 and len(layout.row_tops) == 3
    assert layout.width == PAD + 8 * (80 + PAD)
    assert any("frames shown: 0, 3, 5, 8, 11, 14, 16, 19 (8 of 20" in line for line in layout.header_lines)
    fig.save(tmp_path / "strip.png")
    pixels = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB")).astype(int)
    boxes = regions[0].boxes
    for r, row in enumerate(rows):
        for c, (frame, views) in enumerate(layout.cells):
            level = GREY0 + STEP * frame
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                x, y = layout.to_panel(r, c, (x0 + x1) / 2, (y0 + y1) / 2)
                value = row.kept[views[0]][i]
                want = round(level * (DIM + (1 - DIM) * value))
                assert abs(pixels[int(y), int(x)] - want).max() <= 2, (row.title, frame, i)


def test_strip_of_temporal_patches_says_so():
    video = _grey_video(6)
    regions = _regions(6, span=2)  # Qwen: frames (0, 1), (2, 3), (4, 5)
    layout = strip_layout((40, 30), regions, [StripRow("none", [np.ones(12)] * 3)], cell=60)
    assert [f for f, _ in layout.cells] == [0, 2, 4]
    assert "temporal patch of 2 frames" in " ".join(layout.header_lines)
    fig = draw_strip(video, regions, [StripRow("none", [np.ones(12)] * 3)], cell=60)
    x, y = layout.to_panel(0, 1, 20, 15)  # the cell of frames 2-3 shows frame 2
    assert abs(np.asarray(fig)[int(y), int(x)].astype(int) - (GREY0 + 2 * STEP)).max() <= 2
    with pytest.raises(ValueError, match="values for"):
        draw_strip(video, regions, [StripRow("bad", [np.ones(3)] * 3)])


def _write_mp4(path, frames: int = 12, size=(64, 48)):
    w, h = size
    clip = np.full((frames, h, w, 3), 200, np.uint8)
    for t in range(frames):  # a red bar moving right
        clip[t, 8:24, 4 + 3 * t:20 + 3 * t] = (220, 40, 40)
    write_video(path, clip, fps=8, options={})  # mpeg4 at its default quality, as drawn in the figures
    return path


def test_show_video_cli(tmp_path, capsys, monkeypatch):
    import tokenprune.adapters

    monkeypatch.setattr(tokenprune.adapters, "load", lambda name, **kw: lvlm(name))  # the cached tiny model
    mp4 = _write_mp4(tmp_path / "clip.mp4")
    out = tmp_path / "strip.png"
    assert main(["show", str(mp4), "--model", "tiny-qwen2-vl", "--methods", "fopru_rank,fastv,divprune",
                 "--ratio", "0.25", "--frames", "6", "--output", str(out)]) == 0
    assert "tokenprune show:" in capsys.readouterr().out
    fig = Image.open(out)
    assert fig.width == PAD + 3 * (160 + PAD)  # 6 frames = 3 temporal patches, 160 px cells
    assert fig.height > 4 * 120  # none + 3 methods
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    assert main(["show", str(png), "--frames", "4"]) == 2
    assert "is an image: drop them" in capsys.readouterr().err
    assert main(["show", str(mp4)]) == 2
    assert "a video needs a video model" in capsys.readouterr().err
    assert main(["show", str(mp4), "--model", "tiny-qwen2-vl", "--sampler", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_gallery_draws_a_video_sample_as_a_small_strip(tmp_path, monkeypatch):
    """Rows as a sweep writes them (the sweep's own _kept_json); the gallery redraws from the stored frames and
    grids without a vision pass."""
    from tokenprune.benchmarks.sweep import _kept_json
    from tokenprune.visualize import gallery, show

    model = lvlm("tiny-qwen2-vl")
    video = tp.Video.from_file(_write_mp4(tmp_path / "g.mp4", frames=16), frames=16)
    rows = [{"task": "vid", "sample_id": "s1", "method": "none", "ratio": 1.0, "prediction": "A",
             "scores": {"acc": 1.0}, "kept": None}]
    for spec in ("fopru_rank", "divprune"):
        pruner = tp.pruner_from_spec(spec, ratio=0.25)
        enc = model.encode([video], [PROMPT], model.vision_needs(pruner))
        with record_kept(pruner) as rec:
            model.generate([video], [PROMPT], pruner=pruner, max_new_tokens=1, encoded=enc, sample_ids=["s1"])
        rows.append({"task": "vid", "sample_id": "s1", "method": spec, "ratio": 0.25, "prediction": "B",
                     "scores": {"acc": 0.0}, "kept": json.loads(json.dumps(_kept_json(rec, "s1", view_sizes(enc.views, 0))))})
    task = SimpleNamespace(headline="acc", prompt=lambda s: PROMPT)
    sample = SimpleNamespace(id="s1", image=video, question="what ?", answers=["A"])
    monkeypatch.setattr(show, "sample_image", lambda cfg, name, sid: (task, sample))
    monkeypatch.setattr(model, "encode", lambda *a, **k: pytest.fail("the gallery must not encode the video"))
    cfg = SimpleNamespace(methods=["fopru_rank", "divprune"], model="tiny-qwen2-vl")
    lines, pngs = gallery.write_galleries(cfg, tmp_path, {"vid": task}, rows, lambda t, r: "acc", lvlm=model)
    assert len(pngs) == 1 and "flipped by fopru_rank, divprune" in "".join(lines)
    fig = Image.open(pngs[0])
    assert fig.width == PAD + 6 * (96 + PAD)  # 8 temporal patches, 6 shown, 96 px thumbnails


def test_video_sweep_stores_kept_per_frame_and_show_run_redraws_it(tmp_path, monkeypatch, capsys):
    """``tokenprune bench`` on a local VideoMME copy (tests/test_video_tasks.py's), then ``show --run``: the
    rows' kept tokens are per frame, and the strip is redrawn from them (no generation, no vision pass)."""
    import tokenprune.adapters
    from tokenprune.adapters import PrunableLVLM
    from tokenprune.benchmarks.sweep import load_config, read_rows, run_sweep

    from test_video_tasks import videomme_dir

    monkeypatch.setattr(tokenprune.adapters, "load", lambda name, **kw: lvlm(name))
    args = {"model": "tiny-qwen2-vl", "tasks": "videomme", "data_dir": str(videomme_dir(tmp_path / "vm")),
            "methods": "fopru_rank:scope=clip,fastv", "ratios": "0.5", "limit": "all", "batch_size": 2,
            "output": str(tmp_path / "run"), "bootstrap": 5, "max_new_tokens": 1,
            "task_options": {"videomme": {"frames": 4}}}
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    rows = [r for r in read_rows(out / "samples.jsonl") if r["method"] != "none"]
    assert len(rows) == 4  # 2 methods x the 2 readable videos (the copy's other two are broken / missing)
    for r in rows:  # two temporal patches of 2 frames: frames 0 and 2
        assert r["kept"]["frames"] == [0, 2] and len(r["kept"]["grids"]) == 2, r["method"]
        kept = Kept.from_json(r["kept"])
        assert sum(int(v.sum()) for v in kept.per_frame(kept.stages[-1]).values()) == r["visual_tokens_kept"]
    sid = rows[0]["sample_id"]
    monkeypatch.setattr(PrunableLVLM, "generate", lambda *a, **k: pytest.fail("show --run must not generate"))
    monkeypatch.setattr(PrunableLVLM, "encode", lambda *a, **k: pytest.fail("show --run must not encode"))
    png = tmp_path / "redraw.png"
    assert main(["show", "--run", str(out), "--sample", sid, "--output", str(png)]) == 0
    assert Image.open(png).width == PAD + 2 * (160 + PAD)
    assert main(["show", "--run", str(out), "--sample", sid, "--frames", "4"]) == 2
    assert "drop them with --run" in capsys.readouterr().err
