"""Running a pre-LLM pruner on a batch's views, at its scope.

A family adapter hands over :class:`~tokenprune.adapters.base.View` s (one per image view, tile,
crop, video frame); this module batches alike views, calls the pruner, and returns what each view
keeps. Two scopes (:attr:`tokenprune.pruner.TokenPruner.scope`):

* ``"frame"``: each view is pruned on its own, with its own budget; views of one shape (every frame
  of a video, say) go through the pruner as one batch.
* ``"clip"``: all the prunable views of a sample (a whole video, all images of a prompt, all crops
  of an image) are one set of tokens with one budget. Pruners that read only tokens or features see
  the concatenation (``grid=(1, N)``, ``token_views`` / ``view_grids`` / ``view_times`` /
  ``view_features`` saying which view each token is from and what each view is), and so do temporal
  pruners that declare ``clip_inputs`` (with each view's vision attention in ``view_attention``).
  Other pruners that need per-view inputs (vision attention) are ranked instead: each view is
  scored on its own by :meth:`~tokenprune.pruner.TokenPruner.token_scores` and the clip keeps its top
  ``keep_count(ratio, N)`` tokens across views (ties to the earlier token).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..errors import OptionError
from ..pruner import PruningInputs, TokenPruner, topk_indices
from .decoder import gather_seq, left_pack

if TYPE_CHECKING:
    from .base import View

# What pre-LLM pruning returns per view: (sequence positions the kept tokens take, the tokens [k, D],
# the positions whose ids they take, their DeepStack features [levels, k, D] or None).
Kept = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
PER_VIEW_FIELDS = ("vision_attention", "vision_features", "vision_prefix_features", "vision_keys", "vision_queries",
                   "vision_keys_full", "vision_received", "vision_attention2", "vision_received2", "crop_attention",
                   "crop_layout")


def text_after_images(embeds: torch.Tensor, mask: torch.Tensor, views: list["View"], input_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([B, T, D] embeddings, [B, T] mask, [B, T] ids)`` of the prompt text after each sample's last visual
    token, padding first."""
    span = torch.zeros_like(mask)
    for v in views:
        span[v.sample, v.seq_index] = True
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(span, idx, -1).amax(1, keepdim=True)
    after = mask & (idx > last) & (last >= 0)
    index = left_pack(after)
    return gather_seq(embeds, index, 1), gather_seq(after, index, 1), gather_seq(input_ids, index, 1)


def text_inputs(text: tuple | None, rows: list[int]) -> dict[str, Any]:
    """The ``PruningInputs`` text fields of samples ``rows`` (none when the pruner asked for no text)."""
    if text is None:
        return {}
    embeds, mask, ids, prompts = text
    # Left-packed: drop the leading columns that are padding in every row of this group, so a group's
    # inputs have the same shape whatever else is in the batch (matmul rounding depends on shapes, and
    # a 1e-7 change can flip a near-tie of a discrete selection such as CDPruner's DPP).
    used = mask[rows].any(0).nonzero()
    start = int(used.min()) if used.numel() else mask.shape[1]
    return dict(text_tokens=embeds[rows, start:], text_mask=mask[rows, start:], text_ids=ids[rows, start:],
                prompts=None if prompts is None else [prompts[r] for r in rows])


