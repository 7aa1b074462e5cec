"""Helpers for testing pruners, built-in or plugin: synthetic inputs and the contract checks.

A plugin's own test suite can run ``check_pruner_contract(MyPruner(ratio=0.25))``; tokenprune's
suite runs it on every pruner that ``list_pruners()`` returns, plugins included.
"""
from __future__ import annotations

from typing import Any

import torch

from .pruner import PruningInputs, Reduction, TokenPruner, keep_count


def synthetic_inputs(
    batch: int = 3,
    grid: tuple[int, int] = (6, 8),
    dim: int = 16,
    vision_prefix: int = 1,
    patch_merge: int = 1,
    n_queries: int = 5,
    seed: int = 0,
    n_text: int = 6,
) -> PruningInputs:
    """Random but valid :class:`PruningInputs` with every optional field filled.

    Attention maps are row-softmaxes of random logits (each row sums to 1); the LLM query mask
    marks the first query row of batch entry 0 as padding, as left padding would, and so does the
    text mask for its first text token. Keys are ``[B, N, 8]`` / ``[B, n_text, 8]``; the vision layer's
    query and key projections ``[B, vision_prefix + N, 8]``.
    """
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    t = vision_prefix + n * patch_merge
    mask = torch.ones(batch, n_queries, dtype=torch.bool)
    mask[0, 0] = False
    text_mask = torch.ones(batch, n_text, dtype=torch.bool)
    text_mask[0, 0] = False
    return PruningInputs(
        tokens=torch.randn(batch, n, dim, generator=g),
        grid=grid,
        sample_ids=[f"sample-{seed}-{i}" for i in range(batch)],
        vision_attention=(3 * torch.randn(batch, t, t, generator=g)).softmax(-1),
        vision_prefix=vision_prefix,
        patch_merge=patch_merge,
        vision_features=torch.randn(batch, n, 2 * dim, generator=g),
        llm_attention=(3 * torch.randn(batch, n_queries, n, generator=g)).softmax(-1),
        llm_query_mask=mask,
        llm_keys=torch.randn(batch, n, 8, generator=g),
        text_tokens=torch.randn(batch, n_text, dim, generator=g),
        text_mask=text_mask,
        text_keys=torch.randn(batch, n_text, 8, generator=g),
        vision_queries=torch.randn(batch, vision_prefix + n, 8, generator=g),
        vision_keys_full=torch.randn(batch, vision_prefix + n, 8, generator=g),
        previous_tokens=torch.randn(batch, n, dim, generator=g),  # drawn late: earlier fields keep their values
        vision_attention2=(3 * torch.randn(batch, t, t, generator=g)).softmax(-1),  # a second vision layer (HiPrune)
    )


