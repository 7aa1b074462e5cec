"""Recording what a pruner kept: hand-computed stage chaining, and the recorded sets against the
counts the model itself saw (its per-layer visual token counts), for pre-LLM, merging and in-LLM pruners."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.pruner import Reduction
from tokenprune.visualize.record import MERGED, Kept, KeptRecorder, _Call, record_kept, view_sizes

from test_adapters import PROMPTS, images, lvlm_for


def test_in_llm_stages_chain_back_to_original_tokens():
    """Stage 0 keeps 1, 3, 4 of 6; stage 1 sees [1, 3, 4, merged] and keeps its 0 and 2 -> originals 1, 4."""
    rec = KeptRecorder(in_llm=True, calls=[
        _Call(["a"], 0, 6, Reduction(indices=torch.tensor([[1, 3, 4]]), scores=torch.arange(6.0)[None],
                                     merge_weights=torch.tensor([[[0.0, 0.5, 0, 0, 0, 0.5]]]))),
        _Call(["a"], 1, 4, Reduction(indices=torch.tensor([[0, 2]]))),
    ])
    kept = rec.kept("a", [4, 2])
    assert [np.nonzero(s)[0].tolist() for s in kept.stages] == [[1, 3, 4], [1, 4]]
    assert np.nonzero(kept.merged)[0].tolist() == [5]  # token 1 was a merge source too, but it is kept
    assert kept.value.tolist() == [0, 1, 0, 0, 1, MERGED]
    assert [v.tolist() for v in kept.per_view(kept.value)] == [[0, 1, 0, 0], [1, MERGED]]
    assert kept.scores.tolist() == [0, 1, 2, 3, 4, 5]
    back = Kept.from_json(kept.to_json())
    assert back.views == [4, 2] and all((a == b).all() for a, b in zip(back.stages, kept.stages))
    assert (back.merged == kept.merged).all()


def test_pre_llm_per_view_calls_and_visionzip_weights():
    """Views are found by '<id>/<view>'; VisionZip's one-hot rows are kept, multi-source rows merged."""
    fw = torch.zeros(1, 3, 1 + 4)  # CLS column + 4 tokens
    fw[0, 0, 0] = 1.0  # the CLS token: no image region
    fw[0, 1, 1 + 2] = 1.0  # dominant token 2
    fw[0, 2, 1 + 0], fw[0, 2, 1 + 3] = 0.5, 0.5  # a contextual token merged from 0 and 3
    rec = KeptRecorder(in_llm=False, calls=[
        _Call(["s/0", "t/0"], 0, 4, Reduction(indices=torch.tensor([[0, 1, 2]] * 2), feature_weights=fw.expand(2, -1, -1))),
        _Call(["s/1"], 0, 2, Reduction(indices=torch.tensor([[1]]))),
    ])
    kept = rec.kept("s", [4, 2])
    assert kept.value.tolist() == [MERGED, 0, 1, MERGED, 0, 1]
    with pytest.raises(KeyError):
        rec.kept("u", [4])


def test_hybrid_pruner_in_llm_cut_chains_onto_its_pre_llm_selection():
    """HoliTom / PruneVid: a pre-LLM selection (per view: view 0 keeps 0, 2 of 4; view 1 keeps 1 of 2 -> tokens 0, 2,
    5), then an in-LLM cut (layer 2) on those three in sequence order: it keeps its 2 (token 5) and merges its 0
    (token 0) into it. Stages chain back to the original tokens; token 2 is dropped, token 0 merged."""
    rec = KeptRecorder(in_llm=False, calls=[
        _Call(["h/0"], 0, 4, Reduction(indices=torch.tensor([[0, 2]]))),
        _Call(["h/1"], 0, 2, Reduction(indices=torch.tensor([[1]]))),
        _Call(["h"], 0, 3, Reduction(indices=torch.tensor([[2]]), merge_into=torch.tensor([[2, -1, -1]])), layer=2),
    ])
    kept = rec.kept("h", [4, 2])
    assert [np.nonzero(s)[0].tolist() for s in kept.stages] == [[0, 2, 5], [5]]
    assert np.nonzero(kept.merged)[0].tolist() == [0]