def reduce_deepstack(red, deep: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """A pre-LLM reduction applied to DeepStack features ``[levels, B, N, D]`` -> ``[levels, B, k (+ M), D]``:
    the kept tokens' features, or merges with the very weights the tokens were merged with."""
    if red.feature_weights is not None:  # prefix (CLS) tokens carry no DeepStack features
        return red.feature_weights[..., prefix:].to(deep.dtype) @ deep
    if red.tokens is not None and red.token_weights is not None:
        out = red.token_weights.to(deep.dtype) @ deep
    else:
        if red.tokens is not None:
            import warnings

            warnings.warn("a merging pruner returned tokens without token_weights: each merged token gets "
                          "the DeepStack features of the token it stands for (indices)", stacklevel=3)
        idx = red.indices.to(deep.device)
        out = deep.gather(2, idx[None, :, :, None].expand(deep.shape[0], -1, -1, deep.shape[-1]))
    if red.merge_weights is not None:
        out = torch.cat([out, red.merge_weights.to(deep.dtype) @ deep], 2)
    return out


def _view_numbers(views: list["View"]) -> dict[int, int]:
    """Each prunable view's index among its sample's prunable views (sequence order)."""
    seen: dict[int, int] = {}
    out = {}
    for i, v in enumerate(views):
        if v.prunable:
            out[i] = seen.get(v.sample, 0)
            seen[v.sample] = out[i] + 1
    return out


def _alike_groups(views: list["View"], alone: bool = False) -> dict[tuple, list[int]]:
    """Prunable views alike in every shape a pruner reads, grouped so each group is one pruner batch;
    ``alone``: every view a group of its own (an adaptive pruner's count differs per view, and one
    Reduction holds one count)."""
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        if v.prunable:
            # getattr with a default: fields a View class may not have (the second layer's map, the crop layout)
            shapes = tuple(None if getattr(v, f, None) is None else tuple(getattr(v, f).shape) for f in PER_VIEW_FIELDS)
            groups.setdefault((v.grid, v.patch_merge, v.vision_prefix, shapes, i if alone else None), []).append(i)
    return groups


def _view_inputs(views: list["View"], members: list[int], key: tuple, ids: list[str], numbers: dict[int, int],
                 text: tuple | None) -> PruningInputs:
    grid, merge, prefix, shapes, _ = key
    stacked = {f: torch.stack([getattr(views[i], f) for i in members]) for f, shape in zip(PER_VIEW_FIELDS, shapes)
               if shape is not None}
    return PruningInputs(tokens=torch.stack([views[i].tokens for i in members]), grid=grid,
                         sample_ids=[f"{ids[views[i].sample]}/{numbers[i]}" for i in members],
                         vision_prefix=prefix, patch_merge=merge, **stacked,
                         **text_inputs(text, [views[i].sample for i in members]))


# Observers of every prune_views call (pictures, sweeps' kept-token records): see `observe`.
_observers: list[Callable[[list, TokenPruner, list[str], list], None]] = []


@contextmanager
def observe(callback: Callable[[list, TokenPruner, list[str], list], None]) -> Iterator[None]:
    """Inside the ``with`` block, ``callback(views, pruner, ids, kept)`` runs after every :func:`prune_views`
    call (``kept``: its return value), e.g. to record where each sample's kept tokens were placed."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def prune_views(views: list["View"], pruner: TokenPruner, ids: list[str],
                project_features: Callable[[torch.Tensor], torch.Tensor], text: tuple | None = None) -> list[Kept]:
    """Run the pre-LLM ``pruner`` on every view of a batch, at ``pruner.scope`` (see :func:`_prune_views`);
    observers registered with :func:`observe` see each call."""
    out = _prune_views(views, pruner, ids, project_features, text)
    for callback in list(_observers):
        callback(views, pruner, ids, out)
    return out


def _prune_views(views: list["View"], pruner: TokenPruner, ids: list[str],
                 project_features: Callable[[torch.Tensor], torch.Tensor], text: tuple | None = None) -> list[Kept]:
    """Run the pre-LLM ``pruner`` on every view of a batch, at ``pruner.scope``.

    Args:
        views: every view of the batch, each sample's in sequence order.
        pruner: a pre-LLM pruner.
        ids: one stable id per sample (seeds random pruners; a view's id is ``"{sample id}/{view no}"``).
        project_features: the model's projector, for pruners that merge before it (VisionZip).
        text: the prompt text after the visuals (embeddings, mask, ids) and the prompts, for pruners
            whose ``needs.text`` is set.

    Returns:
        Per view, ``(sequence positions the kept tokens take [k], tokens [k, D], positions whose ids
        they take [k], DeepStack features [levels, k, D] or None)``; non-prunable views unchanged.
        At scope ``"clip"`` a sample's kept tokens all go with its first prunable view.
    """
    out: list[Kept | None] = [None] * len(views)
    for i, v in enumerate(views):
        if not v.prunable:
            out[i] = (v.seq_index, v.tokens, v.seq_index, v.deepstack)
    if pruner.scope == "clip":
        if pruner.needs.vision_attention_layer is not None and not pruner.clip_inputs:
            return _rank_clips(views, pruner, ids, out, text)
        return _prune_clips(views, pruner, ids, out, text)
    numbers = _view_numbers(views)
    for key, members in _alike_groups(views, alone=pruner.adaptive).items():
        inputs = _view_inputs(views, members, key, ids, numbers, text)
        red = pruner(inputs)
        if red.feature_weights is not None:  # merged before the projector, then projected
            features = inputs.vision_features
            if inputs.vision_prefix_features is not None:
                features = torch.cat([inputs.vision_prefix_features, features], 1)
            new_tokens = project_features(red.feature_weights.to(features.dtype) @ features).to(features.device)
        else:
            new_tokens = red.apply(inputs.tokens)
        sources = red.positions if red.positions is not None else red.indices
        deep = None
        if all(views[i].deepstack is not None for i in members):
            deep = reduce_deepstack(red, torch.stack([views[i].deepstack for i in members], 1), key[2])
        for j, i in enumerate(members):
            out[i] = (views[i].seq_index[red.indices[j]], new_tokens[j], views[i].seq_index[sources[j]],
                      None if deep is None else deep[:, j])
    return out  # type: ignore[return-value]


def _clip_members(views: list["View"]) -> dict[int, list[int]]:
    per_sample: dict[int, list[int]] = {}
    for i, v in enumerate(views):
        if v.prunable:
            per_sample.setdefault(v.sample, []).append(i)
    return per_sample


def _give_to_first(out: list, views: list["View"], members: list[int], seq: torch.Tensor, tokens: torch.Tensor,
                   sources: torch.Tensor, deep: torch.Tensor | None) -> None:
    """All of a clip's kept tokens go with its first view; the others keep none (positions say where each sits)."""
    first, *rest = members
    out[first] = (seq, tokens, sources, deep)
    for i in rest:
        out[i] = (seq[:0], tokens[:0], seq[:0], None if deep is None else deep[:, :0])


def _clip_attention(views: list["View"], members: list[int]) -> torch.Tensor:
    """``[V, T, T]``: the views' own vision attention maps, stacked (one clip's views share a shape)."""
    maps = [views[i].vision_attention for i in members]
    if any(m is None for m in maps) or len({tuple(m.shape) for m in maps}) != 1:
        raise OptionError("this pruner takes a whole clip with each view's vision attention, which needs views of "
                          "one shape (a video's frames); for images of several sizes use scope='frame'")
    return torch.stack(maps)


def _scores_per_view(views: list["View"], pruner: TokenPruner, ids: list[str], text=None
                     ) -> dict[int, torch.Tensor] | None:
    """Each prunable view's :meth:`~tokenprune.pruner.TokenPruner.view_scores` ``[N_view]``, computed on its own
    inputs (alike views batched); ``None`` if the pruner scores no view."""
    numbers = _view_numbers(views)
    out: dict[int, torch.Tensor] = {}
    for key, members in _alike_groups(views).items():
        s = pruner.view_scores(_view_inputs(views, members, key, ids, numbers, text))
        if s is None:
            return None
        out.update({i: s[j] for j, i in enumerate(members)})
    return out


def _prune_clips(views: list["View"], pruner: TokenPruner, ids: list[str], out: list, text=None) -> list:
    """Scope ``"clip"`` for pruners that take a whole clip at once: each sample's prunable views
    concatenated (``grid=(1, N)``, with which view each token is from, each view's grid, time and mean
    token, and each view's vision attention for :attr:`~tokenprune.pruner.TokenPruner.clip_inputs`
    pruners); clips alike in layout share a batch."""
    per_sample = _clip_members(views)
    scored = None  # per-view scores of a clip pruner that scores each view itself (views of any shapes)
    own: dict[int, PruningInputs] | None = None  # each view's own inputs, for a rule coupling views (HiRED)
    if pruner.clip_inputs and getattr(pruner, "view_inputs", False):
        numbers = _view_numbers(views)
        own = {members[0]: _view_inputs(views, members, key, ids, numbers, text)
               for key, members in _alike_groups(views, alone=True).items()}
    elif pruner.clip_inputs and pruner.needs.vision_attention_layer is not None:
        scored = _scores_per_view(views, pruner, ids, text)
    groups: dict[tuple, list[int]] = {}
    for sample, members in per_sample.items():
        # an adaptive pruner's count differs per clip, and one Reduction holds one count: one clip per call
        key = (tuple(views[i].grid for i in members), sample if pruner.adaptive else None)
        groups.setdefault(key, []).append(sample)
    for (grids, _), samples in groups.items():
        n = sum(h * w for h, w in grids)
        tokens = torch.stack([torch.cat([views[i].tokens for i in per_sample[s]]) for s in samples])
        features = None
        if all(views[i].vision_features is not None for s in samples for i in per_sample[s]):
            features = torch.stack([torch.cat([views[i].vision_features for i in per_sample[s]]) for s in samples])
        received = None  # frames pooled after the tower: their attention received over every raw query
        if all(views[i].vision_received is not None for s in samples for i in per_sample[s]):
            received = torch.stack([torch.cat([views[i].vision_received for i in per_sample[s]]) for s in samples])
        token_views = torch.cat([torch.full((h * w,), j, dtype=torch.long) for j, (h, w) in enumerate(grids)])
        times = torch.tensor([[float("nan") if views[i].time is None else views[i].time for i in per_sample[s]]
                              for s in samples], dtype=torch.float64)
        means = torch.stack([torch.stack([views[i].tokens.mean(0) for i in per_sample[s]]) for s in samples])
        first_view_layout: dict[str, Any] = {}
        if scored is not None:
            first = views[per_sample[samples[0]][0]]
            first_view_layout = dict(view_scores=torch.stack([torch.cat([scored[i] for i in per_sample[s]])
                                                              for s in samples]),
                                     vision_prefix=first.vision_prefix, patch_merge=first.patch_merge)
        elif own is not None:
            first = views[per_sample[samples[0]][0]]
            first_view_layout = dict(view_inputs=[[own[i] for i in per_sample[s]] for s in samples],
                                     vision_prefix=first.vision_prefix, patch_merge=first.patch_merge)
        elif pruner.clip_inputs and pruner.needs.vision_attention_layer is not None:
            first = views[per_sample[samples[0]][0]]  # the maps' layout: CLS prefix, patches per token
            first_view_layout = dict(view_attention=torch.stack([_clip_attention(views, per_sample[s]) for s in samples]),
                                     vision_prefix=first.vision_prefix, patch_merge=first.patch_merge)
        red = pruner(PruningInputs(tokens=tokens, grid=(1, n), sample_ids=[ids[s] for s in samples],
                                   vision_features=features, vision_received=received, view_grids=grids,
                                   token_views=token_views.to(tokens.device).expand(len(samples), -1),
                                   view_times=times, view_features=means, **first_view_layout,
                                   **text_inputs(text, samples)))
        new_tokens = red.apply(tokens)
        deep = None
        if all(views[i].deepstack is not None for s in samples for i in per_sample[s]):
            deep = reduce_deepstack(red, torch.stack(
                [torch.cat([views[i].deepstack for i in per_sample[s]], 1) for s in samples], 1))
        for j, s in enumerate(samples):
            seq_all = torch.cat([views[i].seq_index for i in per_sample[s]])
            seq = seq_all[red.indices[j]]
            sources = seq_all[red.positions[j]] if red.positions is not None else seq
            _give_to_first(out, views, per_sample[s], seq, new_tokens[j], sources, None if deep is None else deep[:, j])
    return out


def _rank_clips(views: list["View"], pruner: TokenPruner, ids: list[str], out: list, text=None) -> list:
    """Scope ``"clip"`` for pruners scored on per-view inputs: each view scored on its own
    (:meth:`~tokenprune.pruner.TokenPruner.token_scores`), the clip's top ``keep_count(ratio, N)`` kept."""
    numbers = _view_numbers(views)
    scores: dict[int, torch.Tensor] = {}
    for key, members in _alike_groups(views).items():
        s = pruner.token_scores(_view_inputs(views, members, key, ids, numbers, text))
        if s is None:
            raise OptionError(f"{pruner.name} scores each view with its own vision attention and is not a per-token "
                              "ranking, so it cannot pool one budget over a clip; use scope='frame' (a budget per "
                              "frame / image)")
        for j, i in enumerate(members):
            scores[i] = s[j]
    for sample, members in _clip_members(views).items():
        clip_scores = torch.cat([scores[i].float() for i in members])
        n = clip_scores.shape[0]
        keep = topk_indices(clip_scores[None], pruner.num_kept(n, (1, n)))[0]
        seq = torch.cat([views[i].seq_index for i in members])[keep]
        tokens = torch.cat([views[i].tokens for i in members])[keep]
        deep = None
        if all(views[i].deepstack is not None for i in members):
            deep = torch.cat([views[i].deepstack for i in members], 1)[:, keep]
        _give_to_first(out, views, members, seq, tokens, seq, deep)
    return out
