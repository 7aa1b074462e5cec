"""Exactness checks shared by the video and multi-image tests of every family.

Each takes a wrapped tiny model, one visual per sample (a PIL image, a list of them, or a
``tokenprune.Video``) and prompts, and asserts against an independent reference: Hugging Face's
own forward / ``generate`` on the very processor tensors, forward pre-hooks inside the decoder,
a no-cache decoding reference, and each sample run alone.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

import tokenprune as tp
from test_adapters import BUILTIN, NEW_TOKENS, LayerInputCounter
from tokenprune.pruner import PrunerNeeds, Stage

BUILTIN_PRUNERS = list(BUILTIN)
# The pre-LLM pruners that pool one budget over a clip (scope="clip"): token/feature readers, and the
# rankers by per-view vision attention (token_scores). vispruner, visionzip and fopru_row need each
# view's own map for more than a ranking, and pool one view's grid: they refuse scope="clip" in one line.
CLIP_SCOPE_PRUNERS = ["fopru_rank", "fastervlm", "random", "divprune", "cdpruner"]


def hf_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The processor batch as the Hugging Face model takes it (tokenprune's own ``tp_*`` entries dropped)."""
    return {k: v for k, v in batch.items() if not k.startswith("tp_")}


def check_unpruned_matches_hf(lvlm, visuals: Sequence[Any], prompts: Sequence[str], new_tokens: int = NEW_TOKENS,
                              atol: float = 1e-5) -> None:
    """Unpruned: last-position logits == HF forward on the same tensors, tokens == HF ``generate`` (each sample
    alone, so HF's own padding handling is not what is compared)."""
    for visual, prompt in zip(visuals, prompts):
        out = lvlm.generate([visual], [prompt], max_new_tokens=new_tokens)
        batch = hf_inputs(lvlm.prepare([visual], [prompt]))
        with torch.no_grad():
            ref_logits = lvlm.model(**batch).logits[:, -1].float()
            ref_tokens = lvlm.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        diff = (out.first_logits - ref_logits).abs().max().item()
        assert diff <= atol, f"logits differ from HF by {diff}"
        n = out.stats[0].new_tokens
        assert out.token_ids[0, :n].tolist() == ref_tokens[0, batch["input_ids"].shape[1]:][:n].tolist()


def budget(lvlm, pruner, visual: Any, prompt: str, ratio: float) -> tuple[int, int, int]:
    """``(text tokens, visual tokens, visual tokens the pruner must keep)`` for one sample, from the views."""
    batch = lvlm.prepare([visual], [prompt])
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable]
    n_visual = sum(v.tokens.shape[0] for v in views)
    n_text = batch["input_ids"].shape[1] - n_visual
    if pruner.stage is Stage.IN_LLM or pruner.scope == "clip":  # the sample's visual tokens as one set
        kept = tp.keep_count(ratio, n_visual)
    else:
        kept = sum(pruner.num_kept(v.tokens.shape[0], v.grid) for v in views)
    return n_text, n_visual, kept


def make(name: str, ratio: float, scope: str | None = None):
    """``create_pruner(name, ratio=ratio)``, at ``scope`` when given (``None``: the method's default)."""
    return tp.create_pruner(name, ratio=ratio, **({} if scope is None else {"scope": scope}))


def check_counts(lvlm, visual: Any, prompt: str, name: str, ratio: float = 0.25, scope: str | None = None) -> None:
    """The tokens entering each decoder layer at prefill, counted by forward pre-hooks, == text + the budget."""
    p = make(name, ratio, scope)
    n_text, n_visual, kept = budget(lvlm, p, visual, prompt, ratio)
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate([visual], [prompt], pruner=p, max_new_tokens=1)
    finally:
        counter.close()
    if p.adaptive:  # the method chose its count: the layers must receive what it reports, and no more than N
        kept = out.stats[0].visual_tokens_kept
        assert 1 <= kept <= n_visual
    k = p.k if p.stage is Stage.IN_LLM else 0
    for i in range(len(lvlm.runner.layers)):
        expected = n_text + n_visual if i < k else n_text + kept
        got = counter.lengths[i][0]
        assert got == expected, f"{name}: layer {i} received {got} tokens, expected {expected}"
    assert kept < n_visual or p.adaptive


def check_pruner_on(lvlm, visuals: Sequence[Any], prompts: Sequence[str], name: str, ratio: float = 0.25,
                    new_tokens: int = NEW_TOKENS, scope: str | None = None) -> None:
    """One pruner (at ``scope``, default the method's own) on a batch of visuals: ratio 1.0 == unpruned;
    per-layer counts == budget (first sample); cached == uncached; the batch == each sample alone."""
    ref = lvlm.generate(visuals, prompts, max_new_tokens=new_tokens)
    full = lvlm.generate(visuals, prompts, pruner=make(name, 1.0, scope), max_new_tokens=new_tokens)
    assert torch.equal(full.token_ids, ref.token_ids), f"{name} at ratio 1.0 changed the answer"
    assert (full.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    check_counts(lvlm, visuals[0], prompts[0], name, ratio, scope)

    p = make(name, ratio, scope)
    ids = [f"s{i}" for i in range(len(prompts))]
    cached = lvlm.generate(visuals, prompts, pruner=p, max_new_tokens=new_tokens, ignore_eos=True, sample_ids=ids)
    uncached = lvlm.generate(visuals, prompts, pruner=p, max_new_tokens=new_tokens, ignore_eos=True,
                             use_cache=False, sample_ids=ids)
    assert torch.equal(cached.token_ids, uncached.token_ids), f"{name}: cached != uncached"

    for i, sid in enumerate(ids):
        alone = lvlm.generate(visuals[i:i + 1], prompts[i:i + 1], pruner=p, max_new_tokens=new_tokens,
                              ignore_eos=True, sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i]), f"{name}: sample {i} alone != in the batch"
        assert alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=0, atol=1e-4)