def test_token_weights_say_which_tokens_were_kept_and_which_merged():
    """HoloV-style output (indices 0..k-1, one-hot rows for tokens 4 and 1, a zero pad row): tokens 1 and 4 kept,
    nothing merged. A pool-style row averaging 0, 2, 3 at position 2: 2 kept (its position), 0 and 3 merged."""
    onehot = torch.zeros(1, 3, 6)
    onehot[0, 0, 4] = onehot[0, 1, 1] = 1.0
    rec = KeptRecorder(in_llm=False, calls=[_Call(["v"], 0, 6, Reduction(
        indices=torch.tensor([[0, 1, 2]]), tokens=torch.zeros(1, 3, 2), token_weights=onehot))])
    kept = rec.kept("v", [6])
    assert np.nonzero(kept.stages[0])[0].tolist() == [1, 4] and not kept.merged.any()
    pooled = torch.zeros(1, 2, 6)
    pooled[0, 0, [0, 2, 3]] = 1 / 3
    pooled[0, 1, 5] = 1.0
    rec = KeptRecorder(in_llm=False, calls=[_Call(["p"], 0, 6, Reduction(
        indices=torch.tensor([[2, 5]]), tokens=torch.zeros(1, 2, 2), token_weights=pooled))])
    kept = rec.kept("p", [6])
    assert np.nonzero(kept.stages[0])[0].tolist() == [2, 5] and np.nonzero(kept.merged)[0].tolist() == [0, 3]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("spec", ["fopru_rank:ratio=0.25", "visionzip:ratio=0.25", "pool:ratio=0.25", "fastv:ratio=0.25",
                                  "pdrop:ratio=0.5:layers=1,2,3", "sparsevlm:ratio=0.25:layers=0,1,2"])
def test_recorded_sets_match_what_the_model_saw(family, spec):
    lvlm = lvlm_for(family)
    pruner = tp.create_pruner(spec.split(":")[0], **dict(kv.split("=") for kv in spec.split(":")[1:]))
    imgs = images()
    enc = lvlm.encode(imgs, PROMPTS, lvlm.vision_needs(pruner))
    with record_kept(pruner) as rec:
        out = lvlm.generate(imgs, PROMPTS, pruner=pruner, max_new_tokens=2, encoded=enc)
    assert "select" not in vars(pruner)  # the pruner is left as it was
    for b, st in enumerate(out.stats):
        kept = rec.kept(str(b), view_sizes(enc.views, b))
        assert sum(kept.views) == st.visual_tokens_in
        final = int(kept.stages[-1].sum())
        if pruner.stage.value == "pre_llm":
            assert final == st.visual_per_layer[0] or spec.startswith(("visionzip", "pool"))
        else:  # counted inside the decoder: visual tokens at the layers after each stage
            layers = [s.layer for s in pruner.needs.schedule()]
            merged_in = [st.visual_per_layer[layer] for layer in layers]
            before = [sum(kept.views)] + [int(s.sum()) for s in kept.stages[:-1]]
            assert [int(s.sum()) for s in kept.stages] == [m - _merged(rec, str(b), i, before[i]) for i, m in enumerate(merged_in)]
            assert all((later <= earlier).all() for earlier, later in zip(kept.stages, kept.stages[1:]))
        if kept.scores is not None and spec.startswith("fopru"):  # per view: top-k of the recorded score
            for score, k in zip(kept.per_view(kept.scores), kept.per_view(kept.stages[0])):
                assert np.nonzero(k)[0].tolist() == np.sort(np.argsort(-score, kind="stable")[:k.sum()]).tolist()
        if kept.scores is not None and spec.startswith("fastv"):  # all visual tokens of the sample as one set
            top = np.sort(np.argsort(-kept.scores, kind="stable")[:final])
            assert np.nonzero(kept.stages[0])[0].tolist() == top.tolist()


def _merged(rec: KeptRecorder, sid: str, stage: int, before: int) -> int:
    """Merged tokens among the visual ones after ``stage`` (SparseVLM): earlier merges the stage kept
    (indices past the ``before`` original tokens it received) plus the stage's own new merges."""
    call = next(c for c in rec.calls if c.stage == stage and sid in c.sample_ids)
    row = call.sample_ids.index(sid)
    n = int((call.reduction.indices[row] >= before).sum())
    if call.reduction.merge_weights is not None:
        n += int((call.reduction.merge_weights[row].sum(-1) > 0).sum())
    return n
