"""The difficult subset (right unpruned, wrong by `downsample` at the matching ratio), on a synthetic
samples.jsonl whose subset and accuracies are worked out by hand."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from tokenprune.benchmarks.difficult import add_difficult, difficult_ids, difficult_section, downsample_spec
from tokenprune.benchmarks.results import read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = SimpleNamespace(headline="accuracy")


def _row(method, ratio, sid, score, kept=16, n=64):
    return {"task": "t", "method": method, "ratio": ratio, "sample_id": str(sid), "scores": {"accuracy": score},
            "visual_tokens_kept": kept, "visual_tokens_in": n}


#            sample:   0  1  2  3  4  5  6  7
NONE = [1, 1, 1, 1, 1, 1, 0, 0]
DOWN_025 = [1, 0, 0, 0, 1, 1, 0, 0]  # wrong on 1, 2, 3 (and on 6, 7, which none gets wrong too)
DOWN_05 = [0, 1, 1, 1, 1, 1, 1, 0]  # wrong on 0 only, of those none gets right
FOPRU_025 = [0, 1, 1, 0, 1, 1, 1, 1]  # on {1, 2, 3}: 2 of 3
FOPRU_05 = [1, 0, 0, 0, 0, 0, 0, 0]  # on {0}: 1 of 1
ADAPTIVE = [0, 0, 1, 1, 0, 0, 0, 0]  # kept 20 of 64 = 0.31 -> matched to 0.25: {1, 2, 3} -> 2 of 3


@pytest.fixture()
def samples_file(tmp_path):
    rows = [_row("none", 1.0, i, s, kept=64) for i, s in enumerate(NONE)]
    rows += [_row("downsample", 0.25, i, s) for i, s in enumerate(DOWN_025)]
    rows += [_row("downsample", 0.5, i, s, kept=32) for i, s in enumerate(DOWN_05)]
    rows += [_row("fopru_rank", 0.25, i, s) for i, s in enumerate(FOPRU_025)]
    rows += [_row("fopru_rank", 0.5, i, s, kept=32) for i, s in enumerate(FOPRU_05)]
    rows += [_row("scissor", None, i, s, kept=20) for i, s in enumerate(ADAPTIVE)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summary(rows):
    out = []
    for key in dict.fromkeys((r["method"], r["ratio"]) for r in rows):
        g = [r for r in rows if (r["method"], r["ratio"]) == key]
        out.append({"task": "t", "method": key[0], "ratio": key[1],
                    "visual_tokens_kept": sum(r["visual_tokens_kept"] for r in g) / len(g),
                    "visual_tokens_in": sum(r["visual_tokens_in"] for r in g) / len(g)})
    return out


CFG = SimpleNamespace(methods=["downsample", "fopru_rank", "scissor"], bootstrap=200, seed=0)


def test_subset_and_scores_by_hand(samples_file):
    rows = read_rows(samples_file)
    summary = _summary(rows)
    add_difficult(CFG, {"t": TASK}, rows, summary)
    got = {(s["method"], s["ratio"]): s for s in summary}
    assert math.isnan(got[("none", 1.0)]["difficult_score"]) and got[("none", 1.0)]["n_difficult"] == 0
    assert got[("fopru_rank", 0.25)]["n_difficult"] == 3
    assert got[("fopru_rank", 0.25)]["difficult_score"] == pytest.approx(2 / 3)
    assert got[("fopru_rank", 0.5)]["n_difficult"] == 1 and got[("fopru_rank", 0.5)]["difficult_score"] == 1.0
    assert got[("downsample", 0.25)]["difficult_score"] == 0.0  # wrong on all of them by construction
    assert got[("scissor", None)]["n_difficult"] == 3 and got[("scissor", None)]["difficult_score"] == pytest.approx(2 / 3)
    lo, hi = got[("fopru_rank", 0.25)]["difficult_ci_low"], got[("fopru_rank", 0.25)]["difficult_ci_high"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1


def test_graded_scores_count_right_from_one_half():
    none = {str(i): {"scores": {"acc": s}} for i, s in enumerate([1.0, 0.67, 0.33, 1.0])}
    down = {str(i): {"scores": {"acc": s}} for i, s in enumerate([0.33, 0.0, 0.0, 0.67])}
    # right unpruned: 0, 1, 3 (0.33 is wrong); wrong downsampled among them: 0, 1
    assert difficult_ids(none, down, "acc") == ["0", "1"]


def test_section_has_counts_and_cis(samples_file):
    rows = read_rows(samples_file)
    summary = _summary(rows)
    add_difficult(CFG, {"t": TASK}, rows, summary)
    text = "\n".join(difficult_section(CFG, {"t": TASK}, summary, rows))
    assert "difficult samples at ratio 0.5: 1 of 8, 0.25: 3 of 8" in text
    line = next(l for l in text.splitlines() if l.startswith("| fopru_rank |"))
    assert "(1/1)" in line and "(2/3)" in line and "0.667 [" in line
    assert "vs 0.25" in next(l for l in text.splitlines() if l.startswith("| scissor |"))


def test_without_downsample_one_line(samples_file):
    rows = [r for r in read_rows(samples_file) if r["method"] != "downsample"]
    cfg = SimpleNamespace(methods=["fopru_rank"], bootstrap=10, seed=0)
    summary = _summary(rows)
    add_difficult(cfg, {"t": TASK}, rows, summary)
    assert all(math.isnan(s["difficult_score"]) and s["n_difficult"] == 0 for s in summary)
    lines = [l for l in difficult_section(cfg, {"t": TASK}, summary, rows) if l.strip()]
    assert len(lines) == 2 and lines[1].startswith("No `downsample` run in this sweep")


def test_downsample_spec_with_options():
    assert downsample_spec(["fopru_rank", "downsample:mode=pool@keep"]) == "downsample:mode=pool@keep"
    assert downsample_spec(["fopru_rank"]) is None


def test_a_pinned_ratio_without_its_downsample_gets_no_figure(samples_file):
    rows = read_rows(samples_file) + [_row("fastv:ratio=0.3", 0.3, i, 1) for i in range(8)]
    summary = _summary(rows)
    add_difficult(SimpleNamespace(methods=["downsample", "fastv:ratio=0.3"], bootstrap=10, seed=0), {"t": TASK}, rows, summary)
    pinned = next(s for s in summary if s["method"] == "fastv:ratio=0.3")
    assert math.isnan(pinned["difficult_score"]) and pinned["n_difficult"] == 0


def test_graded_method_scores_count_as_right_or_wrong():
    """VTC-Bench's group-A accuracy is right / size, a graded score >= 0.5 right (not the mean graded score)."""
    from tokenprune.benchmarks.difficult import subset_score

    rows = {str(i): {"scores": {"acc": s}} for i, s in enumerate([0.67, 0.33, 1.0, 0.0])}
    res = subset_score(rows, ["0", "1", "2", "3"], "acc", n_resamples=50, seed=0)
    assert res["difficult_score"] == 0.5 and res["right"] == 2 and res["n_difficult"] == 4


