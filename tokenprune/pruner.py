"""The TokenPruner interface: what a pruner sees, what it must return, and how it is created.

A pruner is pure, batched tensor code with no model knowledge. A model adapter builds a
:class:`PruningInputs` (visual tokens, their patch grid and whatever scores the pruner asked for in
:attr:`TokenPruner.needs`), calls the pruner, and applies the :class:`Reduction` it returns.

Shapes use ``B`` for batch (one entry per image view), ``N = h * w`` for visual tokens as the LLM
sees them in raster order, ``D`` for their width, ``P = N * patch_merge`` for vision-encoder
patches and ``Q`` for LLM query rows.
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Callable, ClassVar, Hashable, Literal, Sequence

import torch
import yaml

from .errors import OptionError
from .in_vision import VisionHook, VisionReduction, VisionState  # noqa: F401  (the in-vision contract)
from .registry import Registry


class Stage(str, Enum):
    """Where a pruner acts: on the visual tokens before the LLM, inside the LLM at a layer, inside
    the vision encoder between its blocks (:mod:`tokenprune.in_vision`), or while decoding (on the
    KV cache after prefill, or on what each generated token attends to: :class:`DecodePlan`).

    A pruner has one primary :attr:`TokenPruner.stage`; a multi-stage method (MustDrop: in the vision
    tower, in the LLM at prefill and on the decode cache) lists the others in
    :attr:`TokenPruner.extra_stages`, and adapters ask :meth:`TokenPruner.acts_in`.
    """

    PRE_LLM = "pre_llm"
    IN_LLM = "in_llm"
    IN_VISION = "in_vision"
    DECODE = "decode"


QueryRows = Literal["last", "all", "text", "chosen"]
SCOPES = ("frame", "clip")


@dataclass(frozen=True)
class LLMStage:
    """One prune point of an in-LLM pruner, and what it scores with there.

    Attributes:
        layer: 0-based decoder layer that first sees the reduced sequence (``>= 1``): the tokens
            dropped here are gone from this layer on (hidden states, positions, KV cache).
        attention: ``"none"``; ``"previous"`` -- head-averaged attention of layer ``layer - 1``,
            recorded while that layer runs (FastV, SparseVLM); ``"input"`` -- the attention that
            layer ``layer`` would compute on the unreduced sequence, from its own input norm, q/k
            projections and rotary embedding (PyramidDrop). Either way only the query rows below
            are computed, and every other layer stays on its fast kernel.
        queries: which query rows: ``"last"`` (the last prompt token), ``"all"`` (every token),
            ``"text"`` (the text tokens after the image), ``"chosen"`` (those text tokens that
            :meth:`TokenPruner.choose_queries` picked once on the layer-0 embeddings, e.g.
            SparseVLM's raters).
        keys: ``True`` for the post-rotary keys of layer ``layer - 1`` (DART).
        previous_hidden: ``True`` for the hidden states that entered layer ``layer - 1``
            (``PruningInputs.previous_tokens``), so that ``tokens - previous_tokens`` is what that
            layer changed (V2Drop's token variation).
        heads: how the attention's heads become one map: ``"mean"`` (every method so far) or ``"max"``
            (the largest probability any head gives; PruneVid).
        qkv: ``True`` for layer ``layer - 1``'s own post-rotary query rows (of ``queries``), keys and values,
            per head (``PruningInputs.llm_queries`` / ``llm_values`` / ``text_values``, and ``llm_keys``),
            recorded while that layer runs, for a method that scores with its own attention variant
            (FlowCut's relation and semantic scores, softmaxes over the visual keys only).
        rotary: ``False`` (with ``attention="previous"``): the probabilities of layer ``layer - 1``'s queries
            and keys *before* the rotary embedding, over every real key of the sequence (no causal mask), as
            PruneVid's official ``attn_weights_wo_pos``; computed from the hidden states that entered that
            layer with its own input norm and q/k projections (and q/k norms where it has them).
        after_attention: ``True``: the stage acts *inside* layer ``layer - 1``, between its attention block
            and its MLP block (FrameFusion, whose official decoder layer merges and prunes the residual
            stream right after ``hidden_states = residual + attn_output``). ``tokens`` are then that
            post-attention residual stream; layer ``layer - 1``'s attention and KV cache keep the unreduced
            sequence, its MLP and layers ``layer ..`` see the reduced one (the MLP acting per token, a cut there
            equals a cut before layer ``layer``; an in-place merge does not). Needs decoder layers of the
            pre-norm ``input_layernorm -> self_attn -> post_attention_layernorm -> mlp`` shape.

    ``layer = 0`` (a stage before the first decoder layer, on the input embeddings) is allowed for a stage
    that reads nothing of the decoder (``attention="none"``, no keys, no previous hidden states, not
    ``after_attention``): FrameFusion's merge before layer 0's attention.
    """

    layer: int
    attention: Literal["none", "previous", "input"] = "none"
    queries: QueryRows = "last"
    keys: bool = False
    previous_hidden: bool = False
    heads: Literal["mean", "max"] = "mean"
    rotary: bool = True
    qkv: bool = False
    after_attention: bool = False


DecodePositions = Literal["continue", "cache_length", "final"]


@dataclass(frozen=True)
class DecodePlan:
    """What a pruner does while decoding (:attr:`Stage.DECODE`), fixed once after prefill.

    Prefill leaves every decoder layer a cached layout: the tokens it processed, in order (an in-LLM
    stage shortens the layout of every layer from its ``layer`` on). A plan may change three things for
    the generated tokens, and the no-cache reference (``generate(use_cache=False)``, which re-runs the
    whole sequence every step) applies the same rule as attention masks and position ids, so cached
    and uncached decoding agree.

    Attributes:
        cut_layers: decoder layers whose KV cache is cut, right after prefill, to the tokens that reach
            the last decoder layer (the final set of the in-LLM stages): a token a later stage dropped
            leaves these layers' caches too, and generated tokens never attend to it there (MustDrop's
            "output-aware cache": layers 2..14 of LLaVA-1.5). Layers not named keep what prefill cached.
        positions: the position id of a generated token at each layer: ``"continue"`` -- one past the
            largest position of its layer's cached layout, then +1 per step (what decoding does without
            a plan); ``"cache_length"`` -- the number of (real) tokens that layer's cache holds when the
            token arrives (MustDrop's attention reads ``past_key_value.get_usable_length(...)``: layers
            with their full cache continue from the full length, cut layers from the cut length);
            ``"final"`` -- at every layer, the position the last layer's layout continues from (FlowCut's
            LLaVA-NeXT port shifts every layer's decode positions by the tokens its layer-1 cut removed,
            ``position_ids -= visual_token_num - target_num``, the early layers' full caches included).
        select_layer: ``None``, or a layer ``L >= 1`` from which on (layers ``L..n-1``) each decode step
            attends only to the cache entries :meth:`TokenPruner.decode_select` picks (DyCoke's
            decode-time pruning); the cache itself keeps everything. The pruner reads the head-averaged
            attention of layer ``L - 1``'s query row of the new token. Layers ``L - 1 .. n - 1`` must
            share one cached layout (no in-LLM stage and no cut from ``L`` on).
    """

    cut_layers: tuple[int, ...] = ()
    positions: DecodePositions = "continue"
    select_layer: int | None = None


@dataclass
class DecodeState:
    """What :meth:`TokenPruner.decode_select` sees at one decode step, for ``B`` samples whose layers
    ``select_layer..`` share a cached layout of ``K`` entries (the prompt's layout, then every
    generated token so far, the new one last).

    Attributes:
        attention: ``[B, K]`` float32, layer ``select_layer - 1``'s attention probabilities from the new
            token's query to each cache entry, averaged over heads (zero at padding).
        visual: ``[B, K]`` bool, the entries that are visual tokens of the prompt.
        mask: ``[B, K]`` bool, the real entries (``False``: left padding).
        step: the decode step (``0``: the first token fed back after prefill).
        layer: ``select_layer``.
        sample_ids: one stable id per sample.
        memory: a dict the pruner keeps from step to step of one generation (the previous step's
            attention, its last selection); new for every ``generate`` / reference run.
    """

    attention: torch.Tensor
    visual: torch.Tensor
    mask: torch.Tensor
    step: int
    layer: int
    sample_ids: Sequence[Hashable] | None = None
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerNeeds:
    """What a pruner asks the adapter to compute; everything else is left out, for speed.

    Attributes:
        vision_attention_layer: vision-encoder layer (Python-style index, ``-2`` = penultimate)
            whose head-averaged attention probabilities the pruner needs, or ``None``.
        vision_attention_rows: ``"all"`` (the whole map) or ``"prefix"`` (only the rows of the
            CLS/prefix tokens, e.g. for CLS-attention scoring), so the adapter can skip the rest.
        vision_attention_layer2: a second vision layer (Python-style index) whose attention the pruner
            needs too, with the same rows, handed as ``PruningInputs.vision_attention2`` (and
            ``vision_received2``) in the very layout of ``vision_attention`` (HiPrune's object layer,
            HiRED's layer 0). The adapter encodes the views once more for it (one more tower pass).
        vision_features: pre-LLM, the features the projector reads (``PruningInputs.vision_features``),
            and those of the CLS/prefix tokens where the projector can take them.
        vision_keys: pre-LLM, the keys of vision layer ``vision_attention_layer``, averaged over heads
            (``PruningInputs.vision_keys``).
        vision_qk: pre-LLM, the raw projections of vision layer ``vision_attention_layer`` with every
            head concatenated (``PruningInputs.vision_queries`` of the prefix rows and
            ``PruningInputs.vision_keys_full``), for methods that score with their own attention
            (PruMerge's single 1024-wide head).
        text: pre-LLM, the LLM's input embeddings of the prompt text after the image
            (``PruningInputs.text_tokens``) and the prompts as given (``PruningInputs.prompts``),
            for instruction-conditioned methods.
        in_vision: the in-vision pruner the tower must run block by block for (set by the adapter,
            :meth:`~tokenprune.adapters.base.PrunableLVLM.vision_needs`; two such pruners never share
            a vision pass).
        llm_stages: the in-LLM schedule, one :class:`LLMStage` per prune point, in layer order.
        llm_attention_layer: shorthand for a one-stage schedule (kept for plugins written
            against it): attention of this 0-based decoder layer, pruning from the next one.
        llm_attention_queries: the query rows of that shorthand, ``"last"`` or ``"all"``.
    """

    vision_attention_layer: int | None = None
    vision_attention_rows: Literal["all", "prefix"] = "all"
    vision_attention_layer2: int | None = None
    vision_features: bool = False
    vision_keys: bool = False
    vision_qk: bool = False
    text: bool = False
    in_vision: "TokenPruner | None" = None
    llm_stages: tuple[LLMStage, ...] = ()
    llm_attention_layer: int | None = None
    llm_attention_queries: Literal["last", "all"] = "last"

    def schedule(self) -> tuple[LLMStage, ...]:
        """The in-LLM prune points, in layer order (the shorthand turned into one stage)."""
        if self.llm_stages:
            return self.llm_stages
        if self.llm_attention_layer is not None:
            return (LLMStage(layer=self.llm_attention_layer + 1, attention="previous", queries=self.llm_attention_queries),)
        return ()

    def describe(self) -> dict[str, object]:
        """Only the fields that matter: what is asked for, and which rows of it."""
        out: dict[str, object] = {}
        if self.vision_attention_layer is not None:
            out.update(vision_attention_layer=self.vision_attention_layer, vision_attention_rows=self.vision_attention_rows)
        if self.vision_attention_layer2 is not None:
            out.update(vision_attention_layer2=self.vision_attention_layer2)
        if self.vision_features:
            out.update(vision_features=True)
        if self.vision_keys:
            out.update(vision_keys=True)
        if self.vision_qk:
            out.update(vision_qk=True)
        if self.text:
            out.update(text=True)
        if self.in_vision is not None:
            out.update(in_vision=repr(self.in_vision))
        for i, st in enumerate(self.schedule()):
            kind = st.attention + ("" if st.rotary else " un-rotated, unmasked") + ("" if st.heads == "mean" else f", {st.heads} over heads")
            what = [f"{kind} attention ({st.queries} rows)"] if st.attention != "none" else []
            what += ["keys"] if st.keys else []
            what += [f"hidden states entering layer {st.layer - 1}"] if st.previous_hidden else []
            where = f"inside layer {st.layer - 1}, after its attention" if st.after_attention else f"before layer {st.layer}"
            out[f"llm_stage_{i}"] = f"{where}: hidden states" + "".join(f", {w}" for w in what)
        return out


@dataclass
class PruningInputs:
    """Everything a pruner may look at, for a batch of ``B`` image views (pre-LLM) or samples (in-LLM).

    Attributes:
        tokens: ``[B, N, D]`` visual tokens: after the projector for pre-LLM pruners; for in-LLM
            pruners, the hidden states of the visual tokens entering the pruned layer (what
            ``output_hidden_states[layer]`` holds at their positions), in sequence order.
        grid: ``(h, w)`` with ``h * w == N``; token ``i`` sits at row ``i // w``, column ``i % w``.
            In-LLM: the image's patch grid at the first stage of a single-view sample; ``(1, N)``
            for multi-view samples (see ``view_grids``) and after an earlier stage.
        sample_ids: one stable id per batch entry (dataset id + view); seeds random pruners so a
            sample gets the same tokens whatever batch it is in.
        vision_attention: ``[B, T, T]`` head-averaged attention probabilities of the requested
            vision layer over ``T = vision_prefix + P`` tokens (rows ``[:vision_prefix]`` only,
            shape ``[B, vision_prefix, T]``, when the pruner asked for ``"prefix"`` rows).
        vision_prefix: how many non-patch tokens (CLS, registers) lead the vision sequence.
        patch_merge: vision patches per LLM token; patch ``p`` belongs to token ``p // patch_merge``
            (adapters put patches in that order, e.g. Qwen2-VL's 2x2 merge groups).
        vision_features: ``[B, N, Dv]`` pre-LLM, what the projector reads for each token (LLaVA: the
            vision layer's patch features; InternVL: the pixel-shuffled features; Qwen2-VL / 2.5-VL,
            whose merger is the projector inside the tower: the merger outputs, i.e. ``tokens``).
        vision_prefix_features: ``[B, vision_prefix, Dv]`` the CLS/prefix tokens' features at the same
            layer, where the projector can take them (LLaVA-1.5, LLaVA-NeXT's base view); else ``None``.
        vision_keys: ``[B, vision_prefix + N, d]`` keys of the vision layer, averaged over heads; for
            merged patches (``patch_merge > 1``) averaged over each token's patches.
        vision_queries: ``[B, vision_prefix + N, H * d]`` with ``needs.vision_qk``, the query projections of
            every row of the vision layer (bias included, before the ``d ** -0.5`` scale), heads concatenated.
        vision_keys_full: ``[B, vision_prefix + N, H * d]`` with ``needs.vision_qk``, the layer's key
            projections (bias included), heads concatenated; for merged patches averaged per token.
        vision_received: ``[B, N]`` where the adapter pools patches into tokens after the tower
            (LLaVA-OneVision / NeXT-Video video frames) and all rows of vision attention were asked:
            each patch's attention received, averaged over every query of the unpooled map, pooled
            as the tokens are (``None`` elsewhere: there it is ``vision_attention``'s column mean).
        vision_attention2, vision_received2: the same as ``vision_attention`` / ``vision_received``, of
            vision layer ``needs.vision_attention_layer2`` (``None`` unless asked).
        crop_attention: ``[B, C, R, T]`` for LLaVA-NeXT's high-res view: its ``C`` crops' own maps of the
            vision layer (``R`` = the rows asked), before stitching and unpadding: every cell of a crop,
            padded ones included (``vision_attention`` composes the unpadded cells only).
        crop_layout: ``[B, N]`` long, with ``crop_attention``: each token's crop and cell in it,
            ``crop * s^2 + cell`` (``s^2`` patches per crop, cell in the crop's raster order).
        view_inputs: pre-LLM at scope ``"clip"`` for a :attr:`TokenPruner.clip_inputs` pruner that sets
            ``view_inputs = True``: per batch entry, each of its prunable views' own inputs (a batch of 1
            each: tokens, grid, maps of both layers, crop layout) in the clip's view order, so that a rule
            coupling views of different shapes (HiRED: LLaVA-NeXT's base view sets each crop's budget)
            sees every one of them.
        llm_attention: ``[B, Q, N]`` head-averaged attention from ``Q`` query rows to the visual
            tokens, at the stage's layer (see :class:`LLMStage`).
        llm_query_mask: ``[B, Q]`` bool, ``True`` for real query rows (``False``: padding).
        stage: in-LLM, the index of the current prune point in the pruner's schedule.
        layer: in-LLM, the 0-based decoder layer that first sees this stage's reduction.
        num_layers: in-LLM, how many layers the decoder has.
        num_original: in-LLM, the visual tokens the sample had before any stage (``N`` at stage 0).
        view_grids: in-LLM at the first stage, the grid of each image view in sequence order
            (LLaVA-NeXT: base image, then the high-res crops stitched and unpadded, newlines left
            out; InternVL: tiles then thumbnail); ``tokens`` is their concatenation.
        llm_keys: ``[B, N, H_kv * d]`` post-rotary keys of layer ``layer - 1`` at the visual tokens,
            heads flattened, if the stage asked for ``keys``.
        previous_tokens: ``[B, N, D]`` in-LLM, if the stage asked for ``previous_hidden``: the hidden
            states of the same visual tokens as they entered layer ``layer - 1`` (what
            ``output_hidden_states[layer - 1]`` holds there; on Qwen3-VL ``tokens`` also carries the
            DeepStack features added after that layer), in the same order as ``tokens``.
        text_tokens: ``[B, T, D]`` the text tokens after the image (the prompt's instruction and the
            assistant prefix), padding first: in-LLM their hidden states, pre-LLM (``needs.text``)
            their input embeddings; ``text_mask`` ``[B, T]`` marks the real ones, ``text_keys``
            ``[B, T, H_kv * d]`` holds their keys when an in-LLM stage asked for ``keys``.
        final_norm: the decoder's final norm (a callable on ``[..., D]``), for methods that compare
            normalised hidden states (DART).
        prompts: pre-LLM with ``needs.text``, each batch entry's prompt as given to ``generate``.
        text_ids: ``[B, T]`` pre-LLM with ``needs.text``, the token ids of ``text_tokens``.
        token_views: ``[B, N]`` pre-LLM at scope ``"clip"``, the index (among the sample's prunable
            views, sequence order) of the view each token comes from -- for a video, the frame (Qwen:
            the temporal patch); ``view_grids`` then holds those views' grids.
        view_times: ``[B, V]`` pre-LLM at scope ``"clip"``, each view's time in seconds (a video
            frame's; NaN for an image).
        view_features: ``[B, V, D]`` pre-LLM at scope ``"clip"``, one global feature per view: the mean
            of its tokens (the models tokenprune supports keep no pooling head in their checkpoints).
        view_attention: ``[B, V, T, T]`` pre-LLM at scope ``"clip"`` for a pruner with
            :attr:`TokenPruner.clip_inputs` that needs vision attention: each view's own map, as
            ``vision_attention`` is for one view (towers never attend across frames).
        view_scores: ``[B, N]`` pre-LLM at scope ``"clip"`` for a :attr:`TokenPruner.clip_inputs` pruner
            whose :meth:`TokenPruner.view_scores` scores a view: each token's score, computed on its own
            view's inputs (views of any shapes: LLaVA-NeXT's base and high-res views), given instead of
            ``view_attention``.
        protected: ``[B, N]`` bool, in-LLM: the visual tokens an earlier stage of the same pruner marked
            to be kept by every later stage (MustDrop's key set, chosen inside the vision tower with
            :meth:`~tokenprune.in_vision.VisionReduction.mark`), carried with the tokens through
            every cut; ``None`` when nothing was marked. The pruner itself decides what the mark means.
        seq_index: ``[B, N]`` long, in-LLM: each visual token's index in its sample's input sequence,
            padding not counted (``0`` = the sample's first real token): the "absolute position" the
            official batch-1 codes index with (DART's ``image_token_start_index + i`` for the ``i``-th
            image token). At a pruner's first stage it equals the 1-D position id of the same prompt
            unpadded (not Qwen's M-RoPE ids, which do not count tokens). Built as the token's column in
            the forward's input minus that of the sample's first real token: exact at a pruner's first
            stage; at a later one too while that first token survives (only a prompt opening with an
            image token can lose it), and a token an earlier stage merged has no index of its own (its
            value is past the input's length). ``None`` pre-LLM.
        text_seq_index: ``[B, T]`` long, in-LLM: the same index for ``text_tokens``; ``-1`` where
            ``text_mask`` is ``False``. (Not :attr:`Reduction.positions`, which names position ids.)
        llm_queries: ``[B, Q, H, d]`` in-LLM with ``LLMStage.qkv``: layer ``layer - 1``'s post-rotary query
            rows (the stage's ``queries``), unscaled; ``llm_query_mask`` marks the real ones.
        llm_values: ``[B, N, H_kv, d]`` with ``LLMStage.qkv``: that layer's values at the visual tokens
            (``llm_keys`` then holds its post-rotary keys, ``[B, N, H_kv * d]``); ``text_values``
            ``[B, T, H_kv, d]`` the same for ``text_tokens``.
        num_placeholders: in-LLM, the visual placeholders the sample's prompt held before any cut -- the
            image's own token count, which an in-vision stage may already have cut below
            ``num_original`` (the tokens the LLM received).
        memory: in-LLM, one ``dict`` per batch entry that the decoder carries from stage to stage of one
            prefill (new for every forward), for methods whose later stages depend on what earlier ones
            decided (FrameFusion's per-layer merge ratios, each kept token's patch). ``None`` outside the
            decoder (a bare call): a pruner that needs it starts afresh.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    sample_ids: Sequence[Hashable] | None = None
    vision_attention: torch.Tensor | None = None
    vision_prefix: int = 0
    patch_merge: int = 1
    vision_features: torch.Tensor | None = None
    vision_prefix_features: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    vision_queries: torch.Tensor | None = None
    vision_keys_full: torch.Tensor | None = None
    vision_received: torch.Tensor | None = None
    vision_attention2: torch.Tensor | None = None
    vision_received2: torch.Tensor | None = None
    crop_attention: torch.Tensor | None = None
    crop_layout: torch.Tensor | None = None
    view_inputs: Sequence[Sequence["PruningInputs"]] | None = None
    llm_attention: torch.Tensor | None = None
    llm_query_mask: torch.Tensor | None = None
    stage: int = 0
    layer: int = 0
    num_layers: int = 0
    num_original: int = 0
    view_grids: tuple[tuple[int, int], ...] | None = None
    llm_keys: torch.Tensor | None = None
    previous_tokens: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompts: Sequence[str] | None = None
    text_ids: torch.Tensor | None = None
    token_views: torch.Tensor | None = None
    view_times: torch.Tensor | None = None
    view_features: torch.Tensor | None = None
    view_attention: torch.Tensor | None = None
    view_scores: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    seq_index: torch.Tensor | None = None
    text_seq_index: torch.Tensor | None = None
    llm_queries: torch.Tensor | None = None
    llm_values: torch.Tensor | None = None
    text_values: torch.Tensor | None = None
    num_placeholders: int = 0
    memory: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got shape {tuple(self.tokens.shape)}")
        h, w = self.grid
        if h * w != self.tokens.shape[1]:
            raise ValueError(f"grid {h}x{w} does not match N={self.tokens.shape[1]} tokens")
        if not self.num_original:
            self.num_original = self.tokens.shape[1]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def clip_tokens(self) -> torch.Tensor:
        """``[B, V, h*w, D]``: at scope ``"clip"``, the tokens frame by frame (every view of one grid).

        Raises:
            ValueError: the views' grids differ (a multi-image prompt of several sizes).
        """
        grids = self.view_grids or (self.grid,)
        if len(set(grids)) != 1:
            raise ValueError(f"the views have different grids {sorted(set(grids))}: no [B, V, h*w, D] layout")
        return self.tokens.unflatten(1, (len(grids), -1))

    def select(self, index: int) -> "PruningInputs":
        """The inputs of batch entry ``index`` alone (batch of 1)."""
        sl = slice(index, index + 1)
        batched = {f.name for f in fields(self) if torch.is_tensor(getattr(self, f.name))}
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update({name: out[name][sl] for name in batched})
        if self.sample_ids is not None:
            out["sample_ids"] = [self.sample_ids[index]]
        if self.prompts is not None:
            out["prompts"] = [self.prompts[index]]
        if self.view_inputs is not None:
            out["view_inputs"] = [self.view_inputs[index]]
        if self.memory is not None:
            out["memory"] = [self.memory[index]]
        return PruningInputs(**out)


@dataclass
class Reduction:
    """What a pruner returns: which visual tokens the LLM gets.

    Attributes:
        indices: ``[B, k]`` long, strictly increasing per row. For selecting pruners, the kept
            token indices into ``N``; for merging pruners, the source token that stands for each
            new token (its position id under the ``keep`` position policy).
        tokens: ``[B, k, D]`` new tokens for merging pruners; ``None`` means "gather ``indices``".
        token_weights: optional with ``tokens``, ``[B, k, N]``: ``tokens[b] == token_weights[b] @
            inputs.tokens[b]``. Adapters whose models carry per-token side features (Qwen3-VL's
            DeepStack levels) merge those with the same weights.
        grid: ``(h', w')`` if the result is still a full rectangular grid (pooling, whole rows),
            else ``None``; adapters that renumber positions 2-D (M-RoPE) use it.
        merge_weights: in-LLM only, ``[B, M, N]``: ``M`` new tokens placed right after the kept
            visual tokens, each the weighted sum ``merge_weights[b, m] @ tokens[b]`` of the
            stage's input tokens (SparseVLM's recycled tokens). A row of zeros is padding (a
            sample with fewer new tokens). Weights, not tokens, so that the no-cache reference
            and the pictures can replay and attribute the merge.
        feature_weights: pre-LLM merges before the projector, ``[B, k, prefix + N]``: token ``i`` is
            ``projector(feature_weights[b, i] @ [vision_prefix_features; vision_features][b])``
            (VisionZip keeps the CLS token and merges contextual tokens in the vision encoder's space).
            ``indices`` are then the slots the ``k`` tokens take in the image span, in order.
        positions: ``[B, k]`` token indices whose position ids the kept tokens take under the
            ``keep`` policy (default: ``indices``), for merging pruners whose output order is not
            the tokens' original order.
        scores: optional ``[B, N]``, the per-token score the method ranked by (higher = more
            likely kept): FoPru's significance, CLS attention, FastV's attention at layer K-1, ...
            Never used to prune; ``tokenprune show`` draws it as the method's heatmap.
        merge_into: in-LLM only, ``[B, N]`` long: merges *in place* (FrameFusion, HoliTom): for each input
            token the slot ``j`` (``0..k-1``, into ``indices``) of the kept token it is merged into, or
            ``-1``. A slot that some token names becomes ``sum(merge_into_weights[b, i] * tokens[b, i])``
            over the tokens ``i`` naming it (the kept token itself among them when it names its own slot);
            it keeps its place in the sequence and its position id, so causal order is untouched (unlike
            ``merge_weights``, which appends). A kept token no one names stays as it was. One slot per
            source token: a sparse ``[B, k, N]`` map, which the no-cache reference replays.
        merge_into_weights: ``[B, N]`` float with ``merge_into``: each token's weight in its slot's sum
            (ignored where ``merge_into`` is ``-1``).
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    merge_weights: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    feature_weights: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    merge_into: torch.Tensor | None = None
    merge_into_weights: torch.Tensor | None = None

    @property
    def num_kept(self) -> int:
        return self.indices.shape[1]

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reduced tokens ``[B, k (+ M), D]`` from the full ``[B, N, D]`` ones."""
        out = self.tokens if self.tokens is not None else gather_tokens(tokens, self.indices)
        if self.merge_into is not None:
            out = merge_in_place(out, tokens, self.merge_into, self.merge_into_weights)
        if self.merge_weights is not None:
            out = torch.cat([out, self.merge_weights.to(tokens.dtype) @ tokens], dim=1)
        return out


def merge_in_place(kept: torch.Tensor, tokens: torch.Tensor, into: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:attr:`Reduction.merge_into` applied: ``kept`` ``[B, k, D]`` with every slot that some token names
    replaced by the weighted sum of the ``tokens`` ``[B, N, D]`` naming it (``into`` ``[B, N]``: slot or ``-1``;
    ``weights`` ``[B, N]``). Sums in float32, returned in ``kept``'s dtype."""
    b, k, d = kept.shape
    named = into >= 0
    slot = into.clamp_min(0)
    w = torch.where(named, weights.float(), 0.0)
    acc = torch.zeros(b, k, d, dtype=torch.float32, device=kept.device)
    acc.scatter_add_(1, slot[..., None].expand(-1, -1, d), tokens.float() * w[..., None])
    hit = torch.zeros(b, k, dtype=torch.int32, device=kept.device).scatter_add_(1, slot, named.int()) > 0
    return torch.where(hit[..., None], acc.to(kept.dtype), kept)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens[b, indices[b]]`` for every ``b``: ``[B, N, D]``, ``[B, k]`` -> ``[B, k, D]``."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def keep_count(ratio: float, n_tokens: int) -> int:
    """Tokens kept at retention ``ratio`` out of ``n_tokens``: ``max(1, round(ratio * n))``.

    Rounds half up (not Python's banker's rounding) so that counts are what a reader computes.
    """
    return max(1, min(n_tokens, math.floor(ratio * n_tokens + 0.5)))


def validate_ratio(value: Any, name: str = "ratio") -> float:
    """``value`` as a float in (0, 1]; anything else raises :class:`OptionError` saying what is allowed."""
    if isinstance(value, bool):
        raise OptionError(f"{name} must be a number in (0, 1], got {value!r}")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < ratio <= 1.0):  # also rejects NaN
        raise OptionError(f"{name} must be a number in (0, 1] (the share of visual tokens kept), got {value!r}")
    return ratio


def validate_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else an :class:`OptionError` listing them."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def validate_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (``>= minimum`` if given), else an :class:`OptionError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise OptionError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def validate_float(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float (in ``[low, high]`` where given), else an :class:`OptionError`."""
    if isinstance(value, bool):
        raise OptionError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and out < low) or (high is not None and out > high):
        raise OptionError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return out


def validate_layers(value: Any, name: str = "layers", minimum: int = 0) -> tuple[int, ...]:
    """``value`` (a list, tuple or ``"8,16,24"`` string) as a strictly increasing tuple of ints ``>= minimum``."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").strip("[]()").split(",") if v]
    try:
        layers = tuple(validate_int(int(v) if isinstance(v, str) else v, name, minimum) for v in value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a list of layer indices, e.g. 8,16,24; got {value!r}") from None
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
        raise OptionError(f"{name} must be a non-empty, strictly increasing list of layers, e.g. 8,16,24; got {value!r}")
    return layers


class TokenPruner(ABC):
    """Base class of every visual-token pruner.

    Subclasses take their options as keyword arguments of ``__init__`` and store each as an
    attribute of the same name (dataclasses do this for free), validate them there, and
    implement :meth:`select`. Register one with ``@register_pruner("name")``.

    Class attributes:
        name: the registry name (set on registration).
        stage: where the pruner acts first: :attr:`Stage.PRE_LLM`, :attr:`Stage.IN_LLM` or
            :attr:`Stage.IN_VISION`.
        extra_stages: the further stages of a multi-stage method, e.g. MustDrop's
            ``(Stage.IN_LLM, Stage.DECODE)`` after its in-vision stage: an in-vision pruner that also
            acts in the LLM gets its :attr:`needs`' ``llm_stages`` run with the tokens its tower left
            (positions as its own policy says from the first layer on); :attr:`Stage.DECODE` means
            :meth:`decode_plan` is applied after prefill. Adapters ask :meth:`acts_in`.
        quantised: ``True`` if the kept count is not ``keep_count(ratio, N)`` (e.g. whole rows);
            such a pruner overrides :meth:`num_kept` and says how it rounds in its docstring.
        position_policy: the method's own convention for the position ids of what it keeps,
            ``"keep"`` (original positions) or ``"compact"`` (renumbered without gaps, as the
            official LLaVA code of most methods does); ``generate(position_policy=...)`` and
            sweeps may override it for ablations.
        position_policy_mrope: the convention on M-RoPE models (Qwen2-VL / 2.5-VL), where the
            official ports of most pre-LLM methods keep the original positions; ``None``: as above.
        llm_position_policy: for a pruner acting before *and* inside the LLM, its convention at the in-LLM
            stages when it differs from the one its pre-LLM output is placed with (PruneVid: ``"compact"``
            before the LLM, ``"keep"`` at its layer-10 cut); ``None``: the same. A call's explicit
            ``position_policy`` applies to both.
        views: pre-LLM, the method's default :attr:`scope`: ``"per_view"`` (scope ``"frame"``) or
            ``"global"`` (scope ``"clip"``).
        scopes: the scopes the method is defined at (``("frame",)`` for methods whose rule needs a
            view's own grid or attention map beyond a ranking: row selection, spatial pooling,
            VisionZip's dominant/contextual split).
        adaptive: the method chooses its count per sample (LLaVA-Scissor's components): ``num_kept``
            is only an upper bound, ``ratio`` may mean nothing (the method's docstring says), each
            sample goes through :meth:`select` in a batch of its own, and reports count what was kept.
        image_by_image: in-vision, the rule couples the images of one tower pass (FlowCut's cut sizes are
            the batch's largest): the adapter runs the tower one image at a time, as the official
            evaluation (batch 1) does, so a batch gives what each image alone gives.
        clip_inputs: at scope ``"clip"``, :meth:`select` takes the whole clip in one call even when it
            needs vision attention (temporal methods): it gets each view's map in
            ``PruningInputs.view_attention`` beside the concatenated tokens, instead of being ranked
            view by view through :meth:`token_scores`. One that scores each view with
            :meth:`view_scores` gets those scores (``PruningInputs.view_scores``) instead of the maps.
        view_inputs: with :attr:`clip_inputs`, the clip call gets every view's own inputs
            (``PruningInputs.view_inputs``: maps of both layers, grids, LLaVA-NeXT's crop layout) instead of
            per-view scores or stacked maps, for a rule that couples views of different shapes (HiRED).

    Every pre-LLM pruner also takes ``scope`` (through :func:`create_pruner` or a spec,
    ``fopru_rank:scope=clip``), whether or not its ``__init__`` names it; see :attr:`scope`.
    """

    name: ClassVar[str] = "unregistered"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    extra_stages: ClassVar[tuple[Stage, ...]] = ()
    quantised: ClassVar[bool] = False
    position_policy: ClassVar[str] = "keep"
    position_policy_mrope: ClassVar[str | None] = None
    llm_position_policy: ClassVar[str | None] = None
    views: ClassVar[str] = "per_view"
    scopes: ClassVar[tuple[str, ...]] = SCOPES
    clip_inputs: ClassVar[bool] = False
    view_inputs: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    image_by_image: ClassVar[bool] = False
    ratio: float

    def acts_in(self, stage: Stage) -> bool:
        """Whether this pruner acts at ``stage`` (its :attr:`stage` or one of its :attr:`extra_stages`)."""
        return stage is self.stage or stage in self.extra_stages

    @property
    def uses_ratio(self) -> bool:
        """Whether ``ratio`` changes what this pruner keeps. ``False`` for adaptive methods whose count is
        the data's alone (LLaVA-Scissor's components, PruMerge's attention outliers): a sweep runs them
        once, not once per ratio, and places them at their measured count and FLOPs."""
        return True

    @property
    def needs(self) -> PrunerNeeds:
        """The scores this pruner needs from the adapter (default: none, tokens only)."""
        return PrunerNeeds()

    @property
    def scope(self) -> str:
        """What one budget covers, pre-LLM: ``"frame"`` -- each view on its own (a video frame, an
        image of a multi-image prompt, a LLaVA-NeXT crop, an InternVL tile), as per-frame methods do;
        ``"clip"`` -- all the prunable views of a sample as one set of tokens (a whole video, all
        images of the prompt), as LightCompress runs FastV and DivPrune on video. The default is
        the method's own (:attr:`views`); in-LLM pruners always see the whole sequence (``"clip"``)."""
        if self.stage is Stage.IN_LLM:
            return "clip"
        return self.__dict__.get("_scope") or ("clip" if self.views == "global" else "frame")

    def token_scores(self, inputs: PruningInputs) -> torch.Tensor | None:
        """``[B, N]`` per-token keep scores (higher first) if this pruner is a top-k ranking by a
        per-view score; ``None`` otherwise. Scope ``"clip"`` uses it for pruners whose scores need
        per-view inputs (vision attention): each view is scored on its own, and the clip keeps its
        top ``keep_count(ratio, N_clip)`` tokens across views."""
        return None

    def view_scores(self, inputs: PruningInputs) -> torch.Tensor | None:
        """For :attr:`clip_inputs` pruners: ``[B, N]`` per-token scores of one view from its own inputs
        (vision attention), or ``None``. At scope ``"clip"`` each view is scored on its own and
        :meth:`select` gets the clip's tokens with the scores concatenated (``PruningInputs.view_scores``),
        so views of different shapes can share one call (HoloV on LLaVA-NeXT's base and high-res views)."""
        return None

    @property
    def options(self) -> dict[str, Any]:
        """The resolved options, ``{parameter of __init__: current value}`` (and ``scope`` when set)."""
        params = inspect.signature(type(self)).parameters
        out = {p: getattr(self, p) for p in params if hasattr(self, p)}
        if "_scope" in self.__dict__ and "scope" not in out:
            out["scope"] = self.__dict__["_scope"]
        return out

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """How many tokens this pruner keeps out of ``n_tokens`` laid out as ``grid`` (in-LLM: at the
        first stage)."""
        return keep_count(self.ratio, n_tokens)

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        """The in-LLM prune points on a decoder of ``n_layers`` layers, in layer order. Default:
        ``needs.schedule()``, the same at every depth; a method whose official layers are fractions of
        the official model's depth (V2Drop) overrides it to scale them."""
        return self.needs.schedule()

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        """Visual tokens kept after each stage of the schedule (one entry for one-stage pruners;
        before any in-LLM merges), for ``n_tokens`` on a decoder of ``n_layers`` (0: unknown)."""
        return [self.num_kept(n_tokens, (1, n_tokens))]

    def default_position_policy(self, mrope: bool) -> str:
        """The method's own position convention on a model with (``mrope``) or without M-RoPE."""
        return (self.position_policy_mrope or self.position_policy) if mrope else self.position_policy

    def min_ratio(self, n_tokens: int, n_layers: int) -> float:
        """The smallest ``ratio`` this pruner can honour for ``n_tokens`` visual tokens on a decoder of
        ``n_layers`` layers (above 0 only for schedules whose early layers always see every token)."""
        return 0.0

    @abstractmethod
    def select(self, inputs: PruningInputs) -> Reduction:
        """Choose (or build) the visual tokens to keep for every batch entry of ``inputs``.

        In-LLM pruners are called once per stage of their schedule; ``inputs.stage`` says which.
        In-vision pruners are called at each of their :meth:`vision_hooks` with a
        :class:`~tokenprune.in_vision.VisionState` and return a
        :class:`~tokenprune.in_vision.VisionReduction` (or ``None``: nothing cut there).
        """

    def vision_hooks(self, n_blocks: int) -> tuple["VisionHook", ...]:
        """In-vision pruners: where in a tower that runs ``n_blocks`` blocks (through the block whose
        output the projector reads) the pruner acts, and what it reads there, in block order."""
        return ()

    def vision_view_target(self, patches: int, image_tokens: int, n_views: int) -> int:
        """In-vision pruners: patch tokens one view of an image brings to the projector, for a view of
        ``patches`` patches of an image of ``image_tokens`` visual tokens in ``n_views`` views (LLaVA-NeXT:
        a base view and high-res crops). Default: the view's own share, ``keep_count(ratio, patches)``;
        a method whose official code splits one image budget over the views (FlowCut) overrides it."""
        return keep_count(getattr(self, "ratio", 1.0), patches)

    @property
    def proportional_attention(self) -> bool:
        """In-vision pruners: every block after a merge adds ``log(size)`` to its attention logits
        over the keys, so a merged token weighs as the patches it stands for (ToMe's proportional
        attention)."""
        return False

    def decode_plan(self, n_layers: int) -> DecodePlan | None:
        """Pruners acting at :attr:`Stage.DECODE`: what decoding does on a decoder of ``n_layers`` layers
        (:class:`DecodePlan`), or ``None`` for nothing. Called once per generation, after prefill."""
        return None

    def decode_select(self, state: DecodeState) -> torch.Tensor | None:
        """For a :class:`DecodePlan` with ``select_layer``: ``[B, K]`` bool, the cache entries layers
        ``select_layer..`` attend to at this step (the new token itself and only real entries are
        always/never added by the decoder), or ``None``: every entry. Called once per decode step, in
        step order, by the cached decoder and by the no-cache reference alike (each with its own
        ``state.memory``); it should avoid host syncs (return a mask, not a data-dependent ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} has a decode select_layer but no decode_select")

    def choose_queries(self, inputs: PruningInputs) -> torch.Tensor:
        """For ``queries="chosen"`` stages: ``[B, T]`` bool over ``inputs.text_tokens``, the query
        rows whose attention later stages receive. Called once per forward, on the layer-0
        embeddings (``inputs.tokens`` the visual ones, ``inputs.text_tokens`` the text after them)."""
        raise NotImplementedError(f"{type(self).__name__} asks for chosen query rows but does not choose them")

    def __call__(self, inputs: PruningInputs) -> Reduction:
        return self.select(inputs)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def _name_pruner_class(name: str, cls: type[TokenPruner]) -> None:
    """Check that a registered object is a TokenPruner class and tell it its registry name."""
    if not (isinstance(cls, type) and issubclass(cls, TokenPruner)):
        raise TypeError(f"pruner {name!r} must be a TokenPruner subclass, got {cls!r}")
    cls.name = name


PRUNERS: Registry[type[TokenPruner]] = Registry(
    "pruner", "tokenprune.pruners", builtin_modules=("tokenprune.methods",), on_register=_name_pruner_class
)


def register_pruner(name: str):
    """Class decorator registering a :class:`TokenPruner` subclass under ``name``."""
    return PRUNERS.register(name)


def list_pruners() -> list[str]:
    """Names of every available pruner: built-ins and ``tokenprune.pruners`` entry points."""
    return PRUNERS.names()


def create_pruner(name: str, **options: Any) -> TokenPruner:
    """Instantiate the pruner registered as ``name`` with ``options``.

    Unknown names list the known pruners; unknown options list the valid ones; bad values say
    what is allowed. All three raise :class:`~tokenprune.errors.TokenpruneError` subclasses.
    """
    cls = PRUNERS.get(name)
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    scope = None
    if "scope" in options and "scope" not in params:  # a framework option of every pruner
        options = dict(options)
        scope = validate_choice(options.pop("scope"), "scope", SCOPES)
        if cls.stage is Stage.IN_LLM and scope != "clip":
            raise OptionError(f"pruner {name!r} acts inside the LLM, where it sees the whole sequence: scope='clip' "
                              "is all it does; use a pre-LLM pruner for a per-frame budget")
        if cls.stage is Stage.PRE_LLM and scope not in cls.scopes:
            if scope == "clip":
                raise OptionError(f"pruner {name!r} is defined per view (its rule needs each frame's / image's own grid "
                                  "or attention map), not over a clip: use scope='frame'")
            raise OptionError(f"pruner {name!r} is defined over a whole clip (its rule relates frames to each other), "
                              "not per frame: use scope='clip'")
    unknown = sorted(set(options) - set(params))
    if unknown and not takes_kwargs:
        raise OptionError(
            f"pruner {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(params) or '(none)'}"
        )
    try:
        pruner = cls(**options)
    except TypeError as exc:  # e.g. a plugin with a required option the user left out
        raise OptionError(f"cannot create pruner {name!r}: {exc}") from None
    if scope is not None:
        pruner._scope = scope
    return pruner


def parse_pruner_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value:key=value"`` into the name and typed options.

    Values are parsed as YAML scalars (``3`` -> int, ``0.5`` -> float, ``mean`` -> str).
    Example: ``parse_pruner_spec("fastv:k=3:query=mean") == ("fastv", {"k": 3, "query": "mean"})``.
    """
    name, *parts = spec.strip().split(":")
    if not name:
        raise OptionError(f"empty pruner name in {spec!r}; write e.g. fastv:k=3")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"malformed option {part!r} in {spec!r}; write name:key=value, e.g. fastv:k=3")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            options[key.strip()] = raw
    return name, options


def pruner_from_spec(spec: str, **overrides: Any) -> TokenPruner:
    """``create_pruner`` from a ``"name:key=value"`` spec; ``overrides`` win over the spec's options."""
    name, options = parse_pruner_spec(spec)
    options.update(overrides)
    return create_pruner(name, **options)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` per row, returned in ascending (original) order.

    ``scores`` is ``[B, N]``; the result is ``[B, k]`` long. Ties go to the lower index (a stable
    sort, unlike ``torch.topk``), so selections are deterministic and hand-checkable.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values