def check_reduction(pruner: TokenPruner, inputs: PruningInputs, reduction: Reduction) -> None:
    """Assert that ``reduction`` is a valid output of ``pruner`` for ``inputs``.

    Checks: shapes ``[B, k]`` / ``[B, k, D]``; ``k`` equals ``pruner.num_kept`` (and the ratio rule
    ``max(1, round(r*N))`` unless the pruner is ``quantised``; at most ``num_kept`` if ``adaptive``); indices in range, unique and
    strictly increasing; a declared output grid matches ``k``; in-LLM merge weights are
    ``[B, M, N]``, non-negative, each real row summing to 1, and only over dropped tokens.
    """
    b, n, d = inputs.tokens.shape
    idx = reduction.indices
    k = idx.shape[1] if pruner.adaptive else pruner.num_kept(n, inputs.grid)  # adaptive: num_kept is a bound
    assert idx.dtype == torch.long, f"indices must be long, got {idx.dtype}"
    assert idx.shape == (b, k), f"indices shape {tuple(idx.shape)}, expected {(b, k)}"
    if pruner.adaptive:
        assert k <= pruner.num_kept(n, inputs.grid), f"adaptive count {k} above the pruner's bound"
    elif not pruner.quantised:
        assert k == keep_count(pruner.ratio, n), f"k={k} breaks the ratio rule for r={pruner.ratio}, N={n}"
    # k = 0 only for a pruner that withdraws every visual token (VTW: num_kept is 0)
    assert (0 if pruner.num_kept(n, inputs.grid) == 0 else 1) <= k <= n
    if k:
        assert int(idx.min()) >= 0 and int(idx.max()) < n, "indices out of range"
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be unique and in original order"
    if reduction.tokens is not None:
        assert reduction.tokens.shape == (b, k, d), f"merged tokens shape {tuple(reduction.tokens.shape)}"
    if reduction.token_weights is not None:
        assert reduction.tokens is not None, "token_weights come with merged tokens"
        assert reduction.token_weights.shape == (b, k, n), f"token weights shape {tuple(reduction.token_weights.shape)}"
        torch.testing.assert_close(reduction.token_weights.to(inputs.tokens.dtype) @ inputs.tokens, reduction.tokens,
                                   msg="tokens must equal token_weights @ inputs.tokens")
    if reduction.grid is not None:
        assert reduction.grid[0] * reduction.grid[1] == k, "output grid does not match k"
    m = 0
    if reduction.merge_weights is not None:
        w = reduction.merge_weights
        m = w.shape[1]
        assert w.shape == (b, m, n), f"merge weights shape {tuple(w.shape)}, expected (B, M, {n})"
        assert bool((w >= 0).all()), "merge weights must be non-negative"
        sums = w.sum(-1)
        assert bool(((sums - 1).abs() < 1e-4).logical_or(sums == 0).all()), "each merge row must sum to 1 (or be all zeros: padding)"
        kept = torch.zeros(b, n, dtype=torch.bool).scatter(1, idx.cpu(), True)
        assert not bool(((w.cpu() > 0) & kept[:, None, :]).any()), "merged tokens must come from dropped tokens"
    if reduction.merge_into is not None:  # in-place merges: one kept slot (or -1) per token, weights with it
        into, w = reduction.merge_into, reduction.merge_into_weights
        assert w is not None and into.shape == (b, n) and w.shape == (b, n), "merge_into and its weights are [B, N]"
        assert into.dtype == torch.long and int(into.min()) >= -1 and int(into.max()) < k, "merge_into slots in -1..k-1"
        assert bool((w[into >= 0] >= 0).all()), "in-place merge weights must be non-negative"
        slot = into.clamp_min(0)
        sums = torch.zeros(b, k, dtype=torch.float32).scatter_add_(1, slot.cpu(), torch.where(into >= 0, w, 0.0).float().cpu())
        named = torch.zeros(b, k, dtype=torch.int32).scatter_add_(1, slot.cpu(), (into >= 0).int().cpu()) > 0
        assert bool(((sums - 1).abs() < 1e-4)[named].all()), "the weights naming a kept slot must sum to 1"
    if reduction.feature_weights is not None:
        prefix = 0 if inputs.vision_prefix_features is None else inputs.vision_prefix_features.shape[1]
        assert reduction.feature_weights.shape == (b, k, prefix + n), "feature weights must be [B, k, prefix + N]"
    if reduction.positions is not None:
        assert reduction.positions.shape == (b, k) and int(reduction.positions.min()) >= 0 and int(reduction.positions.max()) < n
    assert reduction.apply(inputs.tokens).shape == (b, k + m, d)


def check_pruner_contract(pruner: TokenPruner, inputs: PruningInputs | None = None) -> None:
    """Run :func:`check_reduction` and check that the batched result equals one-by-one results (an
    ``adaptive`` pruner, which adapters call one view or clip at a time, on each batch entry alone)."""
    inputs = inputs if inputs is not None else synthetic_inputs()
    if pruner.adaptive:
        for i in range(inputs.batch_size):
            check_reduction(pruner, inputs.select(i), pruner(inputs.select(i)))
        return
    batched = pruner(inputs)
    check_reduction(pruner, inputs, batched)
    for i in range(inputs.batch_size):
        single = pruner(inputs.select(i))
        assert torch.equal(single.indices[0], batched.indices[i]), f"batch entry {i} differs when run alone"
        if batched.tokens is not None:
            torch.testing.assert_close(single.tokens[0], batched.tokens[i])
        if batched.merge_weights is not None:
            torch.testing.assert_close(single.merge_weights[0], batched.merge_weights[i])
        if batched.feature_weights is not None:
            torch.testing.assert_close(single.feature_weights[0], batched.feature_weights[i])


