"""MustDrop (arXiv 2411.10803): multi-stage vision token dropping -- in the vision tower, at LLM prefill, and
on the decode cache.

As the official code ``liuting20/MustDrop@909afa5`` (LLaVA-1.5):

* **Stage 1, vision tower** (``llava/model/multimodal_encoder/clip_encoder.py``
  ``CLIPVisionModelAcc.custom_forward`` L39-125; ``local_merge.py`` ``conditional_pooling`` L30-133,
  ``merge_wavg`` L135-146). After block 0, the ``h x w`` patch grid is cut into non-overlapping ``3 x 3``
  windows; a window's score is the mean pairwise cosine of its 9 tokens, self-pairs excluded
  (``sum / (9 * 8)``); ``r`` = the windows scoring ``>= 0.8`` (the fewest over the batch); the ``r``
  best windows are each merged into one token, the plain mean of their 9 tokens (``merge_wavg`` with no
  size; the size it returns is thrown away, so no later block weighs by it), kept at the window's last
  (bottom-right) token. The new order is ``[CLS, merged (descending window score), unmerged (ascending
  index)]``: ``1 + N - 8 r`` tokens go on through the tower. **Key set**: the CLS row of the tower's
  *last* block's attention (``idx == 23``; LLaVA reads the block before it, ``hidden_states[-2]``), averaged
  over heads, picks the top ``ceil(0.08 (T - 1))`` patch tokens (``T`` the sequence then, CLS included):
  here a hook on that block's attention half (it runs for this alone, its cost counted) marks them
  (:meth:`~tokenprune.in_vision.VisionReduction.mark`), and the mark travels with the tokens into the LLM.
* **Stage 2, LLM prefill** (``language_model/modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``
  L219-276, ``dual_attention_filter`` L336-354). At decoder layers ``2, 6, 10, 14`` (0-indexed), that
  layer's own attention probabilities, rows = every token after the image, columns = the current image
  tokens, averaged over heads: ``g_j`` = column sum, ``m_j`` = column max; token ``j`` is dropped iff
  ``g_j < global_thr * sum(g)`` **and** ``m_j < individual_thr``; the key set is always kept
  (``torch.unique(cat(kept, key_set))``, ascending), and the hidden states after that layer are cut, so
  the next layer (3, 7, 11, 15) is the first to see the cut (``LLMStage(layer + 1, "previous", "text")``).
  Positions are renumbered contiguously (``position_ids.narrow``).
* **Stage 3, decode cache** (same ``forward`` L300-325, attention L380-382). Nothing is scored while
  decoding. After prefill the per-stage indices are composed, the KV of layers ``2 .. 14`` (first to last
  prune layer) is cut to the **final** set -- a token dropped at layer 14 also leaves layers 2-13's cache --,
  layers 0-1 keep everything, and a generated token's rotary position at each layer is **that layer's cache
  length** (so layers 0-1 continue from the full prompt length, the others from the cut one): the
  decoding hook's :class:`~tokenprune.pruner.DecodePlan` ``(cut_layers=range(2, 15), positions="cache_length")``.

Options (``mustdrop:setting=128``, ``mustdrop:global_thr=0.002:individual_thr=0.001``, ...):

==================  ==========================  =====================================================
option              official default            what it does
==================  ==========================  =====================================================
``ratio``           --                          picks the official threshold pair (below), unless
                                                ``setting`` or both thresholds are given; ``1.0``
                                                turns every stage off (the unpruned model)
``setting``         ``"192"`` (README, scripts)  an official pair by name: ``"192"`` 0.001 / 0.001,
                                                ``"128"`` 0.0012 / 0.001, ``"64"`` 0.011 / 0.01,
                                                ``"vizwiz64"`` 0.005 / 0.001
                                                (``scripts/v1_5/eval/*_{192,128,64}.sh``)
``global_thr``      0.001                       stage 2: drop only tokens whose column sum is below
                                                this share of all columns' sum
``individual_thr``  0.001                       stage 2: ... and whose column max is below this
``merge_threshold`` 0.8 (hard-coded)            stage 1: windows scoring at least this are merged
``window``          3 (``(3, 3)``, hard-coded)   stage 1: square window side; the grid must be square
                                                and divisible by it
``key_rate``        0.08 (hard-coded)           stage 1: key set = top ``ceil(key_rate (T - 1))``
``layers``          ``2, 6, 10, 14``            stage 2: the 0-based layers whose attention filters
                                                (each cut is seen from the next layer on)
``kv_trim``         on                          stage 3: cut layers ``layers[0] .. layers[-1]``'s KV
                                                cache to the final set after prefill
``decode_positions`` ``"cache_length"``          stage 3: a generated token's position per layer =
                                                that layer's cache length; ``"continue"``: one past
                                                the layer's last position (the framework's default)
==================  ==========================  =====================================================

**Budget.** The count is adaptive (``adaptive = True``): thresholds, not counts. The paper's "192 / 128 /
64 tokens" are layer-averaged equivalents (the official ``forward`` prints ``sum(per-layer image
tokens) / 32``); ``visual_tokens_avg`` in results reports that average, over what each layer processed
(the official adds a prune layer's count after its cut, one layer earlier). ``ratio`` maps to the official
pair whose equivalent budget (64, 128 or 192 of LLaVA-1.5's 576) is nearest to ``ratio * 576``
(``ratio = 192/576`` gives "192"; ``0.5`` also gives "192"; below ``96/576`` gives "64"), and ``ratio =
1.0`` to no pruning at all; so ``uses_ratio`` is true unless ``setting`` or both thresholds are given.

**Batches.** The official code runs batch 1 (``attn[0]``, ``position_ids[0]``) and takes ``r`` as the
minimum over the batch. Here every image goes through the tower alone (``adaptive``: ``r`` is its own),
every sample through each LLM stage alone, and the cache is cut per sample, so a batch gives what each
sample gives alone.

**Where it runs.** LLaVA-1.5-style models: a CLIP tower (one CLS token) on a square grid divisible by
the window (LLaVA-1.5's 24 x 24); anything else is refused in one line. The official code's hard-coded
constants (576 tokens, layer 23, 32 decoder layers, 35 system tokens) are derived from the inputs.

**Deliberate differences.** (1) Scores in float32 (the official: fp16 SDPA probabilities, fp16 cosines);
GQA keys repeated to their query heads. (2) Ties: window order and key set by a stable sort (lower index
first; the official ``topk`` leaves ties unspecified). (3) The last tower block runs only its attention
half for the key set (the official runs the whole block and discards its output). (4) Under
``position_policy="keep"`` (an ablation) a merged token takes the position of its window's first patch.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..in_vision import VisionHook, VisionReduction, VisionState
from ..pruner import (
    DecodePlan,
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    register_pruner,
    validate_choice,
    validate_float,
    validate_int,
    validate_layers,
    validate_ratio,
)

# The official threshold pairs (global_thr, individual_thr), README and scripts/v1_5/eval/*.sh.
OFFICIAL_SETTINGS: dict[str, tuple[float, float]] = {
    "192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01), "vizwiz64": (0.005, 0.001)}
# Their layer-averaged equivalent budgets on LLaVA-1.5's 576 visual tokens (what ``ratio`` maps from).
SETTING_TOKENS = {"64": 64, "128": 128, "192": 192}
REFERENCE_TOKENS = 576
DECODE_POSITIONS = ("cache_length", "continue")


def setting_for_ratio(ratio: float) -> str | None:
    """The official setting whose equivalent budget is nearest to ``ratio * 576`` (ties to the larger
    budget); ``None`` (no pruning) for ``ratio == 1``."""
    if ratio >= 1.0:
        return None
    target = ratio * REFERENCE_TOKENS
    return min(SETTING_TOKENS, key=lambda s: (abs(SETTING_TOKENS[s] - target), -SETTING_TOKENS[s]))


def window_members(grid: tuple[int, int], window: int, device: torch.device | None = None) -> torch.Tensor:
    """``[W, window**2]`` long: the patch indices (raster order over ``grid``) of each window, windows in
    raster order, each window's patches in raster order -- the official ``unfold`` layout, so the last
    member is the window's bottom-right patch."""
    h, w = grid
    idx = torch.arange(h * w, device=device).view(h // window, window, w // window, window)
    return idx.permute(0, 2, 1, 3).reshape(-1, window * window)


def window_scores(patches: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """``[B, W]`` float32: each window's mean pairwise cosine similarity, self-pairs excluded
    (``sum / (n (n - 1))``, ``n = window**2``), of ``patches`` ``[B, h*w, D]`` (official ``conditional_pooling``)."""
    members = window_members(grid, window, patches.device)  # [W, n]
    x = patches.float()[:, members]  # [B, W, n, D]
    n = members.shape[1]
    sims = F.cosine_similarity(x[..., :, None, :], x[..., None, :, :], dim=-1)  # [B, W, n, n]
    sims = sims * (1 - torch.eye(n, device=x.device))
    return sims.sum((-1, -2)) / (n * (n - 1))


def merge_slots(scores: torch.Tensor, threshold: float, grid: tuple[int, int], window: int
                ) -> tuple[torch.Tensor, int, int]:
    """Where stage 1 sends each token: ``(slots [B, 1 + h*w], new length, r)``.

    ``r`` = windows scoring ``>= threshold``, the fewest over the batch (one host sync); the ``r`` best
    windows of each image (descending score, ties to the lower window) take slots ``1 .. r``, all their
    patches averaged into one; the other patches follow in ascending index order; the CLS keeps slot 0.
    """
    b, n_windows = scores.shape
    r = int((scores >= threshold).sum(1).min())
    members = window_members(grid, window, scores.device)  # [W, n]
    n_patches = grid[0] * grid[1]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, W]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_windows, device=scores.device).expand(b, -1))
    window_of = torch.empty(n_patches, dtype=torch.long, device=scores.device)
    window_of[members.flatten()] = torch.arange(n_windows, device=scores.device).repeat_interleave(members.shape[1])
    patch_rank = rank[:, window_of]  # [B, P]: each patch's window's rank
    merged = patch_rank < r
    unmerged_rank = (~merged).long().cumsum(1) - 1
    slots = torch.where(merged, 1 + patch_rank, 1 + r + unmerged_rank)
    slots = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=scores.device), slots], 1)
    return slots, 1 + r + n_patches - r * members.shape[1], r


