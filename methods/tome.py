"""ToMe (ICLR'23, arXiv 2210.09461): bipartite soft matching inside the vision tower.

As the official code ``facebookresearch/ToMe@af95e4b``: ``tome/merge.py`` (``bipartite_soft_matching``
L18-97, ``merge_wavg`` L210-224), ``tome/patch/timm.py`` (``ToMeBlock.forward`` L34-57,
``ToMeAttention.forward`` L66-96, ``apply_patch`` L116) and ``tome/utils.py`` (``parse_r`` L80-105); and its
LLaVA port in LightCompress (``ModelTC/LightCompress@9701d03``, ``llmc/compression/token_reduction/tome.py``:
``ToMe.add_sparse_config`` L20-35, ``tome_CLIPSdpaAttention_forward`` L156-218,
``tome_CLIPEncoderLayer_forward`` L221-256). In every block the tower runs,
between the attention residual and the MLP (hook point ``"attention"``):

* **metric**: the block's attention keys averaged over heads (``k.mean(1)``, projection bias included);
* **matching**: ``r = min(r, (T - protected) // 2)``; cosine similarity between set ``a`` (tokens 0, 2,
  4, ...) and set ``b`` (tokens 1, 3, 5, ...); the rows of protected ``a`` tokens (CLS) and the columns
  of protected ``b`` tokens are ``-inf``; each ``a`` token's best ``b`` match (``node_max``,
  ``node_idx``); the ``r`` ``a`` tokens with the highest ``node_max`` merge into their match;
* **order** of the new sequence: ``[unmerged a, all b]`` -- with a prefix (class token) the unmerged
  ``a`` tokens sorted by index, so the prefix stays first; **without** one (SigLIP) in the order of
  ``node_max`` (highest first), as the official code leaves them (it sorts only ``if class_token``);
* **merge**: size-weighted average, ``x = sum(x * size) / sum(size)`` per new token, sizes summed
  and carried from block to block (``merge_wavg``);
* **proportional attention** (``prop_attn``, official default on): every block after the first merge
  adds ``log(size)`` over the key axis to its attention logits (``ToMeAttention`` L86).

Options:

| option | official default | what it does |
| --- | --- | --- |
| ``ratio`` (0.5) | -- | with ``r=None``: ``keep_count(ratio, P)`` patch tokens reach the projector, exactly |
| ``r`` (``None``) | ``model.r = 0`` (README: 16; LightCompress ``r: 16``) | tokens merged per block: an int (every block), a per-block list (padded with 0s, ``parse_r``), a tuple ``(r, inflect)`` (``parse_r``'s linear schedule over the blocks run; ``inflect=-1`` the paper's decreasing schedule), or ``None``: solved from ``ratio`` (below) |
| ``variant`` (``"official"``) | -- | ``"official"``: sizes carried, proportional attention; ``"lightcompress"``: each merge an unweighted mean of the current tokens (sizes reset every block, ``merge_wavg(merge, x)`` with ``size=None``), no proportional attention |
| ``prop_attn`` (``None``) | ``apply_patch(prop_attn=True)`` | ``None``: the variant's own (official on, LightCompress off); ``True`` / ``False`` overrides it for the official variant |

**Budget** (``r=None``): the ``P - keep_count(ratio, P)`` merges are spread over the ``n`` blocks the tower
runs as evenly as possible, larger ``r`` first, as LightCompress's per-layer lists for LLaVA-1.5 (576
patches, 23 blocks: ``[17]*16 + [16]*7`` for 192, ``[20]*11 + [19]*12`` for 128, ``[23]*6 + [22]*17`` for
64). A block merges at most half of its patch tokens; where the even spread would need more later, the
early blocks take more, so every target of at least ``ceil(P / 2**n)`` tokens is met exactly; below that
an :class:`~tokenprune.errors.OptionError` names the smallest reachable ratio. An explicit ``r`` is
clipped per block as the official ``min`` does, and the count is what the schedule leaves on the tower's
depth (``r=16`` on LLaVA-1.5's 23 blocks: 208; 17: 185; 19: 139; 22: 70): ``ratio`` is then unused
(``uses_ratio`` is ``False``) and :meth:`ToMePruner.num_kept` needs the depth (from
:meth:`ToMePruner.vision_hooks`). The blocks after the one the projector reads are not run (LightCompress
patches all 24 CLIP layers; the last one's merge is wasted compute there).

**Positions.** Each merged token takes the position of the earliest patch it covers
(``VisionState.origin``), under ``position_policy="keep"``. The method's own convention (the official
LLaVA code, and LightCompress) is ``"compact"``: the tokens reach the LLM in ToMe's scrambled order
(``[unmerged a, b]`` after every block) and are renumbered ``0..k-1`` in that order.

**Other towers.** The prefix is protected whole (``class_token = prefix > 0``; a second prefix token is
treated as the official distillation token: no ``a`` token merges into it; more prefix tokens
likewise, ``protected = prefix``), so the prefix keeps slots ``0..prefix-1``. A tower without a prefix (SigLIP) runs with
``class_token=False`` (LightCompress patches only CLIP layers; SigLIP gets no ToMe there).

**Deliberate differences.** (1) The metric is normalised and compared in float32 (the official: the
model's dtype). (2) ``node_max`` ties go to the lower index (a stable sort; the official ``argsort`` is
unstable), ``node_idx`` ties as ``torch.max``. (3) ``(r, inflect)`` is spread over the blocks the tower
runs (the official ``parse_r`` over all of the model's blocks; LLaVA skips the last). (4) LightCompress
reads a 2-element ``r`` as ``(start, step)``; here a list is always per block (write LightCompress's
linear schedule out as a list).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError
from ..in_vision import VisionHook, VisionReduction, VisionState
from ..pruner import (Stage, TokenPruner, keep_count, register_pruner, validate_choice, validate_float, validate_int,
                      validate_ratio)

VARIANTS = ("official", "lightcompress")


def parse_r(num_layers: int, r: int | list[int] | tuple[int, float]) -> list[int]:
    """Official ``tome/utils.py`` ``parse_r``: ``r`` as a per-block list of ``num_layers`` entries.

    An int is constant; a list is padded with 0s (and, here, cut to ``num_layers``); ``(r, inflect)`` is
    linear from ``int(r * (1 - inflect))`` to ``2r`` minus that. ``num_layers == 1`` gives ``[int(r * (1 -
    inflect))]`` (the official divides by ``num_layers - 1``).
    """
    inflect = 0.0
    if isinstance(r, list):
        return (list(r) + [0] * num_layers)[:num_layers]
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


def fewest_reachable(n_patches: int, n_blocks: int) -> int:
    """The fewest patch tokens ``n_blocks`` blocks can leave of ``n_patches``, each merging at most
    half of its patch tokens (``r = (T - prefix) // 2``): ``ceil(n_patches / 2**n_blocks)``."""
    n = n_patches
    for _ in range(n_blocks):
        n -= n // 2
    return n


def solve_r(n_patches: int, target: int, n_blocks: int) -> list[int]:
    """Per-block ``r`` that leaves exactly ``target`` of ``n_patches`` patch tokens after ``n_blocks`` blocks.

    As even as possible, larger first (LightCompress's LLaVA lists): block ``i`` of the ``m`` left merges
    ``ceil(remaining / m)``, raised where the later blocks could not make up the rest (each merges at
    most half of its tokens) and never above this block's half.

    Raises:
        OptionError: ``target`` below :func:`fewest_reachable` (one line with the smallest ratio).
    """
    floor = fewest_reachable(n_patches, n_blocks)
    if target < floor:
        raise OptionError(
            f"tome cannot keep {target} of {n_patches} patch tokens in {n_blocks} vision blocks "
            f"(a block merges at most half of its tokens): the smallest reachable ratio is {floor / n_patches:.4g} "
            f"({floor} tokens)")
    out: list[int] = []
    n = n_patches
    for i in range(n_blocks):
        left = n_blocks - i
        share = -(-max(n - target, 0) // left)  # ceil: the larger r first
        need = max(0, n - target * 2 ** (left - 1))  # what the later blocks cannot merge (each halves at most)
        r = min(n // 2, max(share, need))
        out.append(r)
        n -= r
    return out


def matching_slots(metric: torch.Tensor, r: int, prefix: int) -> tuple[torch.Tensor, int] | None:
    """Official ``bipartite_soft_matching`` as slots: where each of ``T`` tokens goes.

    Args:
        metric: ``[B, T, d]`` head-averaged keys, prefix first.
        r: tokens to merge away (clipped to ``(T - prefix) // 2`` as the official ``min``).
        prefix: protected tokens (CLS / registers; ``class_token = prefix > 0``).

    Returns:
        ``(slots [B, T] long, T - r)``: the new index of every token -- the order ``[prefix, unmerged
        a, non-prefix b]`` (unmerged ``a`` by index with a prefix, by ``node_max`` without), a merged
        ``a`` token taking its match's slot; ``None`` when ``r`` clips to 0 (the official ``do_nothing``).
    """
    b, t, _ = metric.shape
    r = min(r, (t - prefix) // 2)
    if r <= 0:
        return None
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a_m, b_m = m[:, ::2], m[:, 1::2]
    n_a, n_b = a_m.shape[1], b_m.shape[1]
    pa, pb = (prefix + 1) // 2, prefix // 2  # prefix tokens in set a (0, 2, ...) and in set b (1, 3, ...)
    scores = a_m @ b_m.transpose(1, 2)  # [B, n_a, n_b]
    scores[:, :pa, :] = float("-inf")  # a protected token is never a source (official: CLS row)
    scores[:, :, :pb] = float("-inf")  # ... nor a destination (official: the distillation column)
    node_max, node_idx = scores.max(dim=-1)  # [B, n_a]
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_idx, unm_idx = order[:, :r], order[:, r:]
    if prefix:
        unm_idx = unm_idx.sort(dim=-1).values  # official: sorted so the class token stays first
    dev = metric.device
    n_unm = n_a - r - pa  # unmerged non-prefix a tokens
    # slot of each b token: prefix ones keep their index (2j + 1); the others follow the unmerged a tokens
    j = torch.arange(n_b, device=dev)
    slot_b = torch.where(j < pb, 2 * j + 1, prefix + n_unm + j - pb)
    # slot of the k-th unmerged a token: prefix ones keep their index (2k); the others follow the prefix
    k = torch.arange(n_a - r, device=dev)
    unm_slot = torch.where(k < pa, 2 * k, prefix + k - pa).expand(b, -1)
    slot_a = torch.empty(b, n_a, dtype=torch.long, device=dev)
    slot_a.scatter_(1, unm_idx, unm_slot)
    slot_a.scatter_(1, src_idx, slot_b[node_idx.gather(1, src_idx)])  # a source joins its best b match
    slots = torch.empty(b, t, dtype=torch.long, device=dev)
    slots[:, ::2] = slot_a
    slots[:, 1::2] = slot_b.expand(b, -1)
    return slots, t - r


def _validate_r(value: Any) -> int | list[int] | tuple[int, float] | None:
    """``r`` as ``None``, an int ``>= 0``, a list of ints ``>= 0`` or an ``(r, inflect)`` tuple."""
    if value is None:
        return None
    if isinstance(value, tuple):
        if len(value) != 2:
            raise OptionError(f"r as a tuple is ToMe's (r, inflect), e.g. (16, -1.0); got {value!r} "
                              "(a per-block schedule is a list)")
        return (validate_int(value[0], "r", 0), validate_float(value[1], "inflect", -1.0, 1.0))
    if isinstance(value, list):
        if not value:
            raise OptionError("r must be an int, a per-block list of ints or (r, inflect); got an empty list")
        return [validate_int(v, "r", 0) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return validate_int(value, "r", 0)
    raise OptionError(f"r must be None (solved from ratio), an int, a per-block list of ints or (r, inflect); "
                      f"got {value!r}")


@register_pruner("tome")
class ToMePruner(TokenPruner):
    """ToMe: bipartite soft matching in every vision block, key-similar tokens merged size-weighted.

    In each block the ``r`` tokens of one half of a bipartite split (even / odd tokens) most similar (key
    cosine) to a token of the other half merge into it; see the module docstring for the options.

    Positions: a merged token takes the earliest patch it covers (``VisionState.origin``) under
    ``"keep"``; under the method's own ``"compact"`` (the official LLaVA order) the tokens are
    renumbered in ToMe's scrambled order (``[unmerged a, b]`` after every block).
    """

    stage = Stage.IN_VISION
    position_policy = "compact"
    scopes = ("frame",)  # a tower runs each view on its own

    def __init__(self, ratio: float = 0.5, r: int | list[int] | tuple[int, float] | None = None,
                 variant: str = "official", prop_attn: bool | None = None):
        self.ratio = validate_ratio(ratio)
        self.r = _validate_r(r)
        self.variant = validate_choice(variant, "variant", VARIANTS)
        if prop_attn is not None and not isinstance(prop_attn, bool):
            raise OptionError(f"prop_attn must be true, false or None (the variant's own); got {prop_attn!r}")
        if prop_attn and self.variant == "lightcompress":
            raise OptionError("prop_attn=True needs sizes carried across blocks; variant='lightcompress' resets them "
                              "every block (use variant='official')")
        self.prop_attn = prop_attn
        self._depth: int | None = None  # the blocks the tower runs, from the latest vision_hooks call

    @property
    def uses_ratio(self) -> bool:
        """``True`` with ``r=None`` (the count is ``keep_count(ratio, P)``, exactly); an explicit ``r``
        ignores ``ratio``."""
        return self.r is None

    @property
    def proportional_attention(self) -> bool:
        """ToMe's ``prop_attn``: on for the official variant unless ``prop_attn=False``."""
        return self.variant == "official" and self.prop_attn is not False

    def schedule(self, n_patches: int, n_blocks: int) -> list[int]:
        """``r`` per block for ``n_patches`` patches in a tower running ``n_blocks`` blocks (before the
        official per-block ``min``; the solved schedule never needs it)."""
        if self.r is None:
            return solve_r(n_patches, keep_count(self.ratio, n_patches), n_blocks)
        return parse_r(n_blocks, self.r)

    def kept_count(self, n_patches: int, n_blocks: int) -> int:
        """Patch tokens that reach the projector: ``n_patches`` less each block's ``min(r, n // 2)`` (``n`` the
        patch tokens entering the block)."""
        n = n_patches
        for r in self.schedule(n_patches, n_blocks):
            n -= min(r, n // 2)
        return n

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """``keep_count(ratio, n_tokens)`` with ``r=None``; with an explicit ``r`` the count of the schedule
        over the depth of the latest :meth:`vision_hooks` call (it depends on the tower).

        Raises:
            OptionError: an explicit ``r`` before any tower depth is known.
        """
        if self.r is None:
            return keep_count(self.ratio, n_tokens)
        if self._depth is None:
            raise OptionError("tome with an explicit r keeps a count that depends on the vision tower's depth; "
                              "run it on a model (or leave r unset to keep round(ratio * N) exactly)")
        return self.kept_count(n_tokens, self._depth)

    def vision_hooks(self, n_blocks: int) -> tuple[VisionHook, ...]:
        """Every block (between attention and MLP, with the head-averaged keys) that may merge: all of them
        with ``r=None`` and ``ratio < 1``, the blocks with ``r > 0`` for an explicit schedule."""
        self._depth = n_blocks
        if self.r is None:
            blocks = range(n_blocks) if self.ratio < 1.0 else range(0)
        else:
            blocks = [i for i, r in enumerate(parse_r(n_blocks, self.r)) if r > 0]
        return tuple(VisionHook(i, "attention", keys=True) for i in blocks)

    def select(self, state: VisionState) -> VisionReduction | None:  # type: ignore[override]
        """One block's merge: ``None`` where ``r`` is (or clips to) 0."""
        if not isinstance(state, VisionState):
            raise TypeError("tome acts inside the vision tower: select takes a VisionState (run it through an adapter "
                            "or tokenprune.adapters.vision_blocks.run_tower)")
        if state.keys is None:
            raise ValueError("tome needs the block's keys (VisionHook keys=True); the adapter did not provide them")
        schedule = state.memory.get("tome_r")
        if schedule is None:  # fixed at the first hook of a tower run: it depends only on P and the depth
            n_patches = state.grid[0] * state.grid[1]
            schedule = state.memory["tome_r"] = (
                solve_r(n_patches, state.target, state.n_blocks) if self.r is None else parse_r(state.n_blocks, self.r))
        r = schedule[state.block] if state.block < len(schedule) else 0
        matched = matching_slots(state.keys, r, state.prefix)
        if matched is None:
            return None
        slots, length = matched
        if self.variant == "lightcompress":  # merge_wavg(merge, x) with size=None: unweighted, sizes 1 again
            return VisionReduction(slots=slots, length=length, weights=torch.ones_like(state.sizes), reset_sizes=True)
        return VisionReduction(slots=slots, length=length)
