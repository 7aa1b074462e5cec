"""`tokenprune show` (live and from a finished sweep), flipped-sample galleries, the on-object share."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_bench import bench_args, pope_dir  # noqa: F401 -- pope_dir is a fixture
from tokenprune.benchmarks.sweep import load_config, run_sweep
from tokenprune.cli import main
from tokenprune.visualize.on_object import shape_mask, token_coverage
from tokenprune.visualize.regions import ViewRegions


@pytest.fixture(scope="module")
def tiny_run(pope_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("show") / "run"
    run_sweep(load_config(None, bench_args(pope_dir, out, methods="fopru_rank,visionzip,fastv", ratios="0.25",
                                           limit=4)), log=lambda *_: None)
    return out


def test_show_live_draws_a_panel_per_method(tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert main(["show", "--model", "tiny-llava", "--methods", "fopru_rank,fastv", "--output", str(out)]) == 0
    assert "tokenprune show:" in capsys.readouterr().out
    fig = Image.open(out)
    assert fig.width > 3 * 200  # none + two methods side by side


def test_show_run_redraws_without_generating(tiny_run, monkeypatch, tmp_path):
    from tokenprune.adapters import PrunableLVLM

    def no(*a, **k):
        raise AssertionError("show --run must not run the model")

    monkeypatch.setattr(PrunableLVLM, "generate", no)
    sid = json.loads((tiny_run / "samples.jsonl").read_text().splitlines()[0])["sample_id"]
    out = tmp_path / "redraw.png"
    assert main(["show", "--run", str(tiny_run), "--sample", sid, "--output", str(out)]) == 0
    assert Image.open(out).width > 3 * 200  # none + fopru_rank + visionzip + fastv


def test_show_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    assert main(["show", "--run", str(tiny_run), "--sample", "nope"]) == 2
    assert "no results for sample 'nope'" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["show", "--sample", "3"]) == 2
    assert "give --run DIR too" in capsys.readouterr().err


def test_report_gallery_shows_flipped_samples(tiny_run):
    """Make the unpruned model right on one sample (tiny models answer nonsense), rebuild the report."""
    path = tiny_run / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    sid = rows[0]["sample_id"]
    for r in rows:
        if r["method"] == "none" and r["sample_id"] == sid:
            r["scores"] = {k: 1.0 for k in r["scores"]}
        elif r["sample_id"] == sid:
            r["scores"] = {k: 0.0 for k in r["scores"]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(tiny_run)]) == 0
    report = (tiny_run / "report.md").read_text()
    assert f"`{sid}`" in report and "flipped by fopru_rank, visionzip, fastv" in report
    png = tiny_run / "gallery" / f"pope_r0.25_{sid}.png"
    assert png.exists() and f"gallery/{png.name}" in report


def test_token_coverage_hand_computed():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # the top-left quarter is the object
    boxes = np.array([[0, 0, 2, 2], [2, 0, 4, 2], [1, 1, 3, 3], [0, 0, 4, 4]], dtype=float)
    cov = token_coverage([ViewRegions("image", (2, 2), boxes)], mask)
    assert cov.tolist() == [1.0, 0.0, 0.25, 0.25]
    image = Image.new("RGB", (4, 4), (240, 240, 240))
    image.putpixel((1, 2), (200, 30, 30))
    assert shape_mask(image).sum() == 1 and shape_mask(image)[2, 1]


def test_on_object_on_a_shapes_scene_sweep(tmp_path):
    """``shapes_scene`` sweeps get the share too, with the objects drawn from each sample's scene; the
    area share is the objects' share of the pixels (tiny-llava's 8x8 tokens tile the 224 px image)."""
    from tokenprune.benchmarks.tasks import get_task
    from tokenprune.benchmarks.tasks.shapes_scene import Scene, object_masks
    from tokenprune.visualize.on_object import on_object_table

    out = tmp_path / "run"
    run_sweep(load_config(None, {"model": "tiny-llava", "tasks": "shapes_scene", "methods": "random,fopru_rank",
                                 "ratios": "0.25", "limit": 3, "output": str(out), "bootstrap": 50,
                                 "max_new_tokens": 1, "batch_size": 3}), log=lambda *_: None)
    table = on_object_table(out, task="shapes_scene", bootstrap=50)
    assert {(t["method"], t["ratio"]) for t in table} == {("random", 0.25), ("fopru_rank", 0.25)}
    samples = list(get_task("shapes_scene").load(limit=3, seed=0))
    area = np.mean([object_masks(Scene.from_json(s.extra["scene"])).any(0).mean() for s in samples])
    for t in table:
        assert t["n_images"] == 3 and t["tokens_kept"] == 16
        assert abs(t["area_share"] - area) < 1e-9
    assert (out / "on_object.csv").exists()
    with pytest.raises(Exception, match="needs object masks"):
        on_object_table(out, task="pope")


def test_show_clip_scope_ranking_on_a_multi_view_image():
    """``fopru_rank:scope=clip`` ranks each view by its own attention and never calls ``select``: the kept
    tokens are recorded from where the adapter placed them (LLaVA-NeXT: base + high-res views, one budget)."""
    import tokenprune as tp
    from tokenprune.visualize.record import record_kept, view_sizes
    from tokenprune.visualize.show import show_image

    lvlm = tp.load("tiny-llava-next")
    image = Image.new("RGB", (120, 70), (90, 140, 200))
    pruner = tp.pruner_from_spec("fopru_rank:scope=clip", ratio=0.25)
    enc = lvlm.encode([image], ["what ?"], lvlm.vision_needs(pruner))
    with record_kept(pruner) as rec:
        out = lvlm.generate([image], ["what ?"], pruner=pruner, max_new_tokens=1, encoded=enc)
    sizes = view_sizes(enc.views, 0)
    kept = rec.kept("0", sizes)
    assert len(sizes) == 2 and int(kept.stages[-1].sum()) == tp.keep_count(0.25, sum(sizes)) == out.stats[0].visual_per_layer[0]
    top = np.sort(np.argsort(-kept.scores, kind="stable")[:int(kept.stages[-1].sum())])  # the clip's top-k
    assert np.nonzero(kept.stages[-1])[0].tolist() == top.tolist()
    fig = show_image(image, "what ?", methods=["fopru_rank:scope=clip"], lvlm=lvlm, max_new_tokens=1)
    assert fig.width > 2 * 200


def test_gallery_lists_a_sample_it_cannot_draw(monkeypatch, tmp_path):
    """A multi-image sample has no single-image regions: the gallery lists it with the reason, the report goes on."""
    from types import SimpleNamespace

    from tokenprune.visualize import gallery, show

    task = SimpleNamespace(headline="acc", prompt=lambda s: "which ?")
    sample = SimpleNamespace(id="m1", image=[Image.new("RGB", (32, 32))] * 2, question="which ?", answers=["a"])
    monkeypatch.setattr(show, "sample_image", lambda cfg, name, sid: (task, sample))
    rows = [{"task": "t", "sample_id": "m1", "method": "none", "ratio": 1.0, "prediction": "a", "scores": {"acc": 1.0},
             "kept": None},
            {"task": "t", "sample_id": "m1", "method": "random", "ratio": 0.5, "prediction": "b", "scores": {"acc": 0.0},
             "kept": {"views": [4, 4], "stages": ["f0"]}}]
    cfg = SimpleNamespace(methods=["random"], model="tiny-llava")
    lines, pngs = gallery.write_galleries(cfg, tmp_path, {"t": task}, rows, lambda t, r: "acc", lvlm=object())
    assert pngs == [] and "not drawn: token regions take one PIL image or a tokenprune.Video" in "".join(lines)
