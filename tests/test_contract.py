"""Contract tests, run on every pruner that list_pruners() returns (plugins included)."""
from __future__ import annotations

import pytest
import torch

from tokenprune import create_pruner, keep_count, list_pruners
from tokenprune.pruner import Stage
from tokenprune.testing import check_in_vision_contract, check_pruner_contract, synthetic_inputs

ALL_PRUNERS = list_pruners()
# in-vision pruners see a VisionState inside the tower, not PruningInputs: their contract is check_in_vision_contract
IN_VISION = [n for n in ALL_PRUNERS if create_pruner(n).stage is Stage.IN_VISION]
TOKEN_PRUNERS = [n for n in ALL_PRUNERS if n not in IN_VISION]


def test_plugin_is_collected():
    assert "l2norm" in ALL_PRUNERS, "the fixture plugin must be discovered, or the plugin contract goes untested"


@pytest.mark.parametrize("name", IN_VISION)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1])
def test_in_vision_contract(name, ratio):
    from tokenprune import OptionError

    try:
        # MustDrop's 3x3 windows need a grid divisible by 3
        check_in_vision_contract(create_pruner(name, ratio=ratio), grid=(9, 9) if name == "mustdrop" else (8, 8))
    except OptionError as exc:  # a tower too shallow for the budget (ToMe merges at most half a block): one line
        assert "smallest reachable ratio" in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("name", TOKEN_PRUNERS)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(name, ratio):
    from tokenprune import OptionError

    pruner = create_pruner(name, ratio=ratio)
    inputs = synthetic_inputs(grid=(6, 8))
    if ratio < pruner.min_ratio(inputs.num_tokens, inputs.num_layers):
        # A schedule whose early layers see every token cannot average below this: one clear line.
        with pytest.raises(OptionError, match="smallest reachable ratio"):
            pruner(inputs)
        return
    check_pruner_contract(pruner, inputs)


@pytest.mark.parametrize("name", TOKEN_PRUNERS)
def test_contract_merged_patches_and_odd_grid(name):
    from tokenprune import OptionError

    try:
        check_pruner_contract(create_pruner(name, ratio=0.3), synthetic_inputs(grid=(5, 7), patch_merge=4, seed=3))
    except OptionError as exc:  # a rule defined on one patch per token only (HiRED) refuses in one clear line
        assert "merged patches" in str(exc) and "\n" not in str(exc)


# adaptive: no budget; ratio-free (uses_ratio false: vtw's calibrated K): ratio 1.0 means nothing to them
@pytest.mark.parametrize("name", [n for n in TOKEN_PRUNERS if not create_pruner(n).adaptive and create_pruner(n).uses_ratio])
def test_ratio_one_keeps_everything_unchanged(name):
    inputs = synthetic_inputs()
    out = create_pruner(name, ratio=1.0)(inputs)
    assert out.indices.tolist() == [list(range(inputs.num_tokens))] * inputs.batch_size
    torch.testing.assert_close(out.apply(inputs.tokens), inputs.tokens, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL_PRUNERS if not create_pruner(n).quantised])
def test_ratio_rule(name):
    for n, ratio, k in [(576, 0.25, 144), (576, 0.1, 58), (10, 0.05, 1), (10, 0.25, 3), (9, 0.5, 5)]:
        assert keep_count(ratio, n) == k
        assert create_pruner(name, ratio=ratio).num_kept(n, (1, n)) == k


@pytest.mark.parametrize("name", ALL_PRUNERS)
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "abc", None, True])
def test_bad_ratio_is_rejected(name, bad):
    from tokenprune import OptionError

    with pytest.raises(OptionError, match=r"\(0, 1\]"):
        create_pruner(name, ratio=bad)
