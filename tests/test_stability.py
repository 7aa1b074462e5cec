"""`tokenprune stability`: Jaccard by hand, the perturbations do what they say and undo themselves, and
the command end to end on a tiny model (a seeded `random` pruner keeps the same set under every
perturbation; an in-vision method's noise row says n/a)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.cli import main
from tokenprune.stability import EAGER_BOOL, NOISE, attention_swapped, feature_noise, jaccard, measure, table
from tokenprune.zoo import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_jaccard_by_hand():
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert jaccard(a, b) == 2 / 4
    assert jaccard(a, a) == 1.0
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert jaccard(a, ~a) == 0.0


@pytest.fixture(scope="module")
def lvlm():
    model, processor = tiny.tiny_llava()
    return tp.wrap(model, processor)


def test_attention_swap_flips_every_config_and_restores(lvlm):
    configs = {id(m.config): m.config for m in lvlm.model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    assert set(before.values()) == {"sdpa"}
    with attention_swapped(lvlm) as impl:
        text = lvlm.runner.model.config
        assert impl == "eager" and text._attn_implementation == EAGER_BOOL
        assert {c._attn_implementation for k, c in configs.items() if k != id(text)} == {"eager"}
    assert {k: c._attn_implementation for k, c in configs.items()} == before


def test_swapped_attention_is_a_tiny_perturbation_in_the_llm_too(lvlm):
    """Under the swap (LLM eager with the additive mask) logits match SDPA's to float precision, in a padded
    batch and with an in-LLM pruner: a perturbation of numerics only. (HF's eager with the boolean mask
    itself would add 0 / 1 and mask nothing.)"""
    from tokenprune.pruner import create_pruner

    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["Is there a dog?", "What colour is the big square in the upper left corner?"]
    for pruner in (None, create_pruner("fastv", ratio=0.5)):
        ref = lvlm.generate(images, prompts, pruner=pruner, max_new_tokens=1).first_logits
        with attention_swapped(lvlm):
            got = lvlm.generate(images, prompts, pruner=pruner, max_new_tokens=1).first_logits
        assert (got - ref).abs().max() < 1e-4


def test_feature_noise_is_seeded_small_and_undone(lvlm):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    clean = lvlm.encode([image], ["?"]).views[0].tokens
    lvlm._stability_ids = ["s1"]
    with feature_noise(lvlm, seed=0):
        a = lvlm.encode([image], ["?"]).views[0].tokens
        b = lvlm.encode([image], ["?"]).views[0].tokens
    assert "encode_images" not in lvlm.__dict__
    assert torch.equal(a, b)  # seeded by the batch's ids
    rel = float((a - clean).norm() / clean.norm())
    assert 0.5 * NOISE < rel < 2 * NOISE
    assert torch.equal(lvlm.encode([image], ["?"]).views[0].tokens, clean)


def test_measure_end_to_end():
    rows = measure("tiny-llava", "shapes_scene", ["random", "fopru_rank", "tome"], [0.25],
                   ["attention", "dtype", "noise"], limit=3, batch_size=2, bootstrap=50, log=lambda *_: None)
    got = {(r["method"], r["perturbation"]): r for r in rows}
    for pert in ("attention", "dtype", "noise"):
        assert got[("random", pert)]["n"] == 3 and got[("random", pert)]["mean_jaccard"] == 1.0  # seeded per sample
        assert got[("random", pert)]["identical"] == 1.0
        assert 0 <= got[("fopru_rank", pert)]["mean_jaccard"] <= 1
    assert got[("tome", "noise")]["n"] == 0 and got[("tome", "noise")]["note"].startswith("n/a")
    assert 0 < got[("fopru_rank", "noise")]["feature_drift"] < 1e-4
    text = "\n".join(table(rows))
    assert "| random | 0.25 | 1.000 [1.000, 1.000], 100% same (n=3)" in text


def test_bad_perturbation_is_one_line(capsys):
    assert main(["stability", "--model", "tiny-llava", "--perturb", "fp8", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--perturb takes a comma list of attention, dtype, noise" in err[0]


@pytest.mark.parametrize("method", ["fopru_rank", "visionzip", "tome", "fastv", "pdrop:layers=1,2"])
def test_shortcuts_keep_what_generate_keeps(lvlm, monkeypatch, method):
    """The shortcuts (a choice before the LLM: vision pass + the adapter's placing, no LLM; in-LLM: the layers up
    to the last prune point) keep exactly what a whole generate keeps."""
    from tokenprune import stability
    from tokenprune.benchmarks.sweep_config import make_pruner

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompts, ids = ["Is there a dog?", "What colour is the square at the top?"], ["a", "b"]
    run = stability._Run(method, 0.5, make_pruner(method, 0.5), None)
    assert stability._before_llm_only(run.pruner) == (method.split(":")[0] not in ("fastv", "pdrop"))
    calls = []
    generate = lvlm.generate
    monkeypatch.setattr(lvlm, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    fast, _ = stability._kept_sets(lvlm, [run], images, prompts, ids)
    assert len(calls) == (method.split(":")[0] in ("fastv", "pdrop"))
    full, _ = stability._kept_sets(lvlm, [run], images, prompts, ids, shortcut=False)
    assert "select" not in run.pruner.__dict__
    for sid in ids:
        assert np.array_equal(fast[(method, 0.5)][sid], full[(method, 0.5)][sid])
        assert fast[(method, 0.5)][sid].sum() > 0


def test_report_section_from_the_csv(tmp_path):
    from tokenprune.stability import stability_section, write_csv

    rows = [{"model": "m", "task": "t", "method": "fopru_rank", "ratio": 0.25, "perturbation": "noise", "n": 4,
             "mean_jaccard": 0.5, "ci_low": 0.25, "ci_high": 0.75, "identical": 0.25, "min_jaccard": 0.1,
             "feature_drift": 1e-5, "note": ""},
            {"model": "m", "task": "t", "method": "tome", "ratio": 0.25, "perturbation": "noise", "n": 0,
             "feature_drift": 1e-5, "note": "n/a: chooses inside the vision tower"}]
    write_csv(tmp_path / "stability.csv", rows)
    lines = stability_section(tmp_path / "stability.csv")
    assert lines[0] == "## Stability of the kept sets\n"
    assert "| fopru_rank | 0.25 | 0.500 [0.250, 0.750], 25% same (n=4) |" in lines
    assert "| tome | 0.25 | n/a: chooses inside the vision tower |" in lines
    assert "noise (features differ by 1.0e-05)" in lines[2]
