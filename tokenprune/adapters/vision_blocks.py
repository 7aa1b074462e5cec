"""Running a ViT tower block by block, so an in-vision pruner can shorten its sequence between blocks.

Hugging Face towers run all their blocks in one call. For a pruner of stage ``in_vision`` (ToMe,
FlowCut) the adapter runs the tower here instead: the embeddings, then each block as its two
residual halves (attention, then MLP), calling the pruner at the :class:`~tokenprune.in_vision.VisionHook`
s it asked for and applying each :class:`~tokenprune.in_vision.VisionReduction`, so every later
block (and the projector, and the LLM) sees the shorter sequence. The halves call the block's own
submodules in the block's own order, so a tower with no cut gives Hugging Face's hidden states bit
for bit. Blocks past the one whose output the projector reads are not run (Hugging Face runs them
and throws their output away), unless a hook reads one (MustDrop's key set comes from the CLS attention
of the tower's last block, one past LLaVA's feature block): then they run on the features, the last
only up to the hook, and what the pruner marks there (:meth:`~tokenprune.in_vision.VisionReduction.mark`)
travels with the tokens into the LLM.

Towers: CLIP and SigLIP (``layer_norm1`` / ``self_attn`` / ``layer_norm2`` / ``mlp``) and DINOv2
(``norm1`` / ``attention`` / ``layer_scale1`` / ``norm2`` / ``mlp`` / ``layer_scale2``). Others are
refused in one line by the family (:meth:`~tokenprune.adapters.base.PrunableLVLM.in_vision_refusal`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import OptionError
from ..in_vision import VisionHook, VisionReduction, VisionState
from ..pruner import TokenPruner, keep_count
from .attention import record_attention


@dataclass
class TowerParts:
    """How to run one tower in halves: ``embed(pixel_values) -> [B, T, D]`` (what block 0 receives),
    the blocks in order, and the two residual halves of a block."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: Sequence[nn.Module]
    attention_half: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]
    mlp_half: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    attention_module: Callable[[nn.Module], nn.Module]


def _clip_attention_half(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    h, _ = block.self_attn(hidden_states=block.layer_norm1(x), attention_mask=bias)
    return x + h


def _clip_mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.mlp(block.layer_norm2(x))


def _dinov2_attention_half(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    h, _ = block.attention(block.norm1(x), attention_mask=bias)
    return block.drop_path(block.layer_scale1(h)) + x


def _dinov2_mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x)))) + x


def tower_parts(tower: nn.Module) -> TowerParts:
    """The :class:`TowerParts` of a Hugging Face CLIP / SigLIP / DINOv2 vision tower.

    Raises:
        OptionError: another tower (one line naming it and the towers that work).
    """
    kind = getattr(tower.config, "model_type", type(tower).__name__)
    if kind in ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model"):
        vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
        pre = getattr(vm, "pre_layrnorm", None)  # CLIP normalises the embeddings; SigLIP does not

        def embed(pixel_values: torch.Tensor) -> torch.Tensor:
            x = vm.embeddings(pixel_values)
            return pre(x) if pre is not None else x

        return TowerParts(embed, list(vm.encoder.layers), _clip_attention_half, _clip_mlp_half, lambda b: b.self_attn)
    if kind == "dinov2":
        return TowerParts(lambda px: tower.embeddings(px), list(tower.encoder.layer), _dinov2_attention_half,
                          _dinov2_mlp_half, lambda b: b.attention)
    raise OptionError(f"in-vision pruning runs on CLIP, SigLIP and DINOv2 towers; this model's tower is {kind!r}: "
                      "use a pre-LLM or in-LLM method")