def dual_attention_filter(attention: torch.Tensor, query_mask: torch.Tensor | None, global_thr: float,
                          individual_thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's rule on ``attention`` ``[B, Q, N]`` (head-averaged, query rows = the text after the image,
    ``query_mask`` ``[B, Q]`` the real ones): ``([B, N] dropped, [B, N] column sums g)``; ``j`` is dropped
    iff ``g_j < global_thr * sum(g)`` and ``max_rows attention[:, j] < individual_thr`` (official
    ``dual_attention_filter``)."""
    attn = attention.float()
    if query_mask is not None:
        attn = attn * query_mask[..., None].to(attn.dtype)  # padding rows count nothing (probabilities are >= 0)
    g = attn.sum(1)
    peak = attn.amax(1) if attn.shape[1] else torch.zeros_like(g)
    return (g < g.sum(-1, keepdim=True) * global_thr) & (peak < individual_thr), g


def key_set(cls_attention: torch.Tensor, rate: float) -> torch.Tensor:
    """``[B, k]`` the top ``k = ceil(rate * T')`` patch tokens by CLS attention ``[B, T']`` (ties to the lower
    index), in descending attention order."""
    k = min(cls_attention.shape[1], math.ceil(rate * cls_attention.shape[1]))
    return torch.sort(cls_attention.float(), dim=1, descending=True, stable=True).indices[:, :k]


@register_pruner("mustdrop")
class MustDropPruner(TokenPruner):
    """MustDrop: 3x3 window merge and a key set in the vision tower, dual-attention filter at LLM layers 2/6/10/14, decode KV cut."""

    stage = Stage.IN_VISION
    extra_stages = (Stage.IN_LLM, Stage.DECODE)
    quantised = True  # thresholds: num_kept is only a bound
    adaptive = True
    position_policy = "compact"

    def __init__(self, ratio: float = 192 / 576, setting: str | None = None, global_thr: float | None = None,
                 individual_thr: float | None = None, merge_threshold: float = 0.8, window: int = 3,
                 key_rate: float = 0.08, layers: tuple[int, ...] | str = (2, 6, 10, 14), kv_trim: bool = True,
                 decode_positions: str = "cache_length"):
        self.ratio = validate_ratio(ratio)
        self.setting = None if setting is None else validate_choice(str(setting), "setting", tuple(OFFICIAL_SETTINGS))
        self.global_thr = None if global_thr is None else validate_float(global_thr, "global_thr", 0.0)
        self.individual_thr = None if individual_thr is None else validate_float(individual_thr, "individual_thr", 0.0)
        self.merge_threshold = validate_float(merge_threshold, "merge_threshold")
        self.window = validate_int(window, "window", minimum=2)
        self.key_rate = validate_float(key_rate, "key_rate", 0.0, 1.0)
        self.layers = validate_layers(layers, "layers", minimum=0)
        if not isinstance(kv_trim, bool):
            raise OptionError(f"kv_trim must be true or false, got {kv_trim!r}")
        self.kv_trim = kv_trim
        self.decode_positions = validate_choice(decode_positions, "decode_positions", DECODE_POSITIONS)

    # -- what the options resolve to ---------------------------------------------------------------
    @property
    def uses_ratio(self) -> bool:
        """``True`` while ``ratio`` picks the threshold pair (no ``setting``, not both thresholds given)."""
        return self.setting is None and (self.global_thr is None or self.individual_thr is None)

    @property
    def off(self) -> bool:
        """``ratio = 1`` with no setting or threshold given: every stage keeps everything (the unpruned model)."""
        return self.ratio >= 1.0 and self.setting is None and self.global_thr is None and self.individual_thr is None

    def thresholds(self) -> tuple[float, float]:
        """``(global_thr, individual_thr)`` of stage 2 (``(0, 0)``: nothing dropped)."""
        name = self.setting or setting_for_ratio(self.ratio)
        g, i = OFFICIAL_SETTINGS[name] if name is not None else (0.0, 0.0)
        return (g if self.global_thr is None else self.global_thr,
                i if self.individual_thr is None else self.individual_thr)

    @property
    def needs(self) -> PrunerNeeds:
        """Stage 2: the attention of each filter layer, rows = the text after the image, cut from the next layer."""
        return PrunerNeeds(llm_stages=tuple(LLMStage(layer=layer + 1, attention="previous", queries="text")
                                            for layer in self.layers))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """An upper bound: the count is the data's (thresholds)."""
        return n_tokens

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        """Upper bounds per stage (adaptive: the counts are the data's; runs report them)."""
        return [n_tokens] * len(self.layers)

    def vision_hooks(self, n_blocks: int) -> tuple[VisionHook, ...]:
        """Stage 1: the merge after block 0; the key set from the last tower block's CLS attention row."""
        return (VisionHook(0, "block"), VisionHook(-1, "attention", attention="prefix"))

    def decode_plan(self, n_layers: int) -> DecodePlan | None:
        """Stage 3: layers ``layers[0] .. layers[-1]`` cut to the final set; positions by cache length."""
        cut = tuple(range(self.layers[0], self.layers[-1] + 1)) if self.kv_trim and not self.off else ()
        return DecodePlan(cut_layers=cut, positions=self.decode_positions)  # type: ignore[arg-type]

    # -- the stages ----------------------------------------------------------------------------
    def select(self, inputs: Any) -> Any:
        """Stage 1 on a :class:`~tokenprune.in_vision.VisionState` (the merge at block 0, the key set at the
        last block); stage 2 on :class:`~tokenprune.pruner.PruningInputs` (one LLM filter layer)."""
        if isinstance(inputs, VisionState):
            return self._vision(inputs)
        return self._filter(inputs)

    def _vision(self, state: VisionState) -> VisionReduction | None:
        if state.prefix != 1:
            raise OptionError(f"mustdrop needs a vision tower with one CLS token (its key set is the CLS attention); "
                              f"this tower leads with {state.prefix}: use a LLaVA-1.5-style CLIP model")
        h, w = state.grid
        n = state.hidden.shape[1] - 1
        if h != w or h % self.window:
            raise OptionError(f"mustdrop merges {self.window}x{self.window} windows of a square patch grid; this image "
                              f"has a {h}x{w} grid: use a model whose grid side is divisible by {self.window}")
        if state.point == "block":  # after block 0: the window merge
            if self.off:
                return None
            scores = window_scores(state.hidden[:, 1:], state.grid, self.window)
            slots, length, r = merge_slots(scores, self.merge_threshold, state.grid, self.window)
            if r == 0:
                return None  # the official merge with r = 0 is the identity
            b = scores.shape[0]
            members = window_members(state.grid, self.window, scores.device)
            per_token = torch.zeros(b, n, device=scores.device)
            per_token[:, members.flatten()] = scores.repeat_interleave(members.shape[1], dim=1)
            per_token = torch.cat([per_token.new_ones(b, 1), per_token], 1)
            return VisionReduction(slots=slots, length=length, weights=torch.ones_like(per_token), reset_sizes=True,
                                   scores=per_token)
        if state.attention is None:
            raise ValueError("mustdrop needs the last block's CLS attention (VisionHook attention='prefix')")
        cls = state.attention[:, 0, 1:]  # [B, T - 1], the CLS row over the patch tokens
        top = key_set(cls, self.key_rate)
        protect = torch.zeros(cls.shape[0], cls.shape[1] + 1, dtype=torch.bool, device=cls.device)
        protect.scatter_(1, top + 1, True)
        return VisionReduction.mark(protect, scores=torch.cat([cls.new_zeros(cls.shape[0], 1), cls], 1))

    def _filter(self, inputs: PruningInputs) -> Reduction:
        if inputs.llm_attention is None:
            raise ValueError("mustdrop needs llm_attention at its filter layers; the adapter did not provide it")
        global_thr, individual_thr = self.thresholds()
        dropped, g = dual_attention_filter(inputs.llm_attention, inputs.llm_query_mask, global_thr, individual_thr)
        keep = ~dropped
        if inputs.protected is not None:
            keep |= inputs.protected.to(keep.device)  # the key set always survives
        counts = keep.sum(1)
        k = int(counts.max())  # one host sync per stage: the count is the data's
        if inputs.batch_size > 1 and int(counts.min()) != k:
            raise OptionError(f"mustdrop keeps an adaptive count per sample, and samples pruned in one call got "
                              f"{counts.tolist()}: run them one per call (the adapters do)")
        order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        return Reduction(indices=order.sort(dim=1).values, scores=g)