def test_an_empty_subset_says_so(samples_file):
    rows = [r if r["method"] != "downsample" else {**r, "scores": {"accuracy": 1}} for r in read_rows(samples_file)]
    summary = _summary(rows)
    add_difficult(CFG, {"t": TASK}, rows, summary)
    text = "\n".join(difficult_section(CFG, {"t": TASK}, summary, rows))
    assert "difficult samples at ratio 0.5: 0 of 8, 0.25: 0 of 8" in text
    assert "No sample is difficult at any ratio" in text and "| fopru_rank |" not in text


def test_pinned_downsample_specs_pair_with_their_ratios(samples_file):
    """``downsample:ratio=0.25`` and ``downsample:ratio=0.5`` (pinned specs) pair like one ``downsample`` over both."""
    rows = []
    for r in read_rows(samples_file):
        if r["method"] == "downsample":
            r = {**r, "method": f"downsample:ratio={r['ratio']:g}"}
        rows.append(r)
    cfg = SimpleNamespace(methods=["downsample:ratio=0.25", "downsample:ratio=0.5", "fopru_rank", "scissor"],
                          bootstrap=200, seed=0)
    summary = _summary(rows)
    add_difficult(cfg, {"t": TASK}, rows, summary)
    got = {(s["method"], s["ratio"]): s for s in summary}
    assert got[("fopru_rank", 0.25)]["n_difficult"] == 3 and got[("fopru_rank", 0.25)]["difficult_score"] == pytest.approx(2 / 3)
    assert got[("fopru_rank", 0.5)]["n_difficult"] == 1 and got[("fopru_rank", 0.5)]["difficult_score"] == 1.0
    text = "\n".join(difficult_section(cfg, {"t": TASK}, summary, rows))
    assert "difficult samples at ratio 0.5: 1 of 8, 0.25: 3 of 8" in text