def apply_reduction(red: VisionReduction, hidden: torch.Tensor, sizes: torch.Tensor, origin: torch.Tensor,
                    members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``red`` to the tower's running state.

    Args:
        hidden: ``[B, T, D]`` the sequence; ``sizes`` ``[B, T]`` float patches per token; ``origin``
            ``[B, T]`` long, the earliest patch each token covers (``-1`` for prefix tokens);
            ``members`` ``[B, P]`` long, the current token of each original patch (``-1``: dropped).

    Returns:
        ``(hidden [B, L, D], sizes [B, L], origin [B, L], members [B, P])``, ``L = red.length``: tokens
        sharing a slot averaged with ``red.weights`` (default ``sizes``), sizes summed (or reset to 1),
        origins the earliest patch of each slot.
    """
    b, t, d = hidden.shape
    length = red.length
    slots = red.slots.to(hidden.device)
    dest = torch.where(slots < 0, length, slots)  # dropped tokens go to a spare slot, cut below
    weights = (sizes if red.weights is None else red.weights.to(sizes.device)).to(torch.float32)
    acc = torch.zeros(b, length + 1, d, dtype=torch.float32, device=hidden.device)
    acc.scatter_add_(1, dest[..., None].expand(-1, -1, d), hidden.float() * weights[..., None])
    total = torch.zeros(b, length + 1, dtype=torch.float32, device=hidden.device).scatter_add_(1, dest, weights)
    new_hidden = (acc[:, :length] / total[:, :length, None]).to(hidden.dtype)
    new_sizes = torch.zeros(b, length + 1, dtype=sizes.dtype, device=sizes.device).scatter_add_(1, dest, sizes)[:, :length]
    if red.reset_sizes:
        new_sizes = torch.ones_like(new_sizes)
    big = torch.iinfo(torch.long).max
    keyed = torch.where(origin < 0, -1, origin)
    new_origin = torch.full((b, length + 1), big, dtype=torch.long, device=origin.device)
    new_origin = new_origin.scatter_reduce(1, dest, keyed, reduce="amin")[:, :length]
    alive = members >= 0
    new_members = torch.where(alive, slots.gather(1, members.clamp_min(0)), -1)
    return new_hidden, new_sizes, new_origin, new_members


@dataclass
class TowerRun:
    """What :func:`run_tower` returns for ``B`` images.

    Attributes:
        features: ``[B, L, D]`` the output of the projector's feature block, prefix first.
        origin: ``[B, L - prefix]`` the original patch each patch token takes its position from.
        members: ``[B, P]`` each original patch's token among the ``L - prefix`` (``-1``: dropped).
        sizes: ``[B, L - prefix]`` patches each token covers.
        blocks: per block run, ``(tokens its attention saw, tokens its MLP saw)``; a block past the
            feature block that ran only for a hook's attention reads counts ``(T, 0)``.
        protected: ``[B, L - prefix]`` bool, the patch tokens the pruner marked
            (:meth:`~tokenprune.in_vision.VisionReduction.mark`); ``None`` when it marked none.
    """

    features: torch.Tensor
    origin: torch.Tensor
    members: torch.Tensor
    sizes: torch.Tensor
    blocks: list[tuple[int, int]] = field(default_factory=list)
    protected: torch.Tensor | None = None


def _union(a: VisionHook | None, b: VisionHook | None) -> VisionHook | None:
    """One recording serves both hooks of a block: everything either asks for."""
    if a is None or b is None:
        return a or b
    rows = "all" if "all" in (a.attention, b.attention) else ("prefix" if "prefix" in (a.attention, b.attention) else "none")
    return VisionHook(a.block, a.point, a.keys or b.keys, rows, a.values or b.values, a.queries or b.queries)


def _recording(parts: TowerParts, block: nn.Module, hook: VisionHook | None, prefix: int):
    if hook is None or not (hook.keys or hook.values or hook.queries or hook.attention != "none"):
        return contextlib.nullcontext(None)
    rows = None if hook.attention == "none" else hook.attention
    return record_attention(parts.attention_module(block), rows=rows, n_prefix=max(prefix, 1),
                            keys=hook.keys, values=hook.values, queries=prefix if hook.queries else 0)


def run_tower(tower: nn.Module, pixel_values: torch.Tensor, pruner: TokenPruner, feature_layer: int, prefix: int,
              sample_ids: Sequence[Any] | None = None, target: int | None = None) -> TowerRun:
    """The tower's features at ``feature_layer`` with ``pruner`` cutting between blocks.

    Args:
        tower: a CLIP / SigLIP / DINOv2 vision model (see :func:`tower_parts`).
        pixel_values: ``[B, 3, H, W]``.
        pruner: an in-vision pruner (its :meth:`~tokenprune.pruner.TokenPruner.vision_hooks`).
        feature_layer: the index into Hugging Face's ``hidden_states`` the projector reads (``-2``:
            the output of the second-to-last block); blocks after it are not run, unless a hook asks
            for one (a negative ``VisionHook.block``, e.g. MustDrop's last-block CLS attention): then
            the blocks up to it run on the features, the last of them only up to the hook's point,
            and what the pruner returns there may only mark tokens, not cut.
        prefix: CLS / register tokens leading the sequence, never cut.
        sample_ids: one id per image, handed to the pruner.
        target: patch tokens each image must bring to the projector (``VisionState.target``); ``None``:
            ``keep_count(pruner.ratio, patches)``. A family whose views share one image's budget sets it
            (:meth:`~tokenprune.pruner.TokenPruner.vision_view_target`).
    """
    parts = tower_parts(tower)
    n_all = len(parts.blocks)
    if not -(n_all + 1) <= feature_layer <= n_all:
        raise OptionError(f"vision_feature_layer={feature_layer} is out of range for a {n_all}-block tower")
    n_run = feature_layer % (n_all + 1)  # hidden_states[i] is the output of block i - 1
    hooks: dict[tuple[int, str], VisionHook] = {}
    for h in pruner.vision_hooks(n_run):
        block = h.block + n_all if h.block < 0 else h.block
        if not 0 <= block < n_all:
            raise OptionError(f"{pruner.name} asked for vision block {h.block}; the tower has blocks 0..{n_all - 1}")
        hooks[(block, h.point)] = replace(h, block=block)
    n_exec = max([n_run] + [blk + 1 for blk, _ in hooks])  # blocks past n_run run only for a hook's reads
    x = parts.embed(pixel_values)
    b, t, _ = x.shape
    patches = t - prefix
    side = int(round(patches ** 0.5))
    grid = (side, patches // side) if side * (patches // side) == patches else (1, patches)
    dev = x.device
    sizes = torch.ones(b, t, dtype=torch.float32, device=dev)
    origin = (torch.arange(t, device=dev) - prefix).clamp_min(-1).expand(b, -1).clone()
    members = (torch.arange(patches, device=dev) + prefix).expand(b, -1).clone()
    if target is None:
        target = keep_count(getattr(pruner, "ratio", 1.0), patches)
    memory: dict[str, Any] = {}
    merged = False
    counts: list[tuple[int, int]] = []
    protected: torch.Tensor | None = None
    features = x

    def cut(block_idx: int, point: str, rec) -> None:
        nonlocal x, sizes, origin, members, merged, protected
        hook = hooks[(block_idx, point)]
        state = VisionState(
            hidden=x, prefix=prefix, grid=grid, block=block_idx, point=point, n_blocks=n_run, target=target,
            sizes=sizes, origin=origin, sample_ids=sample_ids, memory=memory, protected=protected,
            keys=rec.keys[0].mean(1) if rec is not None and hook.keys else None,
            attention=rec.maps[0] if rec is not None and hook.attention != "none" else None,
            values=rec.values[0] if rec is not None and hook.values else None,
            queries=rec.queries[0] if rec is not None and hook.queries else None)
        red = pruner.select(state)
        if red is None:
            return
        marks = protected
        if red.protect is not None:  # the prefix is never marked
            new = red.protect.to(dev).bool().clone()
            new[:, :prefix] = False
            marks = new if marks is None else marks | new
        if block_idx >= n_run:  # past the feature block: its output is thrown away, so nothing may be cut
            if red.length != x.shape[1]:
                raise OptionError(f"{pruner.name} cut vision block {block_idx}, past the block the projector reads "
                                  f"({n_run - 1}); there it may only mark tokens (VisionReduction.mark)")
            protected = marks
            return
        if marks is not None:  # a slot is marked if any token merged into it is
            dest = torch.where(red.slots.to(dev) < 0, red.length, red.slots.to(dev))
            protected = torch.zeros(b, red.length + 1, dtype=torch.long, device=dev).scatter_reduce(
                1, dest, marks.long(), reduce="amax")[:, : red.length].bool()
        x, sizes, origin, members = apply_reduction(red, x, sizes, origin, members)
        merged = True

    for i, block in enumerate(parts.blocks[:n_exec]):
        bias = None
        if merged and pruner.proportional_attention:  # ToMe: log(size) over the key axis
            bias = sizes.log()[:, None, None, :].to(x.dtype)
        n_attn = x.shape[1]
        with _recording(parts, block, _union(hooks.get((i, "attention")), hooks.get((i, "block"))), prefix) as rec:
            x = parts.attention_half(block, x, bias)
        if i >= n_run and i == n_exec - 1 and (i, "block") not in hooks:
            cut(i, "attention", rec)  # the last block run only for its attention reads: no MLP
            counts.append((n_attn, 0))
            break
        if (i, "attention") in hooks:
            cut(i, "attention", rec)
        n_mlp = x.shape[1]
        x = parts.mlp_half(block, x)
        if (i, "block") in hooks:
            cut(i, "block", rec)
        counts.append((n_attn, n_mlp))
        if i == n_run - 1:
            features = x
    return TowerRun(features=features, origin=origin[:, prefix:], members=torch.where(members >= 0, members - prefix, -1),
                    sizes=sizes[:, prefix:], blocks=counts,
                    protected=None if protected is None else protected[:, prefix:])