def check_in_vision_contract(pruner: TokenPruner, n_blocks: int = 3, grid: tuple[int, int] = (8, 8), seed: int = 0) -> None:
    """Run an in-vision ``pruner`` inside a small random CLIP tower (CLS + ``grid`` patches, ``n_blocks``
    blocks, all run) and assert the stage's contract: the CLS token stays first, every patch is in at most
    one output token, the tokens' origins are the earliest patch they cover, a ratio-driven pruner lets
    exactly ``num_kept(P, grid)`` patch tokens through, and a batch of 2 equals each image alone (unless
    the pruner is ``adaptive`` or ``image_by_image``: adapters run those one image per pass)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .adapters.vision_blocks import run_tower

    torch.manual_seed(seed)
    patch = 8
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_blocks, num_attention_heads=4,
                           image_size=grid[0] * patch, patch_size=patch)
    if grid[0] != grid[1]:
        raise ValueError("check_in_vision_contract takes a square grid")
    tower = CLIPVisionModel(cfg).eval()
    px = torch.randn(2, 3, grid[0] * patch, grid[1] * patch)
    with torch.no_grad():
        run = run_tower(tower, px, pruner, n_blocks, prefix=1, sample_ids=["a", "b"])
        alone = [run_tower(tower, px[i:i + 1], pruner, n_blocks, prefix=1, sample_ids=[s]) for i, s in enumerate("ab")]
    p = grid[0] * grid[1]
    k = run.features.shape[1] - 1
    assert run.members.shape == (2, p) and run.origin.shape == (2, k)
    assert ((run.members >= -1) & (run.members < k)).all()
    for b in range(2):
        covered = {}
        for patch_idx, tok in enumerate(run.members[b].tolist()):
            if tok >= 0:
                covered.setdefault(tok, []).append(patch_idx)
        assert sorted(covered) == list(range(k)), "every output token must cover at least one patch"
        assert [min(covered[t]) for t in range(k)] == run.origin[b].tolist()
    if pruner.uses_ratio and not pruner.adaptive:
        assert k == pruner.num_kept(p, grid), f"{pruner.name} let {k} tokens through, num_kept says {pruner.num_kept(p, grid)}"
    if pruner.adaptive or pruner.image_by_image:  # the adapter runs such pruners one image per tower pass
        return
    for i, one in enumerate(alone):
        assert one.features.shape[1] == run.features.shape[1]
        torch.testing.assert_close(one.features[0], run.features[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(one.members[0], run.members[i])


def check_cached_and_batched(lvlm: Any, visuals: list, prompts: list[str], pruner: TokenPruner,
                             new_tokens: int) -> None:
    """On a wrapped model: generation with the KV cache equals the no-cache reference, and a batch of the two
    samples equals each alone (tokens, stats, first logits within 1e-4). ``visuals`` / ``prompts``: 2 each."""
    cached = lvlm.generate(visuals, prompts, pruner=pruner, max_new_tokens=new_tokens, ignore_eos=True)
    uncached = lvlm.generate(visuals, prompts, pruner=pruner, max_new_tokens=new_tokens, ignore_eos=True,
                             use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids), "cached and uncached generation differ"
    both = lvlm.generate(visuals, prompts, pruner=pruner, max_new_tokens=new_tokens, sample_ids=["a", "b"])
    for i, sid in enumerate(["a", "b"]):
        alone = lvlm.generate(visuals[i:i + 1], prompts[i:i + 1], pruner=pruner, max_new_tokens=new_tokens,
                              sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], both.token_ids[i]), f"sample {i} differs alone"
        assert alone.stats[0] == both.stats[i]
        torch.testing.assert_close(alone.first_logits[0], both.first_logits[i], rtol=0, atol=1e-4)


def recording(pruner: TokenPruner) -> list[tuple[Any, Any]]:
    """Make ``pruner`` remember every ``(inputs, reduction)`` its ``select`` sees, in call order (each
    in-LLM stage, each in-vision hook); returns the list it appends to. Shadows ``select`` on the instance."""
    calls: list[tuple[Any, Any]] = []
    select = pruner.select

    def wrapped(inputs):
        out = select(inputs)
        calls.append((inputs, out))
        return out

    pruner.select = wrapped
    return calls
