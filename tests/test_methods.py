"""Hand-computed selections for every built-in pruner."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tokenprune import PruningInputs, create_pruner
from tokenprune.methods.fopru import fopru_scores
from tokenprune.methods.random import stable_seed


def vision_map(rows: list[list[float]]) -> torch.Tensor:
    """A [1, T, T] attention map from explicit rows (row 0 = CLS); each row must sum to 1."""
    attn = torch.tensor([rows], dtype=torch.float32)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, len(rows)))
    return attn


def same_rows(patch_attn: list[float], n_rows: int | None = None) -> torch.Tensor:
    """A [1, 1+P, 1+P] map whose every row gives ``patch_attn`` to the patches and the rest to CLS.

    All rows equal -> the row mean is constant (variance 0), so the variance rule picks the
    column mean, which equals ``patch_attn``.
    """
    cls = 1.0 - sum(patch_attn)
    row = [cls, *patch_attn]
    return vision_map([row] * (n_rows or len(row)))


def inputs_for(attn: torch.Tensor, grid, merge: int = 1, prefix: int = 1) -> PruningInputs:
    n = grid[0] * grid[1]
    return PruningInputs(
        tokens=torch.zeros(attn.shape[0], n, 2), grid=grid, vision_attention=attn, vision_prefix=prefix,
        patch_merge=merge, sample_ids=list(range(attn.shape[0])),
    )


# 4 patches on a 2x2 grid; every patch row gives 0.2 to CLS and [.05, .10, .50, .15] to the patches.
COLUMN_MAP = vision_map([[0.4, 0.15, 0.15, 0.15, 0.15]] + [[0.2, 0.05, 0.10, 0.50, 0.15]] * 4)
# Column sums equal (every column mean 0.15), rows differ: patch p gives [.4, .8, 1., .2][p] to patches.
ROW_MAP = vision_map([
    [0.2, 0.2, 0.2, 0.2, 0.2],  # CLS (dropped)
    [0.6, 0.10, 0.10, 0.10, 0.10],
    [0.2, 0.20, 0.20, 0.20, 0.20],
    [0.0, 0.25, 0.25, 0.25, 0.25],
    [0.8, 0.05, 0.05, 0.05, 0.05],
])


def test_variance_rule_picks_column_mean():
    inputs = inputs_for(COLUMN_MAP, (2, 2))
    torch.testing.assert_close(fopru_scores(inputs, "auto"), torch.tensor([[0.05, 0.10, 0.50, 0.15]]))
    assert create_pruner("fopru_rank", ratio=0.5)(inputs).indices.tolist() == [[2, 3]]


def test_variance_rule_picks_row_mean_on_crafted_map():
    inputs = inputs_for(ROW_MAP, (2, 2))
    # Row means over the 4 patches: [.1, .2, .25, .05]; column means all .15 (variance 0).
    torch.testing.assert_close(fopru_scores(inputs, "auto"), torch.tensor([[0.10, 0.20, 0.25, 0.05]]))
    assert create_pruner("fopru_rank", ratio=0.5)(inputs).indices.tolist() == [[1, 2]]
    # Forcing the column axis gives all-equal scores: ties go to the lowest indices.
    assert create_pruner("fopru_rank", ratio=0.5, score_axis="column")(inputs).indices.tolist() == [[0, 1]]


def test_variance_rule_is_per_image():
    attn = torch.cat([COLUMN_MAP, ROW_MAP])
    assert create_pruner("fopru_rank", ratio=0.5)(inputs_for(attn, (2, 2))).indices.tolist() == [[2, 3], [1, 2]]


def test_cls_axis_uses_cls_row_only():
    attn = vision_map([[0.1, 0.4, 0.0, 0.2, 0.3]] + [[0.2, 0.05, 0.10, 0.50, 0.15]] * 4)
    assert create_pruner("fopru_rank", ratio=0.5, score_axis="cls")(inputs_for(attn, (2, 2))).indices.tolist() == [[0, 3]]
    # With only the prefix rows provided ([B, prefix, T]), as an adapter does for needs rows="prefix".
    assert create_pruner("fopru_rank", ratio=0.5, score_axis="cls")(inputs_for(attn[:, :1], (2, 2))).indices.tolist() == [[0, 3]]
    with pytest.raises(ValueError, match="CLS"):
        create_pruner("fopru_rank", score_axis="cls")(inputs_for(attn[:, 1:, 1:], (2, 2), prefix=0))


def test_fopru_averages_merged_patch_groups():
    # 8 patches -> 4 tokens (merge 2): patch scores [.01,.03, 0,0, .05,.01, .02,.02] -> tokens [.02, 0, .03, .02].
    attn = same_rows([0.01, 0.03, 0.0, 0.0, 0.05, 0.01, 0.02, 0.02])
    inputs = inputs_for(attn, (2, 2), merge=2)
    torch.testing.assert_close(fopru_scores(inputs), torch.tensor([[0.02, 0.0, 0.03, 0.02]]))
    # k=2: token 2 (.03), then the tie .02 between tokens 0 and 3 goes to 0.
    assert create_pruner("fopru_rank", ratio=0.5)(inputs).indices.tolist() == [[0, 2]]


# 3x3 grid. Row sums: r0 = .06, r1 = .22, r2 = .15. Best single token: 3 (.20), then 6, 7, 8 (.05).
ROW_SCORES = [0.01, 0.02, 0.03, 0.20, 0.01, 0.01, 0.05, 0.05, 0.05]


def test_fopru_row_keeps_whole_rows():
    inputs = inputs_for(same_rows(ROW_SCORES), (3, 3))
    one_row = create_pruner("fopru_row", ratio=0.34)(inputs)  # floor(.34*3) = 1 row
    assert one_row.indices.tolist() == [[3, 4, 5]] and one_row.grid == (1, 3)
    assert create_pruner("fopru_row", ratio=0.67)(inputs).indices.tolist() == [[3, 4, 5, 6, 7, 8]]
    assert create_pruner("fopru_row", ratio=0.1)(inputs).indices.tolist() == [[3, 4, 5]]  # at least 1 row
    # The rank strategy with the same budget (k = round(.34*9) = 3) does not keep whole rows.
    assert create_pruner("fopru_rank", ratio=0.34)(inputs).indices.tolist() == [[3, 6, 7]]


def test_fopru_row_fill_by_rank_hits_budget():
    inputs = inputs_for(same_rows(ROW_SCORES), (3, 3))
    # k = round(.5*9) = 5 (half up): row 1 whole, then the best 2 tokens of row 2 (ties -> 6, 7).
    out = create_pruner("fopru_row", ratio=0.5, fill="rank")(inputs)
    assert out.indices.tolist() == [[3, 4, 5, 6, 7]] and out.grid is None
    # k = 2 < w: no whole row, the 2 best tokens of the best row (3, then the tie 4/5 -> 4).
    assert create_pruner("fopru_row", ratio=0.2, fill="rank")(inputs).indices.tolist() == [[3, 4]]


def test_random_is_per_sample_and_batch_invariant():
    tokens = torch.zeros(3, 16, 2)
    pruner = create_pruner("random", ratio=0.25, seed=7)
    batch = pruner(PruningInputs(tokens=tokens, grid=(4, 4), sample_ids=["a", "b", "c"])).indices
    alone = pruner(PruningInputs(tokens=tokens[:1], grid=(4, 4), sample_ids=["b"])).indices
    assert torch.equal(batch[1], alone[0])
    assert batch.shape == (3, 4) and not torch.equal(batch[0], batch[1])
    expected = torch.randperm(16, generator=torch.Generator().manual_seed(stable_seed(7, "b")))[:4].sort().values
    assert torch.equal(alone[0], expected)
    other_seed = create_pruner("random", ratio=0.25, seed=8)(PruningInputs(tokens=tokens[:1], grid=(4, 4), sample_ids=["b"]))
    assert not torch.equal(other_seed.indices[0], alone[0])


def test_random_selection_is_the_same_in_every_process():
    # Python's hash() of a str changes with PYTHONHASHSEED; the selection must not.
    code = (
        "import torch; from tokenprune import PruningInputs, create_pruner;"
        "print(create_pruner('random', ratio=0.25)(PruningInputs(torch.zeros(1, 64, 1), (8, 8), ['img-1'])).indices.tolist())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert stable_seed(0, "a") == 4755176640408000753  # pinned: a change here changes every published run


def test_random_requires_sample_ids():
    with pytest.raises(ValueError, match="sample_ids"):
        create_pruner("random")(PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(2, 2)))


def test_pool_averages_patches():
    tokens = torch.arange(16.0).view(1, 16, 1)  # token value = its index on a 4x4 grid
    out = create_pruner("pool", ratio=0.25)(PruningInputs(tokens=tokens, grid=(4, 4)))
    assert out.grid == (2, 2)
    # Window (0,0) holds tokens 0,1,4,5 -> 2.5; (0,1): 2,3,6,7 -> 4.5; (1,0): 8,9,12,13 -> 10.5; (1,1): 12.5.
    assert out.tokens.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert out.indices.tolist() == [[0, 2, 8, 10]]  # each window's centre, rounded down
    assert torch.equal(out.apply(tokens), out.tokens)


def test_pool_grid_rounding():
    pruner = create_pruner("pool", ratio=0.5)
    assert pruner.num_kept(576, (24, 24)) == 17 * 17  # 24 * sqrt(.5) = 16.97 -> 17
    # 6x4 grid at ratio 1/4 -> 3x2: windows of 2x2, averaged by hand.
    tokens = torch.arange(24.0).view(1, 24, 1)
    out = create_pruner("pool", ratio=0.25)(PruningInputs(tokens=tokens, grid=(6, 4)))
    assert out.grid == (3, 2)
    assert out.tokens.flatten().tolist() == [2.5, 4.5, 10.5, 12.5, 18.5, 20.5]


# FastV: 3 query rows over 4 image tokens. The last row favours tokens 2 and 3; the mean over
# rows is [.433, .133, .233, .2], which favours tokens 0 and 2.
FASTV_ATTN = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.0, 0.1, 0.5, 0.4]]])


def fastv_inputs(mask=None):
    return PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(2, 2), llm_attention=FASTV_ATTN, llm_query_mask=mask)


def test_fastv_last_vs_mean():
    assert create_pruner("fastv", ratio=0.5, query="last")(fastv_inputs()).indices.tolist() == [[2, 3]]
    assert create_pruner("fastv", ratio=0.5, query="mean")(fastv_inputs()).indices.tolist() == [[0, 2]]


def test_fastv_respects_query_padding():
    mask = torch.tensor([[True, True, False]])  # right padding: the last real query is row 1
    assert create_pruner("fastv", ratio=0.5, query="last")(fastv_inputs(mask)).indices.tolist() == [[0, 1]]
    # mean over rows 0-1 only: [.65, .15, .1, .1] -> 0, then 1
    assert create_pruner("fastv", ratio=0.5, query="mean")(fastv_inputs(mask)).indices.tolist() == [[0, 1]]


def test_fastv_needs_layer_before_k():
    needs = create_pruner("fastv", k=3, query="mean").needs
    (stage,) = needs.schedule()
    assert stage.layer == 3 and stage.attention == "previous" and stage.queries == "all"
