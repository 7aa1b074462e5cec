"""DyCoke (CVPR'25, arXiv 2411.15024): temporal token merging before the LLM, dynamic KV selection while decoding.

As the official code ``KD-TAO/DyCoke@dd74634`` (LLaVA-OneVision; run through its ``lmms_eval`` wrapper,
``lmms_eval/models/llava_onevision.py``, whose defaults ``dycoke_k=0.7, dycoke_p=0.8, dycoke_l=3`` are what
``eval.sh`` reproduces the paper with), two stages:

**1. Token temporal merging (TTM)**, before the LLM, on the projected tokens of one video (OneVision: after the
2x2 bilinear frame pooling, 196 tokens a frame). ``llava/model/llava_arch.py``, ``dycole_ttm``: ``T`` frames of
``n`` tokens, ``m = int((1 - k) * n)`` (the official float arithmetic, e.g. 58 of 196 at ``k = 0.7``):

* *pairs*: for ``i in range(0, T - 1, 2)``: frame ``i`` whole; of frame ``i + 1`` the ``m`` tokens LEAST similar
  (cosine of the L2-normalised tokens) to the token at the same position in frame ``i``;
* *windows of 4*: for ``i in range(0, T - 4, 4)``: frame ``i + 2`` (whole after the pairs) is replaced by its
  ``m`` tokens least similar (plain cosine) to the same position in frame ``i``; the loop's bound skips the last
  window when 4 divides ``T`` (``T = 32``: windows 0, 4, .., 24; frame 30 stays whole);
* an odd ``T`` loses its last frame entirely (the pair loop never appends it): ``odd_frame="drop"``, the
  official behaviour; ``odd_frame="keep"`` keeps it whole instead.

Frame roles, ``T = 8``: 0 whole, 1 vs 0, 2 vs 0 (window), 3 vs 2, 4 whole, 5 vs 4, 6 whole (last window
skipped), 7 vs 6. :func:`ttm_plan` gives them for any ``T``; :meth:`DyCokePruner.clip_count` the clip's count.
Nothing is averaged: TTM selects, each kept token is the original token at its original place.

*"The same position"* per family: a view's tokens in raster order, frame ``i`` against frame ``i - 1`` (or
``i - 2``) at the same index -- LLaVA-OneVision / NeXT-Video: the pooled frame grid; InternVL: the frame's
pixel-shuffled tile; Qwen2-VL / 2.5-VL / 3-VL: a view is a *temporal patch of 2 frames* (one 2x2-merged token
per spatial cell spans both), so "frame" ``i`` is temporal patch ``i`` and the same position is the same merged
cell of the previous temporal patch, 2 frames earlier -- as the Qwen2.5-VL port the DyCoke README links
(``mvish7/dycoke_token_compression``, ``dycoke_num_tokens_per_frame=360``: one temporal patch's tokens) does.

**2. Dynamic KV selection while decoding** (:attr:`Stage.DECODE`, :meth:`DyCokePruner.decode_plan`:
``DecodePlan(select_layer=L)``). ``llava/model/language_model/modeling_qwen2.py``:
``PrunableDynamicCache.dycoke_pruning`` / ``update_cache`` and the per-layer branch of ``Qwen2Model.forward``.
At every decode step (not at prefill: the first answer token comes from prefill), layer ``L - 1``'s attention of
the new token (head mean) over the video span is compared (cosine) with the previous step's; if it is below
``0.9`` (always at the first step), layers ``>= L`` attend to every non-video entry (system prompt, question,
generated tokens) and the top ``int(N * (1 - p))`` video tokens by that attention, ``N`` the video tokens after
TTM. The cache itself keeps everything (``update`` gathers the kept positions of the full cache). At a step whose
attention barely moved (cosine ``>= 0.9``) the official code attends to the WHOLE cache: ``Qwen2Model.forward``
resets ``past_key_values.kv_cache = None`` in every layer ``< L`` at every step, and ``dycoke_pruning`` sets it
again only when the cosine is below 0.9 -- the previous selection is never reused (``stable="full"``, the
default). Reusing it on such steps (how descriptions of the method read: "else keep the previous selection") is
``stable="previous"``: the last selection, plus every token generated since. The comparison is always with the *previous step's*
attention (``config.attention_score`` is updated at every step, re-selected or not).

Budget (``ratio`` maps to DyCoke's ``k``; ``p`` is its own option):

==============  ========================  =======  =====================================================
option          official                  default  meaning here
==============  ========================  =======  =====================================================
``ratio``       ``1 - dycoke_k``          ``0.3``  share of a compared frame's tokens TTM keeps,
                (``dycoke_k = 0.7``)               ``m = int((1 - k) * n)`` with ``k = 1 - ratio``
``p``           ``dycoke_p``              ``0.8``  decoding: layers ``>= L`` attend to ``int(N * (1 - p))``
                                                   of the ``N`` video tokens at a re-selection step
                                                   (README example: 0.7; wrapper / builder default: 0.8)
``layer``       ``dycoke_l``              ``3``    ``L``: layers ``L..`` select, layer ``L - 1``'s attention
``threshold``   ``0.9`` (hard-coded)      ``0.9``  re-select when the cosine with the previous step's
                                                   attention is below it (``2``: every step)
``stable``      (the code: ``full``)      full     what layers ``>= L`` see when it is not below:
                                                   ``full`` (official code) or ``previous`` (last selection)
``odd_frame``   (the code: ``drop``)      drop     an odd clip's last frame: ``drop`` (official) or ``keep``
==============  ========================  =======  =====================================================

What TTM keeps of a clip (``ratio`` is not the clip's share): ``T`` even, ``w = len(range(0, T - 4, 4))``
windows: ``T/2 - w`` whole frames, ``T/2 + w`` compared frames of ``m`` tokens; ``T`` odd: as ``T - 1``, plus
the last frame (``keep``) or nothing (``drop``). OneVision, ``n = 196``, ``ratio = 0.3`` (``m = 58``):

=====  ==============================  =========
``T``  kept                            share
=====  ==============================  =========
8      3 x 196 + 5 x 58 = 878          56.0%
16     5 x 196 + 11 x 58 = 1618        51.6%
32     9 x 196 + 23 x 58 = 3098        49.4%
=====  ==============================  =========

(``ratio -> 0``: 28.1% at ``T = 32``, the whole frames alone.) The count follows the clip's layout ``(T, n)``
only, never its content (:meth:`DyCokePruner.clip_count`), but ``num_kept(N, grid)`` is not told the layout (at
scope clip the grid is ``(1, N)``): the pruner is ``adaptive`` (runs report what was kept, one clip per pruner
call, :meth:`DyCokePruner.num_kept` the bound ``N``: a one-frame input is kept whole) and ``quantised``.
``ratio = 1`` returns the clip whole (``k = 0``); the decode stage still acts unless ``p = 0`` (then every video
token is selected): the method's no-op is ``ratio=1, p=0``.

Positions: kept tokens in original order; the official LLaVA code builds the shorter sequence and numbers it
``0..L-1`` (``compact``); on M-RoPE models (Qwen) the original positions are kept (``position_policy_mrope``), as
the framework's other Qwen ports do (the mvish7 port recomputes ``get_rope_index`` on the shortened ids).

Deliberate differences from the official code:

1. Order within a compared frame: the official appends ``frame2_tokens[topk(...).indices]``, by ascending
   similarity; here in raster order (a :class:`Reduction` keeps original order), so ``compact`` positions follow
   the raster order.
2. Ties (equal similarities or attention): the lower index first (stable sorts); official ``torch.topk``: unspecified.
3. Similarities and decode attention in float32 (official: the model's fp16/bf16; its SDPA path recomputes the
   layer's attention with ``calculate_attention_weights`` in that dtype).
4. ``T <= 4``: no window (the official ``torch.stack`` of an empty list raises); ``T = 1`` (one view, or inputs
   without a clip layout): the frame is kept whole (official: raises).
5. ``ratio = 1``: the clip whole, an odd last frame included (the official ``k = 0`` would still drop it).
6. The decode span is every video token of the prompt, wherever it sits: the official span is
   ``[image_token_start_index, + image_token_length)`` with the start hard-coded to 14 (the length of
   OneVision's ``qwen_1_5`` system prompt: the first video token) and ``image_token_length`` set to the TTM
   length MINUS ONE (before the video's newline is appended), so the official span misses the last video token,
   which is then always attended, and picks ``int((N - 1)(1 - p))`` of the other ``N - 1``; here the top
   ``int(N (1 - p))`` of all ``N``. Text inside the span (Qwen3-VL's timestamps, InternVL's frame labels) is
   text: always attended.
7. Per sample: each batch entry compares and selects on its own (official: batch 1, ``attn[0]`` and one
   ``kv_cache`` for the batch).
8. State per generation: the official ``DycokeConfigs.attention_score`` lives on the model and is never reset,
   so a video's first decode step is compared with the previous video's last step (and re-selects only if that
   cosine is below 0.9; videos of other lengths would raise); here every generation starts afresh (step 0 always
   selects), so a sample's answer does not depend on the one before.
9. A sample with several videos is one clip (frames in sequence order); the official code handles one video.

Defined on video clips only (scope ``clip``, its only scope): a sample with an image view is refused in one
line. Decode FLOPs are counted from the prefill layouts (the framework's rule), so the decode stage's savings
do not show in FLOPs reports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..pruner import (
    DecodePlan,
    DecodeState,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    register_pruner,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

STABLE = ("full", "previous")
ODD_FRAME = ("drop", "keep")
WHOLE, DROP = "whole", "drop"


def ttm_plan(t: int, odd_frame: str = "drop") -> list[tuple[str, int | None]]:
    """What the official TTM does with each frame of a ``t``-frame clip, in frame order:
    ``("whole", None)``, ``("drop", None)``, ``("pair", i)`` (compared with frame ``i`` on normalised tokens)
    or ``("window", i)`` (frame ``i + 2`` compared with frame ``i``, plain cosine)."""
    plan: list[tuple[str, int | None]] = [(WHOLE, None)] * t
    for i in range(0, t - 1, 2):
        plan[i + 1] = ("pair", i)
    for i in range(0, t - 4, 4):
        plan[i + 2] = ("window", i)
    if t % 2 == 1 and t > 1 and odd_frame == "drop":
        plan[t - 1] = (DROP, None)
    return plan


def frame_similarity(x: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """``[..., n]`` cosine of each token of ``x`` ``[..., n, D]`` with the same position of ``ref`` (float32):
    ``"pair"`` on L2-normalised tokens (official: ``normalize`` then ``cosine_similarity``), ``"window"`` plain."""
    x, ref = x.float(), ref.float()
    if kind == "pair":
        x, ref = F.normalize(x, p=2, dim=-1), F.normalize(ref, p=2, dim=-1)
    return F.cosine_similarity(x, ref, dim=-1)


@register_pruner("dycoke")
class DyCokePruner(TokenPruner):
    """DyCoke: frames merged with the previous ones before the LLM, then per decode step the top video tokens."""

    stage = Stage.PRE_LLM
    extra_stages = (Stage.DECODE,)
    quantised = True  # int((1 - k) * n) per compared frame, whole frames: the count follows (T, n)
    adaptive = True  # ... which num_kept(N, grid) is not told: runs report the count, num_kept is the bound N
    views = "global"
    scopes = ("clip",)  # frames against earlier frames: the whole clip at once
    clip_inputs = True
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.3, p: float = 0.8, layer: int = 3, threshold: float = 0.9,
                 stable: str = "full", odd_frame: str = "drop"):
        self.ratio = validate_ratio(ratio)
        self.p = validate_float(p, "p", 0.0, 1.0)
        self.layer = validate_int(layer, "layer", minimum=1)
        self.threshold = validate_float(threshold, "threshold")
        self.stable = validate_choice(stable, "stable", STABLE)
        self.odd_frame = validate_choice(odd_frame, "odd_frame", ODD_FRAME)

    @property
    def k(self) -> float:
        """DyCoke's ``dycoke_k``: ``1 - ratio`` (rounded to 12 places, so ``ratio=0.3`` gives the official 0.7)."""
        return round(1.0 - self.ratio, 12)

    def frame_keep(self, n: int) -> int:
        """Tokens a compared frame of ``n`` keeps: ``int((1 - k) * n)``, the official float arithmetic."""
        return n if self.ratio >= 1.0 else int((1 - self.k) * n)

    def clip_count(self, t: int, n: int) -> int:
        """Tokens TTM keeps of a clip of ``t`` frames of ``n`` tokens."""
        if self.ratio >= 1.0:
            return t * n
        sizes = {WHOLE: n, DROP: 0}
        return sum(sizes.get(kind, self.frame_keep(n)) for kind, _ in ttm_plan(t, self.odd_frame))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """``n_tokens``: the bound; an input of one frame is kept whole (a clip keeps :meth:`clip_count`)."""
        return n_tokens

    def _frames(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, T, n, D]``: the clip frame by frame (one frame for inputs without a clip layout)."""
        if inputs.token_views is None:
            return inputs.tokens[:, None]
        if inputs.view_times is not None and bool(torch.isnan(inputs.view_times).any()):
            raise OptionError("dycoke merges a video's frames and this sample has image views (no frame times): run "
                              "it on video samples, or use an image method for images")
        try:
            return inputs.clip_tokens()
        except ValueError as exc:
            raise OptionError(f"dycoke needs frames of one grid: {exc}") from None

    def select(self, inputs: PruningInputs) -> Reduction:
        """Stage 1, TTM (see the module docstring)."""
        x = self._frames(inputs)
        b, t, n, _ = x.shape
        dev = inputs.tokens.device
        if self.ratio >= 1.0:
            return Reduction(indices=torch.arange(t * n, device=dev).expand(b, -1))
        m = self.frame_keep(n)
        base = torch.arange(n, device=dev).expand(b, -1)
        parts, scores = [], torch.full((b, t, n), 2.0, device=dev)  # score: 1 - cosine (whole frames: 2)
        for j, (kind, ref) in enumerate(ttm_plan(t, self.odd_frame)):
            if kind == WHOLE:
                parts.append(base + j * n)
            elif kind == DROP:
                scores[:, j] = 0.0
            else:
                sim = frame_similarity(x[:, j], x[:, ref], kind)  # [B, n]
                least = torch.sort(sim, dim=1, stable=True).indices[:, :m]  # ties: the lower index
                parts.append(least.sort(dim=1).values + j * n)
                scores[:, j] = 1.0 - sim
        return Reduction(indices=torch.cat(parts, 1), scores=scores.flatten(1))

    # -- decoding ------------------------------------------------------------------------------
    def decode_plan(self, n_layers: int) -> DecodePlan:
        """Stage 2: from layer ``layer`` on, each decode step attends to what :meth:`decode_select` picks."""
        return DecodePlan(select_layer=self.layer)

    def decode_select(self, state: DecodeState) -> torch.Tensor:
        """``[B, K]``: every non-video entry and, where layer ``L - 1``'s video attention moved (cosine with the
        previous step's ``< threshold``; always at step 0), the top ``int(N * (1 - p))`` video entries by it;
        elsewhere every entry (``stable="full"``) or the previous selection (``"previous"``). No host sync."""
        attn = state.attention.float()
        visual = state.visual & state.mask
        b, k = attn.shape
        memory = state.memory
        current = attn.masked_fill(~visual, 0.0)  # the video span's attention (zeros elsewhere)
        previous = memory.get("attention")
        if previous is None:  # official: similarity = 0 at the first comparison
            moved = torch.ones(b, dtype=torch.bool, device=attn.device)
        else:
            cos = F.cosine_similarity(current[:, :previous.shape[1]], previous, dim=1)
            moved = cos < self.threshold
        n_video = visual.sum(1)
        keep = torch.floor(n_video.double() * (1 - self.p)).long()  # int(img_len * (1 - p)), in float64
        order = torch.sort(attn.masked_fill(~visual, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=attn.device).expand(b, -1))
        fresh = ~visual | (rank < keep[:, None])
        if self.stable == "previous" and previous is not None:
            last = memory["selection"]
            held = torch.cat([last, torch.ones(b, k - last.shape[1], dtype=torch.bool, device=attn.device)], 1)
        else:
            held = torch.ones_like(fresh)
        selection = torch.where(moved[:, None], fresh, held)
        memory.update(attention=current, selection=selection)
        memory.setdefault("moved", []).append(moved)
        return selection
