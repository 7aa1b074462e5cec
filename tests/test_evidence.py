"""Evidence recall (``tokenprune evidence``): evidence tokens worked out by hand on small scenes, the
scores of hand-made kept maps, and a sweep of a tiny random video model end to end (deterministic)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from tokenprune.benchmarks.sweep import load_config, run_sweep
from tokenprune.benchmarks.tasks.shapes_video import Actor, VideoScene
from tokenprune.errors import TokenpruneError
from tokenprune.visualize.evidence import evidence_table, format_table, grid_regions, question_evidence, view_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

T, SIZE, G = 10, 64, 4  # 10 frames of 64 px, a 4 x 4 token grid per frame: 16 px cells


def scene_of(*actors: Actor) -> VideoScene:
    return VideoScene(T, (240, 240, 240), (), tuple(actors))


def cells(mask: np.ndarray) -> dict[int, list[int]]:
    """``{frame view: [token indices]}`` of a ``[views * 16]`` mask."""
    per = mask.reshape(-1, G * G)
    return {v: np.nonzero(m)[0].tolist() for v, m in enumerate(per) if m.any()}


def per_frame_regions(frames: int = T):
    return grid_regions([(G, G)] * frames, [(t,) for t in range(frames)], SIZE)


def test_a_square_on_one_cell_and_one_across_four():
    """A 16 px square with its box at (16, 16) is exactly token (1, 1) = 5 of every frame; one at (24, 24)
    covers a quarter of tokens 5, 6, 9, 10 each (>= min_cover 0.1: all four)."""
    one = Actor("square", "red", 0.25, (0.375, 0.375), visible=((0, T),), role="target")
    four = Actor("square", "blue", 0.25, (0.5, 0.5), visible=((0, T),), role="target")
    regions = per_frame_regions()
    ev = question_evidence(scene_of(one, four), "static_control", [0], regions, list(range(T)), SIZE)
    assert cells(ev.mask) == {t: [5] for t in range(T)} and len(ev.events) == 1
    ev = question_evidence(scene_of(one, four), "static_control", [1], regions, list(range(T)), SIZE)
    assert cells(ev.mask) == {t: [5, 6, 9, 10] for t in range(T)}
    # min_cover above a quarter: only the token it covers most (the first of the four ties) stays
    ev = question_evidence(scene_of(one, four), "static_control", [1], regions, list(range(T)), SIZE, min_cover=0.3)
    assert cells(ev.mask) == {t: [5] for t in range(T)}


def test_flashes_are_events_and_merges_count():
    """Flashes at frames 0, 4-5 and 8 of an object on token 5: three events, four evidence tokens. Kept in
    frames 0 and 4, merged in 8: recall 3/4 (kept only 2/4); every flash seen (merges counted) but not
    every flash kept."""
    flash = Actor("circle", "green", 0.25, (0.375, 0.375), visible=((0, 1), (4, 6), (8, 9)), role="target")
    ev = question_evidence(scene_of(flash), "count_flashes", [0], per_frame_regions(), list(range(T)), SIZE)
    assert cells(ev.mask) == {0: [5], 4: [5], 5: [5], 8: [5]}
    assert [cells(e) for e in ev.events] == [{0: [5]}, {4: [5], 5: [5]}, {8: [5]}]
    value = np.zeros(T * G * G)
    value[0 * 16 + 5] = value[4 * 16 + 5] = 1.0
    value[8 * 16 + 5] = 0.5
    value[3 * 16 + 5] = 1.0  # a kept token where the object is not shown: no evidence
    s = ev.score(value)
    assert s == {"recall": 0.75, "recall_kept": 0.5, "complete": 1.0, "complete_kept": 0.0, "evidence_tokens": 4.0}
    assert ev.score(np.ones(T * G * G))["recall"] == 1.0 and ev.score(np.zeros(T * G * G))["complete"] == 0.0


def test_a_small_object_has_its_best_token_in_every_frame():
    """A 3 px square covers 9 / 256 of a token (< min_cover): the one token it is in is still evidence."""
    tiny = Actor("square", "red", 0.05, (0.9, 0.1), visible=((0, T),), role="target")  # box (56, 5)-(59, 8)
    ev = question_evidence(scene_of(tiny), "static_control", [0], per_frame_regions(), list(range(T)), SIZE)
    assert cells(ev.mask) == {t: [3] for t in range(T)}


def test_two_frame_views_and_sampled_frames():
    """Qwen's views hold two frames each (view frames 0, 2, 4, ...): a flash in frame 5 alone is evidence
    in the view of frames 4-5. With only even scene frames sampled, the flash is never shown: no evidence
    tokens, and the event is not seen whatever is kept."""
    flash = Actor("circle", "green", 0.25, (0.375, 0.375), visible=((5, 6),), role="target")
    covered = view_frames([16] * 5, [0, 2, 4, 6, 8], T)
    assert covered == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    ev = question_evidence(scene_of(flash), "count_flashes", [0], grid_regions([(G, G)] * 5, covered, SIZE),
                           list(range(T)), SIZE)
    assert cells(ev.mask) == {2: [5]}
    sampled = [0, 2, 4, 6, 8]  # 5 sampled frames, one view each
    ev = question_evidence(scene_of(flash), "count_flashes", [0], per_frame_regions(5), sampled, SIZE)
    assert not ev.mask.any() and ev.score(np.ones(5 * 16))["complete"] == 0.0


def test_views_without_frames():
    """Frames handed as images (no frame per view stored): view i is frame i when the counts match."""
    assert view_frames([16] * T, None, T) == [(t,) for t in range(T)]
    with pytest.raises(TokenpruneError, match="cannot tell which frame"):
        view_frames([16] * 3, None, T)


def sweep(out, methods="fopru_rank,divprune:scope=frame"):
    return run_sweep(load_config(None, {"model": "tiny-llava-onevision", "tasks": "shapes_video:size=40",
                                        "methods": methods, "ratios": "0.25", "limit": 6, "output": str(out),
                                        "bootstrap": 50, "max_new_tokens": 1, "batch_size": 6}), log=lambda *_: None)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return sweep(tmp_path_factory.mktemp("evidence") / "run")


def test_a_tiny_video_sweep_end_to_end(swept, capsys):
    from tokenprune.cli import main

    table = evidence_table(swept, bootstrap=50)
    runs = {(t["method"], t["ratio"]) for t in table}
    assert runs == {("fopru_rank", 0.25), ("divprune:scope=frame", 0.25)}
    for t in table:
        assert 0.0 <= t["recall_kept"] <= t["recall"] <= 1.0 and t["ci_low"] <= t["recall"] <= t["ci_high"]
        assert 0.0 <= t["complete_kept"] <= t["complete"] <= 1.0
        assert t["tokens_kept"] == 32  # 2 of each frame's 3 x 3 tokens (16 frames at 0.25: a per-frame budget)
    assert sum(t["n_questions"] for t in table if t["method"] == "fopru_rank" and t["kind"] != "all") == 6
    with (swept / "evidence_recall.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(table) and set(rows[0]) >= {"method", "ratio", "kind", "recall", "ci_low", "complete"}
    assert main(["evidence", str(swept), "--bootstrap", "50"]) == 0
    assert "evidence recall (kept or merged):" in capsys.readouterr().out
    assert "fopru_rank" in format_table(table)


def test_deterministic_on_a_tiny_random_model(swept, tmp_path):
    """The same sweep again (a tiny random model) stores the same kept tokens: the same table."""
    again = sweep(tmp_path / "again", methods="fopru_rank")
    first = [t for t in evidence_table(swept, bootstrap=50) if t["method"] == "fopru_rank"]
    assert evidence_table(again, bootstrap=50) == first


def test_grid_regions_match_the_model_geometry(swept):
    """Frames rendered at the model's own size: each view's grid over the whole frame is exactly what the
    model's processor geometry gives (``--model-regions``)."""
    from tokenprune.adapters import load

    lvlm = load("tiny-llava-onevision")
    assert evidence_table(swept, lvlm=lvlm, bootstrap=50) == evidence_table(swept, bootstrap=50)


def test_refuses_sweeps_without_the_task(tmp_path):
    with pytest.raises(TokenpruneError, match="no pruned shapes_video rows"):
        evidence_table(tmp_path)
    with pytest.raises(TokenpruneError, match="scene"):
        evidence_table(tmp_path, task="pope")

