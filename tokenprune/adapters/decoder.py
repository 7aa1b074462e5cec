"""Prefill and cached greedy decoding over a Hugging Face decoder, with in-LLM pruning.

We run the decoder layers ourselves instead of calling ``generate``: position ids with gaps
(pruned tokens keep their original positions) or renumbered per stage, per-layer sequence lengths
(an in-LLM pruner shortens the sequence at each stage of its schedule, so later layers cache fewer
keys), tokens merged inside the LLM and per-layer attention masks are not expressible through
``generate``. Each layer is the model's own module, called exactly as its parent model calls it;
masks are 4-D boolean ``[B, 1, Lq, Lk]`` (SDPA's format).

Decoding: every layer attends over its own cached layout (:class:`_Layout`). A pruner's
:class:`~tokenprune.pruner.DecodePlan` may cut chosen layers' caches to the final set after prefill,
number generated tokens per layer by cache length, and choose per step what later layers attend to;
the no-cache reference (``use_cache=False``) recomputes every step with the same rule as attention masks
and position ids (:meth:`DecoderRunner._reference_view`).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import OptionError
from ..pruner import DecodePlan, DecodeState, LLMStage, PruningInputs, Stage, TokenPruner, merge_in_place
from .attention import input_attention, record_attention
from .devices import execution_device, model_devices, on_input_device, synchronizer


@dataclass
class LLMInputs:
    """One left-padded batch ready for the decoder.

    Attributes:
        embeds: ``[B, L, D]`` input embeddings (visual tokens already in place).
        mask: ``[B, L]`` bool, ``False`` for left padding.
        positions: ``[B, L]`` (1-D RoPE) or ``[3, B, L]`` (M-RoPE) position ids.
        image_mask: ``[B, L]`` bool, ``True`` at visual tokens (for in-LLM pruners and stats).
        sample_ids: one id per sample (seeds random in-LLM pruners).
        view_grids: per sample, the grid of each image view in sequence order (in-LLM pruners
            receive them at their first stage).
        image_span: ``[B, L]`` bool, every embedding the images placed, structural ones included
            (LLaVA-NeXT's row newlines); the text after it is what in-LLM pruners see as text.
            ``None``: the visual tokens alone.
        deepstack: ``[levels, B, L, D]`` per-token features added to the hidden states inside the
            decoder (Qwen3-VL's DeepStack): level ``j`` is added to the output of decoder layer
            ``deepstack_layers[j]``; zero where a token has none (text, padding). Prefill only:
            generated tokens get nothing. ``None``: the model has no such side channel.
        deepstack_layers: the decoder layer after which each level is added; ``None``: level ``j``
            after layer ``j`` (Qwen3-VL's ``_deepstack_process``).
        protected: ``[B, L]`` bool, visual tokens an earlier stage of the pruner marked to keep (an
            in-vision stage's :meth:`~tokenprune.in_vision.VisionReduction.mark`); in-LLM stages receive
            them as ``PruningInputs.protected``. ``None``: none marked.
        visual_in: ``[B]`` long, the visual placeholders of each prompt before any cut (an in-vision
            stage places fewer tokens than the image had); in-LLM stages receive it as
            ``PruningInputs.num_placeholders``. ``None``: the visual tokens placed.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    image_mask: torch.Tensor
    sample_ids: list[str]
    view_grids: list[tuple[tuple[int, int], ...]] | None = None
    image_span: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
    deepstack_layers: tuple[int, ...] | None = None
    protected: torch.Tensor | None = None
    visual_in: torch.Tensor | None = None


@dataclass
class DecodeResult:
    """Output of :meth:`DecoderRunner.generate`.

    Attributes:
        tokens: ``[B, T]`` generated ids (``pad_id`` after a sample's end).
        first_logits: ``[B, V]`` float logits of the first generated token (exactness tests).
        prefill_tokens: ``[B, n_layers]`` tokens each decoder layer saw at prefill, per sample.
        visual_tokens: ``[B, n_layers]`` visual tokens among them (merged ones included).
        new_tokens: ``[B]`` generated tokens up to and including EOS.
        cache_tokens: ``[B, n_layers]`` real tokens each layer's KV cache held when decoding began
            (after a decode plan's cut; the prefill layout otherwise).
    """

    tokens: torch.Tensor
    first_logits: torch.Tensor
    prefill_tokens: torch.Tensor
    visual_tokens: torch.Tensor
    new_tokens: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    cache_tokens: torch.Tensor | None = None


@dataclass
class ScoreResult:
    """Output of :meth:`DecoderRunner.score` (teacher-forced continuations).

    Attributes:
        logprobs: ``[B, C]`` float log-probability of each continuation token given the (pruned)
            prompt and the continuation tokens before it; ``0`` at padding.
        greedy: ``[B, C]`` bool, the token is the argmax of its distribution; ``True`` at padding.
        first_logits: ``[B, V]`` float logits after the prompt (what :meth:`DecoderRunner.generate`
            returns as ``first_logits`` for the same prompt).
        prefill_tokens: ``[U, n_layers]`` tokens each decoder layer saw at prefill, per prompt.
        visual_tokens: ``[U, n_layers]`` visual tokens among them.
    """

    logprobs: torch.Tensor
    greedy: torch.Tensor
    first_logits: torch.Tensor
    prefill_tokens: torch.Tensor
    visual_tokens: torch.Tensor


def causal_mask_4d(mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """``[B, 1, q_len, Lk]`` boolean mask: causal over the last ``q_len`` keys, padding hidden.

    ``mask`` is ``[B, Lk]`` (True = real token). A padding query may see itself, so that no row is
    fully masked (SDPA would return NaN there, and NaN values poison later layers through V).
    """
    lk = mask.shape[1]
    causal = torch.ones(q_len, lk, dtype=torch.bool, device=mask.device).tril(lk - q_len)
    full = causal.unsqueeze(0) & mask[:, None, :]
    diag = torch.zeros(q_len, lk, dtype=torch.bool, device=mask.device)
    diag[torch.arange(q_len), torch.arange(lk - q_len, lk)] = True
    return (full | diag).unsqueeze(1)


def left_pack(keep: torch.Tensor) -> torch.Tensor:
    """Gather indices ``[B, L']`` that move the ``True`` entries of ``keep`` to the right, in order.

    Sorting ``keep`` stably puts dropped entries first and kept ones after, in original order; the
    last ``L' = max kept`` columns are a left-padded layout of the kept entries.
    """
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    return order[:, order.shape[1] - int(keep.sum(1).max()):]


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along sequence ``dim`` of ``x`` with a ``[B, L']`` index (batch at ``dim - 1``)."""
    shape = list(x.shape)
    view = [1] * x.dim()
    view[dim - 1], view[dim] = index.shape
    expanded = index.view(view).expand(*shape[: dim - 1], *index.shape, *shape[dim + 1:])
    return x.gather(dim, expanded)


def compact_positions(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions renumbered without gaps (``position_policy="compact"``).

    1-D RoPE: ``0..L'-1`` in sequence order over the real tokens (what the official LLaVA code of
    the methods does: ``position_ids[:, :L']``). M-RoPE ``[3, B, L]``: every value no real token
    uses (on any axis) is removed by an order-preserving renumbering of the values in use, so kept
    image tokens keep their relative 2-D layout and the text after the image moves up by the
    extent that pruning freed.
    """
    if positions.dim() == 2:
        return (mask.long().cumsum(1) - 1).clamp_min(0)
    out = torch.zeros_like(positions)
    for b in range(positions.shape[1]):  # per sample: the set of values in use differs
        values = positions[:, b][:, mask[b]]
        used = torch.unique(values)
        out[:, b][:, mask[b]] = torch.searchsorted(used, values.contiguous())
    return out


@dataclass
class _Sequence:
    """The per-token state a forward carries from layer to layer (all ``[B, L]`` but ``h``/``positions``).

    ``after_image`` marks the text after the last visual token (query candidates, DART's text
    pivots); ``chosen`` the query rows a pruner chose on the layer-0 embeddings. ``deepstack``
    ``[levels, B, L, D]`` the DeepStack features still to be added (level ``j`` after decoder layer
    ``deepstack_layers[j]``), cut and merged with the tokens; ``None`` once consumed or without any.
    ``protected`` marks visual tokens an earlier stage of the pruner protected (``None``: none);
    ``ids`` is each token's index in the forward's input (merged tokens: new ids past every input
    index), so the layouts of different layers can be matched (a decode plan's cut).
    """

    h: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    image_mask: torch.Tensor
    after_image: torch.Tensor
    chosen: torch.Tensor
    deepstack: torch.Tensor | None = None
    deepstack_layers: tuple[int, ...] = ()
    protected: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    visual_in: torch.Tensor | None = None  # [B] placeholders before any cut (LLMInputs.visual_in); read at stage 0 only

    def merged_in_place(self, into: torch.Tensor | None, weights: torch.Tensor | None, hidden: bool = True) -> "_Sequence":
        """The sequence with in-place merges applied (:attr:`~tokenprune.pruner.Reduction.merge_into` over the
        sequence): ``into`` ``[B, L]`` the column each token is merged into (``-1``: none), ``weights`` ``[B, L]``.
        Every named column becomes the weighted sum of the columns naming it, at its own place and position;
        DeepStack features still to come are merged alike. ``hidden=False`` leaves ``h`` alone (a stage inside a
        layer merged the residual stream itself). ``into=None``: unchanged."""
        if into is None:
            return self
        h, deep = self.h, self.deepstack
        if hidden:
            h = merge_in_place(h, h, into.to(h.device), weights.to(h.device))
        if deep is not None:  # [levels, B, L, D]
            deep = torch.stack([merge_in_place(x, x, into.to(x.device), weights.to(x.device)) for x in deep])
        return replace(self, h=h, deepstack=deep)

    def reorder(self, keep: torch.Tensor, merge: torch.Tensor | None) -> "_Sequence":
        """Keep the ``keep`` tokens and insert ``merge @ h`` right after each sample's last kept
        visual token; left-pack the result. ``keep`` ``[B, L]``; ``merge`` ``[B, M, L]`` or ``None``.

        A merged token takes the position of its heaviest source (the lowest such index on ties)
        and counts as visual at later stages; its DeepStack features (every level still to come) are
        the same weighted sum of its sources' features. It is never protected.
        """
        b, length = keep.shape
        keep = keep & self.mask
        dev = keep.device
        key = torch.arange(length, device=dev, dtype=torch.float64).expand(b, -1)
        h, pos, img, after, chosen = self.h, self.positions, self.image_mask, self.after_image, self.chosen
        deep, prot = self.deepstack, self.protected
        ids = self.ids if self.ids is not None else torch.arange(length, device=dev).expand(b, -1)
        if merge is not None and merge.shape[1] > 0:
            m = merge.shape[1]
            valid = merge.sum(-1) > 0  # [B, M]
            source = merge.argmax(-1)  # [B, M]
            last_visual = (torch.arange(length, device=dev) * (img & keep)).amax(1)  # [B]
            step = torch.arange(1, m + 1, device=dev, dtype=torch.float64) / (m + 1)
            key = torch.cat([key, last_visual[:, None].double() + step], 1)
            keep = torch.cat([keep, valid], 1)
            h = torch.cat([h, merge.to(h.dtype) @ h], 1)
            if deep is not None:  # [B, M, L] @ [levels, B, L, D] -> [levels, B, M, D]
                deep = torch.cat([deep, merge.to(deep.dtype) @ deep], 2)
            pos = torch.cat([pos, gather_seq(pos, source, pos.dim() - 1)], -1)
            img = torch.cat([img, valid], 1)
            zeros = torch.zeros_like(valid)
            after, chosen = torch.cat([after, zeros], 1), torch.cat([chosen, zeros], 1)
            prot = None if prot is None else torch.cat([prot, zeros], 1)
            ids = torch.cat([ids, ids.amax(1, keepdim=True) + 1 + torch.arange(m, device=dev)], 1)
        order = torch.sort(key.masked_fill(~keep, -1.0), dim=1, stable=True).indices
        index = order[:, order.shape[1] - int(keep.sum(1).max()):]
        return _Sequence(h=gather_seq(h, index, 1), mask=gather_seq(keep, index, 1),
                         positions=gather_seq(pos, index, pos.dim() - 1), image_mask=gather_seq(img, index, 1),
                         after_image=gather_seq(after, index, 1), chosen=gather_seq(chosen, index, 1),
                         deepstack=None if deep is None else gather_seq(deep, index, 2),
                         deepstack_layers=self.deepstack_layers,
                         protected=None if prot is None else gather_seq(prot, index, 1),
                         ids=gather_seq(ids, index, 1))


@dataclass
class StageRecord:
    """What one stage did at prefill, replayed by the no-cache reference (over the stage's input).

    ``keep`` ``[B, L_in]`` kept tokens; ``merge`` ``[B, M, L_in]`` merge weights or ``None``;
    ``mask_after`` ``[B, L_out]`` the layout the stage's layers cache; ``next_position`` ``[B]``
    the position a first generated token takes in those layers; ``ids_after`` ``[B, L_out]`` which
    prefill token each entry of that layout is (see ``_Sequence.ids``) and ``image_after`` its visual ones.
    ``into`` / ``into_weights`` ``[B, L_in]``: the stage's in-place merges (``_Sequence.merged_in_place``), or ``None``.
    """

    keep: torch.Tensor
    merge: torch.Tensor | None
    mask_after: torch.Tensor
    next_position: torch.Tensor
    ids_after: torch.Tensor | None = None
    image_after: torch.Tensor | None = None
    into: torch.Tensor | None = None
    into_weights: torch.Tensor | None = None


def _replayed(entry: tuple) -> tuple:
    """A replay entry as ``(keep, merge, into, into_weights)`` (older callers give ``(keep, merge)``)."""
    return tuple(entry) + (None,) * (4 - len(entry))


def _check_mid_layer(layer: nn.Module, name: str, index: int) -> None:
    """An ``after_attention`` stage splits layer ``index`` at its post-attention norm: it must have one."""
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if not all(isinstance(getattr(layer, p, None), nn.Module) for p in parts):
        raise OptionError(f"{name} acts inside decoder layer {index}, between its attention and its MLP, which needs "
                          f"a pre-norm layer ({' -> '.join(parts)}); {type(layer).__name__} is not one")


@dataclass
class _Layout:
    """The cached layout decoding attends over at one or more decoder layers (cached decoding).

    ``mask`` ``[B, K]`` real cache entries (grows by one per step); ``visual`` ``[B, K]`` those that are
    prompt visual tokens; ``next_pos`` ``[B]`` the position of the first generated token there;
    ``index`` ``[B, K0]`` for a layout a decode plan cut from its layer group's (the gather index into
    the group's cache, applied once after prefill), else ``None``; ``attend`` ``[B, K0]`` over the
    *group's* prefill layout, the entries generated tokens see (the no-cache reference's view of the cut).
    """

    mask: torch.Tensor
    visual: torch.Tensor
    next_pos: torch.Tensor
    index: torch.Tensor | None = None
    attend: torch.Tensor | None = None
    full: bool = False  # no padding at all: decode steps hand attention no mask (SDPA attends to every entry)

    def grow(self, real: torch.Tensor) -> None:
        """Append one generated token (``real`` ``[B]`` bool) to the layout."""
        self.mask = torch.cat([self.mask, real[:, None]], 1)
        self.visual = torch.cat([self.visual, torch.zeros_like(real[:, None])], 1)


@dataclass
class _RefDecode:
    """The no-cache reference's view of a decode plan, for one re-run of prompt + ``n_gen`` generated tokens.

    ``attend[i]`` ``[B, K_g]``: the entries of layer ``i``'s group's prefill layout the generated tokens
    see there (the plan's cut as a mask); ``first_pos[i]`` ``[B]`` or ``None``: the position of the first
    generated token at layer ``i`` (``None``: the sequence's own); ``history`` the select-mode selections
    of the earlier generated tokens (``[B, K_g + j + 1]`` for token ``j``); ``new_selection`` is set by
    the re-run for the newest token.
    """

    n_gen: int
    attend: list[torch.Tensor | None]
    first_pos: list[torch.Tensor | None]
    select_layer: int | None = None
    visual: torch.Tensor | None = None
    history: list[torch.Tensor | None] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    new_selection: torch.Tensor | None = None


def rows_isin(values: torch.Tensor, pool: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: each ``values[b, i]`` occurs among ``pool[b][pool_mask[b]]`` (no host sync).

    ``values`` ``[B, L]`` and ``pool`` ``[B, P]`` non-negative longs; ``pool_mask`` ``[B, P]`` bool."""
    big = torch.iinfo(torch.long).max
    sorted_pool = torch.sort(pool.masked_fill(~pool_mask, big), dim=1).values
    at = torch.searchsorted(sorted_pool, values.contiguous()).clamp_max(sorted_pool.shape[1] - 1)
    return sorted_pool.gather(1, at) == values


def next_positions(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: one past the largest position of a real token (M-RoPE: over all 3 axes)."""
    flat = positions.reshape(-1, *positions.shape[-2:]).amax(0)  # [B, L]
    return flat.masked_fill(~mask, -1).amax(1) + 1


class DecoderRunner:
    """Runs a decoder (``layers``, ``norm``, ``rotary_emb``, ``embed_tokens``) and its LM head.

    Devices (a model dispatched with an accelerate ``device_map``): the per-token state (masks,
    positions, the token loop) lives on :attr:`device`, the input embeddings' execution device. The
    hidden states travel with the layers (each layer's hook moves its inputs, as in Hugging Face's
    own forward); at a prune point they, and the attention or keys recorded inside the layer, come
    back to :attr:`device`, where the pruner runs. Logits are returned there too.

    Args:
        text_model: the decoder stack (e.g. ``LlamaModel``, ``Qwen2VLTextModel``).
        lm_head: the output projection.
        pad_id: id written after a sample has finished.
        eos_ids: ids that end a sample.
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, pad_id: int, eos_ids: list[int]):
        self.model = text_model
        self.lm_head = lm_head
        self.layers = list(text_model.layers)
        self.pad_id = pad_id
        self.eos_ids = torch.tensor(sorted(set(eos_ids)))
        # transformers >= 5.2x names a decoder layer's cache argument ``cache`` (``past_key_values`` is deprecated,
        # with a FutureWarning per call, and goes in 5.40); earlier releases only take ``past_key_values``.
        params = inspect.signature(type(self.layers[0]).forward).parameters if self.layers else {}
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def implicit_causal(self) -> bool:
        """Whether the layers' attention kernel applies the causal mask itself when handed none (SDPA,
        FlashAttention; eager needs it spelled out). Read per call: a user may switch the implementation."""
        attn = getattr(self.layers[0], "self_attn", None) if self.layers else None
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None) or "sdpa"
        return impl in ("sdpa", "flash_attention_2", "flash_attention_3")

    @property
    def device(self) -> torch.device:
        """Where inputs go and the per-token state lives: the input embeddings' execution device."""
        return execution_device(self.model.embed_tokens)

    def synchronizer(self):
        """Waits for every CUDA device the decoder runs on (timing boundaries)."""
        return synchronizer(model_devices(self.model, self.lm_head))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` embeddings."""
        return self.model.embed_tokens(ids)

    def schedule(self, pruner: TokenPruner | None) -> tuple[LLMStage, ...]:
        """The pruner's in-LLM stages, checked against this decoder (clear error when they do not fit)."""
        if pruner is None:
            return ()
        n = len(self.layers)
        bind = getattr(pruner, "bind_decoder", None)
        if bind is not None:  # a schedule that depends on the model's weights (VTW's calibrated K, stored per model)
            bind(self.model)
        stages = pruner.llm_schedule(n)
        layers = [st.layer for st in stages]
        # layer 0: a stage on the input embeddings, which reads nothing of the decoder (LLMStage's docstring)
        lowest = [0 if (st.attention == "none" and not (st.keys or st.previous_hidden or st.after_attention
                                                        or getattr(st, "qkv", False))) else 1 for st in stages]
        if any(not lo <= layer < n for lo, layer in zip(lowest, layers)) or layers != sorted(set(layers)):
            raise OptionError(
                f"{pruner.name} prunes before decoder layers {layers}, but this decoder has {n} layers (0..{n - 1}): "
                f"stages need increasing layers in 1..{n - 1} (0: a stage on the input embeddings that reads nothing "
                "of the decoder); set the pruner's layer option to fit")
        for st in stages:
            if st.after_attention:
                _check_mid_layer(self.layers[st.layer - 1], pruner.name, st.layer - 1)
        return stages

    # -- one forward over a (part of a) sequence ------------------------------------------------
    def _run_layers(self, seq: _Sequence, cache, pruner, stages, replay, sample_ids, view_grids, policy, q_len,
                    decode: _RefDecode | None = None):
        """Run every layer; returns the last hidden state, per-layer token/visual counts, stage records.

        ``seq`` describes the keys of this forward. At each stage's layer, the pruner selects (or
        ``replay`` -- records of an earlier prefill, extended over new tokens -- repeats its choice)
        and the sequence is merged in place, cut, merged and, under ``policy="compact"``, renumbered (a stage
        with ``after_attention`` does so inside the layer before its own, between that layer's attention and
        MLP: :meth:`_split_layer`); the pruner's stages share one ``memory`` dict per sample. ``decode`` (the
        no-cache reference of a decode plan) masks what the generated tokens at the end of ``seq`` see
        at each layer and sets their positions there (:meth:`_reference_view`).
        """
        pe = self.model.rotary_emb(seq.h, seq.positions[..., -q_len:] if q_len < seq.positions.shape[-1] else seq.positions)
        mask4 = causal_mask_4d(seq.mask, q_len)
        # A whole unpadded sequence under a plain causal mask: the layers get no mask and SDPA runs causal (its
        # fastest path, what Hugging Face passes); stages still score with mask4. One host sync per forward/stage.
        implicit = self.implicit_causal
        plain = implicit and decode is None and q_len == seq.mask.shape[1] and bool(seq.mask.all())
        at = {st.layer: i for i, st in enumerate(stages)}
        records: list[StageRecord] = []
        n_orig = (seq.image_mask & seq.mask).sum(1)
        n_orig = (n_orig, n_orig if seq.visual_in is None else seq.visual_in.to(n_orig.device))  # (placed, placeholders)
        if replay is None and any(st.queries == "chosen" for st in stages):
            seq = replace(seq, chosen=self._choose_queries(pruner, seq, sample_ids))
        tokens, visual, rec, rec_select, view_key = [], [], None, None, None
        counted, counts = None, None  # the masks the per-layer counts were taken of (held: not per layer), and those counts
        prev = None  # what layer i - 1 received, kept only when stage i asks for it (previous_hidden)
        # one dict per sample, carried from stage to stage of this forward (PruningInputs.memory)
        memory = [{} for _ in range(seq.mask.shape[0])] if replay is None else None

        def decide(s: int, state: _Sequence, rec_s) -> tuple:
            """Stage ``s``'s ``(keep, merge, into, into_weights)`` on ``state``: the pruner's, or the replayed one."""
            if replay is not None:
                return _replayed(replay[s])
            return self._select(pruner, s, stages[s], state, rec_s, pe, mask4, n_orig, sample_ids, view_grids, prev,
                                memory)

        def finish(s: int, state: _Sequence, keep, merge, into, into_w):
            """Cut (and renumber) ``state`` after stage ``s``'s in-place merges; record it; new rotary and mask."""
            state = state.reorder(keep, merge)
            if policy == "compact":
                state = replace(state, positions=compact_positions(state.positions, state.mask))
            records.append(StageRecord(keep, merge, state.mask, next_positions(state.positions, state.mask),
                                       ids_after=state.ids, image_after=state.image_mask & state.mask,
                                       into=into, into_weights=into_w))
            return state, self.model.rotary_emb(state.h, state.positions), causal_mask_4d(state.mask, state.h.shape[1])

        for i, layer in enumerate(self.layers):
            if i in at and not stages[at[i]].after_attention:  # (an after_attention stage ran inside layer i - 1)
                s = at[i]
                seq = replace(seq, h=seq.h.to(seq.mask.device))  # the stage runs where the sequence state is
                keep, merge, into, into_w = decide(s, seq, rec)
                seq, pe, mask4 = finish(s, seq.merged_in_place(into, into_w), keep, merge, into, into_w)
                plain = implicit and decode is None and bool(seq.mask.all())
            if decode is not None:
                selecting = decode.select_layer is not None and i >= decode.select_layer
                if selecting and i == decode.select_layer:
                    decode.new_selection = self._reference_select(pruner, decode, rec_select, seq, sample_ids)
                key = (id(decode.attend[i]), id(decode.first_pos[i]), selecting)
                if i in at or key != view_key:
                    view_key = key
                    mask4, pe = self._reference_view(seq, decode, i, selecting)
            if counted is None or counted[0] is not seq.mask or counted[1] is not seq.image_mask:  # new only at a cut
                counted, counts = (seq.mask, seq.image_mask), (seq.mask.sum(1), (seq.image_mask & seq.mask).sum(1))
            tokens.append(counts[0])
            visual.append(counts[1])
            nxt = stages[at[i + 1]] if replay is None and i + 1 in at else None
            # un-rotated scores are computed from what enters layer i (in _select), not recorded while it runs
            raw = nxt is not None and nxt.attention == "previous" and not nxt.rotary
            prev = seq.h if nxt is not None and (nxt.previous_hidden or raw) else None  # same layout as layer i + 1's input
            mid = at[i + 1] if i + 1 in at and stages[at[i + 1]].after_attention else None
            split = None if mid is None else self._split_layer(layer, mid, seq, lambda st, r: decide(mid, st, r))
            try:
                if nxt is not None and ((nxt.attention == "previous" and not raw) or nxt.keys or nxt.qkv):
                    rows = self._query_rows(nxt.queries, seq) if nxt.attention == "previous" and not raw else None
                    with record_attention(layer.self_attn, rows=None if rows is None else rows[0],
                                          keys=nxt.keys or nxt.qkv, values=nxt.qkv, queries=-1 if nxt.qkv else 0,
                                          heads=nxt.heads) as rec:
                        rec.query_mask = None if rows is None else rows[1]  # (read by an after_attention stage inside)
                        if split is not None:
                            split["rec"] = rec
                        h = layer(seq.h, attention_mask=None if plain else mask4, position_embeddings=pe, **{self.cache_kw: cache},
                                  use_cache=cache is not None)
                    rec.query_mask = None if rows is None else rows[1]
                elif decode is not None and decode.select_layer is not None and i == decode.select_layer - 1:
                    with record_attention(layer.self_attn, rows="last") as rec_select:  # the newest token's row
                        h = layer(seq.h, attention_mask=None if plain else mask4, position_embeddings=pe, **{self.cache_kw: cache},
                                  use_cache=cache is not None)
                else:
                    h = layer(seq.h, attention_mask=None if plain else mask4, position_embeddings=pe, **{self.cache_kw: cache},
                              use_cache=cache is not None)
            finally:  # never leave the hook on the model (an error in the layer or in the stage)
                if split is not None:
                    split["hook"].remove()
            if split is not None:  # stage `mid` ran inside this layer: the cut (and the merges' residual) after it
                keep, merge, into, into_w = split["decision"]
                if into is not None:  # out = r + MLP(norm(r')) -> r' + MLP(norm(r')): exact outside merged columns
                    h = h + (split["merged"] - split["residual"]).to(h.device, h.dtype)
                seq = replace(seq, h=h.to(seq.mask.device)).merged_in_place(into, into_w, hidden=False)
                seq, pe, mask4 = finish(mid, seq, keep, merge, into, into_w)
                plain = implicit and decode is None and bool(seq.mask.all())
                h = seq.h
            if seq.deepstack is not None and i in seq.deepstack_layers:
                # DeepStack (Qwen3-VL's _deepstack_process): level j joins the output of its layer, at the
                # (kept, merged) visual tokens; elsewhere the features are zero, so adding is exact there.
                level = seq.deepstack_layers.index(i)
                h = h + seq.deepstack[level].to(h.device, h.dtype)
                if i == max(seq.deepstack_layers):  # consumed: later stages need not cut it
                    seq = replace(seq, deepstack=None)
            seq = replace(seq, h=h)
        return seq.h, torch.stack(tokens, 1), torch.stack(visual, 1), records

    @staticmethod
    def _split_layer(layer: nn.Module, s: int, seq: _Sequence, decide) -> dict:
        """Arm an ``after_attention`` stage ``s`` inside ``layer``: a forward pre-hook on its post-attention norm
        takes the residual stream ``r`` right after the attention block, lets ``decide(state, rec)`` choose on it
        (the attention the layer just recorded is ``split["rec"]``), and hands the norm (so the MLP) ``r'`` with
        the stage's in-place merges applied. The caller removes ``split["hook"]`` after the layer and turns its
        output ``r + MLP(norm(r'))`` into ``r' + MLP(norm(r'))`` before cutting. The layer itself is called as
        usual (its own forward, forward hooks and device hooks run)."""
        split: dict = {"rec": None}

        def hook(module, args):
            r = args[0]
            state = replace(seq, h=r.to(seq.mask.device))
            keep, merge, into, into_w = decide(state, split["rec"])
            if merge is not None:
                raise OptionError("a stage inside a decoder layer (after_attention) merges in place "
                                  "(Reduction.merge_into), not by appending merge_weights")
            merged = state.merged_in_place(into, into_w).h if into is not None else state.h
            split.update(decision=(keep, merge, into, into_w), residual=state.h, merged=merged)
            return (merged.to(r.device, r.dtype),) + tuple(args[1:])

        split["hook"] = layer.post_attention_layernorm.register_forward_pre_hook(hook)
        return split

    def _reference_view(self, seq: _Sequence, decode: _RefDecode, i: int, selecting: bool):
        """``(mask4, position embeddings)`` of layer ``i`` in the no-cache reference of a decode plan.

        The prompt rows attend as at prefill (their keys are what prefill cached). The ``n_gen``
        generated rows at the end see, of the prompt, only ``decode.attend[i]`` (the plan's cut at this
        layer), of each other the causal past, and from ``select_layer`` on only what each one's step
        selected; their positions are ``decode.first_pos[i] + 0, 1, ...`` where the plan sets them.
        """
        n_gen = decode.n_gen
        length = seq.h.shape[1]
        lg = length - n_gen
        mask4 = causal_mask_4d(seq.mask, length)
        attend = decode.attend[i]
        if attend is not None or selecting:
            gen = mask4[:, 0, lg:, :].clone()  # [B, n_gen, L]
            if attend is not None:
                if attend.shape[1] != lg:
                    raise RuntimeError(f"decode plan layout of {attend.shape[1]} prompt entries at layer {i}, "
                                       f"the reference holds {lg}")
                gen[:, :, :lg] &= attend[:, None, :]
            if selecting:
                for j, sel in enumerate(decode.history + [decode.new_selection]):  # one row per decode step
                    if sel is not None:
                        gen[:, j, : lg + j + 1] &= sel
            mask4 = torch.cat([mask4[:, :, :lg], gen[:, None]], 2)
        positions = seq.positions
        first = decode.first_pos[i]
        if first is not None:
            positions = positions.clone()
            positions[..., lg:] = first[:, None] + torch.arange(n_gen, device=first.device)
        return mask4, self.model.rotary_emb(seq.h, positions)

    def _reference_select(self, pruner: TokenPruner, decode: _RefDecode, rec, seq: _Sequence, sample_ids):
        """The reference's own decode selection for its newest token, from the attention it recorded."""
        n_gen = decode.n_gen
        attn = rec.maps[0][:, 0].to(seq.mask.device).float()  # [B, L]: the newest token's row
        visual = torch.cat([decode.visual, torch.zeros_like(seq.mask[:, -n_gen:])], 1)
        state = DecodeState(attention=attn, visual=visual, mask=seq.mask.clone(), step=n_gen - 1,
                            layer=decode.select_layer, sample_ids=sample_ids, memory=decode.memory)
        sel = pruner.decode_select(state)
        if sel is None:
            return None
        sel = sel.to(seq.mask.device).bool() & seq.mask
        sel[:, -1] = True  # a token always sees itself
        return sel

    @staticmethod
    def _query_rows(queries: str, seq: _Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, Q] query positions, [B, Q] bool real rows)`` for a stage's ``queries``."""
        b, length = seq.mask.shape
        if queries == "last":
            return torch.full((b, 1), length - 1, dtype=torch.long, device=seq.mask.device), torch.ones(b, 1, dtype=torch.bool, device=seq.mask.device)
        if queries == "all":
            return torch.arange(length, device=seq.mask.device).expand(b, -1), seq.mask
        flag = (seq.after_image if queries == "text" else seq.chosen) & seq.mask
        index = left_pack(flag)
        return index, gather_seq(flag, index, 1)

    def _choose_queries(self, pruner: TokenPruner, seq: _Sequence, sample_ids) -> torch.Tensor:
        """``[B, L]`` bool: the text rows ``pruner.choose_queries`` picks on the layer-0 embeddings."""
        chosen = torch.zeros_like(seq.mask)
        img = seq.image_mask & seq.mask
        after = seq.after_image & seq.mask
        n_img = img.sum(1)
        for n in torch.unique(n_img).tolist():
            rows = (n_img == n).nonzero().flatten()
            if n == 0:
                continue
            img_pos, txt_pos = left_pack(img[rows]), left_pack(after[rows])
            text_mask = gather_seq(after[rows], txt_pos, 1)
            inputs = PruningInputs(tokens=gather_seq(seq.h[rows], img_pos, 1), grid=(1, n),
                                   sample_ids=[sample_ids[r] for r in rows.tolist()],
                                   text_tokens=gather_seq(seq.h[rows], txt_pos, 1), text_mask=text_mask)
            picked = pruner.choose_queries(inputs) & text_mask
            chosen[rows.unsqueeze(1), txt_pos] = picked
        return chosen & after

    def _select(self, pruner, s, stage: LLMStage, seq: _Sequence, rec, pe, mask4, n_orig, sample_ids, view_grids,
                prev=None, memory: list[dict] | None = None):
        """Run stage ``s`` of the pruner; ``([B, L] keep, [B, M, L] merge weights or None, [B, L] in-place merge
        column or None, [B, L] its weights or None)`` (``Reduction.merge_into`` as sequence columns)."""
        attn, qmask = None, None
        dev = seq.mask.device  # recorded on the layer's device: brought to the sequence state's
        if stage.attention == "previous" and not stage.rotary:  # from what layer stage.layer - 1 received
            rows, qmask = self._query_rows(stage.queries, seq)
            length = seq.mask.shape[1]
            every_key = seq.mask[:, None, None, :].expand(-1, 1, length, -1)  # padding masked, no causal mask
            attn = input_attention(self.layers[stage.layer - 1], prev, None, every_key, rows, heads=stage.heads).to(dev)
        elif stage.attention == "previous":
            attn, qmask = rec.maps[0].to(dev), rec.query_mask
        elif stage.attention == "input":
            rows, qmask = self._query_rows(stage.queries, seq)
            attn = input_attention(self.layers[stage.layer], seq.h, pe, mask4, rows, heads=stage.heads).to(dev)
        prev = None if prev is None or not stage.previous_hidden else prev.to(dev)  # [B, L, D]: what layer stage.layer - 1 received
        keys = values = queries = None
        if stage.keys or stage.qkv:
            k = rec.keys[0].to(dev)  # [B, H_kv, L, d]
            keys = k.transpose(1, 2).flatten(2)  # [B, L, H_kv * d]
        if stage.qkv:
            values = rec.values[0].to(dev).transpose(1, 2)  # [B, L, H_kv, d]
            q_rows, qmask = self._query_rows(stage.queries, seq)
            queries = rec.queries[0].to(dev).transpose(1, 2)  # [B, L, H, d]
            queries = queries.gather(1, q_rows[..., None, None].expand(-1, -1, *queries.shape[2:]))  # [B, Q, H, d]
        img = seq.image_mask & seq.mask
        after = seq.after_image & seq.mask
        keep = seq.mask & ~seq.image_mask
        n_img = img.sum(1)
        n_orig, n_held = n_orig
        # Each token's index in its sample's unpadded input (PruningInputs.seq_index): its input column
        # minus that of the sample's first real token.
        ids = seq.ids if seq.ids is not None else torch.arange(seq.mask.shape[1], device=dev).expand(seq.mask.shape[0], -1)
        seq_index = ids - torch.where(seq.mask, ids, ids.amax() + 1).amin(1, keepdim=True)
        groups: dict[tuple, list[int]] = {}
        for b, (n, n0, p0) in enumerate(zip(n_img.tolist(), n_orig.tolist(), n_held.tolist())):
            grids = view_grids[b] if (view_grids is not None and s == 0) else None
            # an adaptive pruner's count differs per sample, and one Reduction holds one count: one sample per call
            groups.setdefault((n, n0, p0, grids, b if pruner.adaptive else None), []).append(b)
        merges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        into = into_w = None
        for (n, n0, p0, grids, _), members in groups.items():
            if n == 0:
                continue  # no visual tokens (a text-only sample): nothing to prune
            rows = torch.tensor(members, device=seq.mask.device)
            img_pos = left_pack(img[rows])  # [b, n] positions of the visual tokens, in order
            txt_pos = left_pack(after[rows])
            text_mask = gather_seq(after[rows], txt_pos, 1)
            grid = grids[0] if grids is not None and len(grids) == 1 else (1, n)
            inputs = PruningInputs(
                tokens=gather_seq(seq.h[rows], img_pos, 1), grid=grid,
                sample_ids=[sample_ids[r] for r in members],
                llm_attention=None if attn is None else attn[rows].gather(2, img_pos[:, None, :].expand(-1, attn.shape[1], -1)),
                llm_query_mask=None if qmask is None else qmask[rows],
                stage=s, layer=stage.layer, num_layers=len(self.layers), num_original=n0,
                view_grids=grids, llm_keys=None if keys is None else gather_seq(keys[rows], img_pos, 1),
                previous_tokens=None if prev is None else gather_seq(prev[rows], img_pos, 1),
                text_tokens=gather_seq(seq.h[rows], txt_pos, 1), text_mask=text_mask,
                text_keys=None if keys is None else gather_seq(keys[rows], txt_pos, 1),
                final_norm=on_input_device(self.model.norm),  # the norm itself unless dispatched
                protected=None if seq.protected is None else gather_seq(seq.protected[rows], img_pos, 1),
                seq_index=gather_seq(seq_index[rows], img_pos, 1),
                text_seq_index=gather_seq(seq_index[rows], txt_pos, 1).masked_fill(~text_mask, -1),
                llm_queries=None if queries is None else queries[rows],
                llm_values=None if values is None else gather_seq(values[rows].flatten(2), img_pos, 1).unflatten(2, values.shape[2:]),
                text_values=None if values is None else gather_seq(values[rows].flatten(2), txt_pos, 1).unflatten(2, values.shape[2:]),
                num_placeholders=p0,
                memory=None if memory is None else [memory[r] for r in members],
            )
            red = pruner(inputs)
            keep[rows.unsqueeze(1), img_pos.gather(1, red.indices)] = True
            if red.merge_weights is not None and red.merge_weights.shape[1] > 0:
                merges.append((rows, img_pos, red.merge_weights))
            if red.merge_into is not None:  # slots into `indices` -> the kept tokens' sequence columns
                if into is None:
                    into = torch.full_like(keep, -1, dtype=torch.long)
                    into_w = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
                slot = red.merge_into.to(keep.device)
                col = img_pos.gather(1, red.indices.to(keep.device).gather(1, slot.clamp_min(0)))
                into[rows.unsqueeze(1), img_pos] = torch.where(slot >= 0, col, -1)
                into_w[rows.unsqueeze(1), img_pos] = red.merge_into_weights.to(keep.device).float()
        if not merges:
            return keep, None, into, into_w
        m = max(w.shape[1] for _, _, w in merges)
        merge = torch.zeros(*keep.shape[:1], m, keep.shape[1], dtype=torch.float32, device=keep.device)
        for rows, img_pos, w in merges:
            slot = torch.arange(w.shape[1], device=keep.device)
            merge[rows[:, None, None], slot[None, :, None], img_pos[:, None, :]] = w.float()
        return keep, merge, into, into_w

    def _logits(self, h: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[B, V]`` float logits of the last position, on ``device``."""
        return self.lm_head(self.model.norm(h[:, -1:])).float()[:, 0].to(device)

    # -- decoding: per-layer cached layouts and the decode plan -----------------------------------
    def decode_plan(self, pruner: TokenPruner | None, stages: tuple[LLMStage, ...]) -> DecodePlan | None:
        """The pruner's :class:`~tokenprune.pruner.DecodePlan`, checked against this decoder and its
        stages (one clear line when it does not fit); ``None`` without one."""
        if pruner is None or not pruner.acts_in(Stage.DECODE):
            return None
        n = len(self.layers)
        plan = pruner.decode_plan(n)
        if plan is None:
            return None
        bad = [layer for layer in plan.cut_layers if not 0 <= layer < n]
        if bad:
            raise OptionError(f"{pruner.name} cuts the decode cache of layers {bad}, but this decoder has {n} layers "
                              f"(0..{n - 1}); set the pruner's layer option to fit")
        if plan.positions not in ("continue", "cache_length", "final"):
            raise OptionError(f"{pruner.name}: decode positions must be 'continue', 'cache_length' or 'final', "
                              f"got {plan.positions!r}")
        if plan.select_layer is not None:
            top = plan.select_layer
            if not 1 <= top < n:
                raise OptionError(f"{pruner.name} selects decode attention from layer {top}, but this decoder has {n} "
                                  f"layers: use a layer in 1..{n - 1}")
            if any(st.layer >= top for st in stages) or any(c >= top - 1 for c in plan.cut_layers):
                raise OptionError(f"{pruner.name} selects what layers {top}.. attend to while decoding; layers "
                                  f"{top - 1}..{n - 1} must share one cached layout, but an in-LLM stage or a cache cut "
                                  "falls there")
        return plan

    def _layouts(self, inputs: LLMInputs, records: list[StageRecord], stages: tuple[LLMStage, ...],
                 plan: DecodePlan | None) -> tuple[list[_Layout], list[int]]:
        """The cached layouts decoding attends over, and each layer's (index into them).

        Without a plan: one layout per layer group (the layers between two stages cache alike). A plan's
        ``cut_layers`` get their group's layout cut to the tokens that reach the last layer (matched by
        ``ids``), one cut layout per group; ``positions="cache_length"`` numbers generated tokens from
        each layout's real-token count. One host sync per cut group (the packed width), none per step.
        """
        n = len(self.layers)
        starts = [0] + [st.layer for st in stages]
        group_of = [max(g for g, start in enumerate(starts) if start <= i) for i in range(n)]
        masks = [inputs.mask] + [r.mask_after for r in records]
        b, length = inputs.mask.shape
        ids = [torch.arange(length, device=inputs.mask.device).expand(b, -1)] + [r.ids_after for r in records]
        visual = [inputs.image_mask & inputs.mask] + [r.image_after for r in records]
        nexts = [next_positions(inputs.positions, inputs.mask)] + [r.next_position for r in records]
        by_count = plan is not None and plan.positions == "cache_length"
        if plan is not None and plan.positions == "final":  # every layer continues where the last one does
            nexts = [nexts[-1]] * len(nexts)
        layouts = [_Layout(mask=m, visual=v, next_pos=m.sum(1) if by_count else p) for m, v, p in zip(masks, visual, nexts)]
        layer_of = list(group_of)
        made: dict[int, int] = {}
        for i in sorted(set(plan.cut_layers) if plan is not None else ()):
            g = group_of[i]
            if g not in made:
                survivors = masks[g] & rows_isin(ids[g], ids[-1], masks[-1])
                index = left_pack(survivors)
                mask = gather_seq(survivors, index, 1)
                made[g] = len(layouts)
                layouts.append(_Layout(mask=mask, visual=gather_seq(visual[g], index, 1) & mask,
                                       next_pos=mask.sum(1) if by_count else nexts[g], index=index, attend=survivors))
            layer_of[i] = made[g]
        return layouts, layer_of

    @staticmethod
    def _cut_cache(cache: DynamicCache, layouts: list[_Layout], layer_of: list[int]) -> None:
        """Cut the KV cache of every layer whose layout a decode plan cut (``_Layout.index``), in place."""
        for i, which in enumerate(layer_of):
            index = layouts[which].index
            if index is None:
                continue
            layer = cache.layers[i]
            idx = index.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))

    def _reference_decode(self, layouts: list[_Layout], layer_of: list[int], plan: DecodePlan | None, n_gen: int,
                          history: list, memory: dict) -> _RefDecode | None:
        """The no-cache reference's view of ``plan`` for a re-run with ``n_gen`` generated tokens."""
        if plan is None:
            return None
        attend = [layouts[w].attend for w in layer_of]
        first: dict[int, torch.Tensor | None] = {}
        for w in set(layer_of):  # cache_length: the prompt entries the generated tokens see there
            lay = layouts[w]
            if plan.positions == "final":
                first[w] = lay.next_pos
            else:
                first[w] = ((lay.attend if lay.attend is not None else lay.mask).sum(1)
                            if plan.positions == "cache_length" else None)
        visual = layouts[layer_of[plan.select_layer]].visual if plan.select_layer is not None else None
        return _RefDecode(n_gen=n_gen, attend=attend, first_pos=[first[w] for w in layer_of],
                          select_layer=plan.select_layer, visual=visual, history=history, memory=memory)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int, pruner: TokenPruner | None = None,
                 use_cache: bool = True, ignore_eos: bool = False, position_policy: str = "keep") -> DecodeResult:
        """Greedy decoding of up to ``max_new_tokens`` per sample.

        With ``use_cache=False`` every step re-runs the whole (pruned) sequence: the reference
        that cached decoding must match. An in-LLM pruner selects once per stage, at prefill; the
        reference replays those selections (and merges), as the cache does. A decode plan
        (:meth:`decode_plan`) cuts cached layers after prefill, numbers generated tokens per layer and
        selects per step what later layers attend to; the reference recomputes every hidden state with
        the same rule as attention masks and position ids (:meth:`_reference_view`), and selects with its
        own attention. ``ignore_eos`` always decodes ``max_new_tokens`` (fixed-length latency runs,
        decoding tests). ``position_policy`` applies to in-LLM stages: ``"compact"`` renumbers after each stage.
        """
        b = inputs.embeds.shape[0]
        device = inputs.embeds.device
        stages = self.schedule(pruner)
        plan = self.decode_plan(pruner, stages)
        sync = self.synchronizer() if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        eos = self.eos_ids.to(device) if not ignore_eos else torch.empty(0, dtype=torch.long, device=device)
        cache = DynamicCache() if use_cache else None
        seq = self._initial_sequence(inputs)
        h, n_tok, n_vis, records = self._run_layers(seq, cache, pruner, stages, None, inputs.sample_ids,
                                                    inputs.view_grids, position_policy, inputs.embeds.shape[1])
        logits = self._logits(h, device)
        first_logits = logits
        # Each layer decodes over its own cached layout, numbering new tokens from its own next position
        # (stages that renumber shift it down by the tokens they dropped; a decode plan may cut it).
        layouts, layer_of = self._layouts(inputs, records, stages, plan)
        if use_cache:
            self._cut_cache(cache, layouts, layer_of)
            for lay in layouts:  # one host sync per layout, once: generated tokens are always real (grow(ones))
                lay.full = bool(lay.mask.all())
        cache_tokens = torch.stack([layouts[w].mask.sum(1) for w in layer_of], 1)
        sync()  # timing boundaries only: never inside the decode loop
        t_prefill = time.perf_counter()
        out = torch.full((b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        new_tokens = torch.zeros(b, dtype=torch.long, device=device)
        select = (pruner, {}, inputs.sample_ids) if plan is not None and plan.select_layer is not None else None
        history: list = []  # the reference's own decode selections, one per generated token
        ref_memory: dict = {}
        embeds, full_mask, full_pos = inputs.embeds, inputs.mask, inputs.positions
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            out[:, step] = token
            new_tokens += (~finished).long()
            finished = finished | torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):  # one host sync per step, as HF does
                break
            tok_emb = self.embed(token[:, None])
            one = torch.ones(b, 1, dtype=torch.bool, device=device)
            if use_cache:
                for lay in layouts:
                    lay.grow(one[:, 0])
                h = self._decode_step(tok_emb, step, layouts, layer_of, cache, inputs.positions.dim(),
                                      plan.select_layer if select else None, select)
            else:
                pos = self._positions_at(next_positions(inputs.positions, inputs.mask) + step, inputs.positions.dim())
                embeds = torch.cat([embeds, tok_emb], 1)
                full_mask = torch.cat([full_mask, one], 1)
                full_pos = torch.cat([full_pos, pos], -1)
                grown = embeds.shape[1] - inputs.embeds.shape[1]
                replay = [(torch.cat([r.keep, one.expand(-1, grown)], 1),
                           None if r.merge is None else torch.cat([r.merge, r.merge.new_zeros(b, r.merge.shape[1], grown)], 2),
                           None if r.into is None else torch.cat([r.into, r.into.new_full((b, grown), -1)], 1),
                           None if r.into is None else torch.cat([r.into_weights, r.into_weights.new_zeros(b, grown)], 1))
                          for r in records]
                seq = self._initial_sequence(replace(inputs, embeds=embeds, mask=full_mask, positions=full_pos,
                                                     image_mask=torch.cat([inputs.image_mask, ~one.expand(-1, grown)], 1)))
                ref = self._reference_decode(layouts, layer_of, plan, grown, history, ref_memory)
                h, _, _, _ = self._run_layers(seq, None, pruner, stages, replay, inputs.sample_ids, None,
                                              position_policy, embeds.shape[1], decode=ref)
                if ref is not None and ref.select_layer is not None:
                    history = history + [ref.new_selection]
            logits = self._logits(h, device)
        sync()
        t_end = time.perf_counter()
        return DecodeResult(tokens=out, first_logits=first_logits, prefill_tokens=n_tok, visual_tokens=n_vis,
                            new_tokens=new_tokens, timings={"prefill": t_prefill - t0, "decode": t_end - t_prefill},
                            cache_tokens=cache_tokens)

    @torch.no_grad()
    def score(self, inputs: LLMInputs, targets: torch.Tensor, target_mask: torch.Tensor,
              pruner: TokenPruner | None = None, position_policy: str = "keep",
              rows: torch.Tensor | None = None) -> ScoreResult:
        """Log-probabilities of given continuations after the (pruned) prompts: teacher forcing.

        The prompts are prefilled exactly as :meth:`generate` prefills them (in-LLM stages select
        and cut at prefill); the continuation tokens then go through the KV cache in one cached
        forward, each layer over its own cached layout and positions, as generated tokens do (a decode
        plan's cut and positions included; a plan that selects per step runs the continuation token
        by token, as decoding would).

        Args:
            inputs: ``U`` prompts.
            targets: ``[B, C]`` continuation token ids, right-padded (any id at padding).
            target_mask: ``[B, C]`` bool, ``False`` at padding; every row has at least one token.
            pruner: an in-LLM pruner, or ``None`` (pre-LLM pruning is already in ``inputs``).
            position_policy: as in :meth:`generate`.
            rows: ``[B]`` the prompt (index into ``inputs``) each continuation follows; default
                ``arange(U)`` (``B == U``). Several continuations of one prompt share its prefill.
        """
        device = inputs.embeds.device
        u = inputs.embeds.shape[0]
        rows = torch.arange(u, device=device) if rows is None else rows.to(device)
        targets, target_mask = targets.to(device), target_mask.to(device).bool()
        if targets.dim() != 2 or targets.shape != target_mask.shape or targets.shape[0] != rows.shape[0]:
            raise OptionError(f"targets {tuple(targets.shape)}, target_mask {tuple(target_mask.shape)} and rows "
                              f"{tuple(rows.shape)} must be [B, C], [B, C] and [B]")
        if targets.shape[1] == 0 or not bool(target_mask[:, 0].all()):
            raise OptionError("every continuation needs at least one token")
        stages = self.schedule(pruner)
        plan = self.decode_plan(pruner, stages)
        cache = DynamicCache()
        seq = self._initial_sequence(inputs)
        h, n_tok, n_vis, records = self._run_layers(seq, cache, pruner, stages, None, inputs.sample_ids,
                                                    inputs.view_grids, position_policy, inputs.embeds.shape[1])
        first = self._logits(h, device)[rows]  # [B, V]
        logp = first.log_softmax(-1)
        b, c = targets.shape
        logprobs = torch.zeros(b, c, dtype=torch.float32, device=device)
        greedy = torch.ones(b, c, dtype=torch.bool, device=device)
        logprobs[:, 0] = logp.gather(1, targets[:, :1])[:, 0]
        greedy[:, 0] = logp.argmax(-1) == targets[:, 0]
        if c > 1:
            layouts, layer_of = self._layouts(inputs, records, stages, plan)
            self._cut_cache(cache, layouts, layer_of)
            if not torch.equal(rows, torch.arange(u, device=device)):
                cache.reorder_cache(rows)  # one cached prompt per continuation
                layouts = [_Layout(mask=lay.mask[rows], visual=lay.visual[rows], next_pos=lay.next_pos[rows])
                           for lay in layouts]
            dims = inputs.positions.dim()
            if plan is not None and plan.select_layer is not None:  # step by step, as decoding selects
                select = (pruner, {}, [inputs.sample_ids[r] for r in rows.tolist()])
                hs = []
                for j in range(c - 1):
                    for lay in layouts:  # padding continues after a row's last token: it never reaches a real one
                        lay.grow(torch.ones(b, dtype=torch.bool, device=device))
                    hs.append(self._decode_step(self.embed(targets[:, j:j + 1]), j, layouts, layer_of, cache, dims,
                                                plan.select_layer, select))
                h = torch.cat(hs, 1)
            else:
                h = self._extend(self.embed(targets[:, :-1]), layouts, layer_of, cache, dims, target_mask[:, :-1])
            logp = self.lm_head(self.model.norm(h)).float().to(device).log_softmax(-1)  # [B, C-1, V]
            logprobs[:, 1:] = logp.gather(2, targets[:, 1:, None])[..., 0]
            greedy[:, 1:] = logp.argmax(-1) == targets[:, 1:]
        return ScoreResult(logprobs=logprobs.masked_fill(~target_mask, 0.0), greedy=greedy | ~target_mask,
                           first_logits=first, prefill_tokens=n_tok, visual_tokens=n_vis)

    def _extend(self, tok_emb, layouts: list[_Layout], layer_of: list[int], cache, dims, new_mask):
        """``q`` new tokens ``[B, q, D]`` through the cache in one forward (causal among themselves):
        each layer attends over its cached layout plus the new tokens, numbered from its layout's next
        position. ``new_mask`` ``[B, q]`` marks real tokens (padding comes last)."""
        q = tok_emb.shape[1]
        offsets = torch.arange(q, device=tok_emb.device)
        h = tok_emb
        current = None
        for i, layer in enumerate(self.layers):
            if layer_of[i] != current:
                current = layer_of[i]
                lay = layouts[current]
                pos = lay.next_pos[:, None] + offsets  # [B, q]
                pe = self.model.rotary_emb(tok_emb, pos.unsqueeze(0).expand(3, -1, -1) if dims == 3 else pos)
                mask = causal_mask_4d(torch.cat([lay.mask, new_mask], 1), q)
            h = layer(h, attention_mask=mask, position_embeddings=pe, **{self.cache_kw: cache}, use_cache=True)
        return h

    @staticmethod
    def _initial_sequence(inputs: LLMInputs) -> _Sequence:
        """The prompt as a :class:`_Sequence`: text after the last visual token marked as query candidates."""
        mask = inputs.mask
        image = inputs.image_mask if inputs.image_span is None else inputs.image_span
        if image.shape[1] < mask.shape[1]:  # the no-cache reference: generated tokens appended
            image = torch.cat([image, torch.zeros_like(mask[:, image.shape[1]:])], 1)
        image = image & mask
        idx = torch.arange(mask.shape[1], device=mask.device)
        last_visual = torch.where(image, idx, -1).amax(1, keepdim=True)  # [B, 1]; -1 without an image
        after = mask & (idx > last_visual) & (last_visual >= 0)
        deep, deep_layers = inputs.deepstack, ()
        if deep is not None:
            deep_layers = tuple(inputs.deepstack_layers or range(deep.shape[0]))
            if deep.shape[2] < mask.shape[1]:  # the no-cache reference: generated tokens get no DeepStack
                deep = torch.cat([deep, deep.new_zeros(*deep.shape[:2], mask.shape[1] - deep.shape[2], deep.shape[3])], 2)
        protected = inputs.protected
        if protected is not None and protected.shape[1] < mask.shape[1]:  # the reference: generated tokens appended
            protected = torch.cat([protected, torch.zeros_like(mask[:, protected.shape[1]:])], 1)
        ids = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        return _Sequence(h=inputs.embeds, mask=mask, positions=inputs.positions, image_mask=inputs.image_mask,
                         after_image=after, chosen=torch.zeros_like(mask), deepstack=deep, deepstack_layers=deep_layers,
                         protected=protected, ids=ids, visual_in=inputs.visual_in)

    @staticmethod
    def _positions_at(value: torch.Tensor, dims: int) -> torch.Tensor:
        """``[B]`` positions of one new token as ``[B, 1]`` (1-D) or ``[3, B, 1]`` (M-RoPE)."""
        pos = value[:, None]
        return pos.unsqueeze(0).expand(3, -1, -1) if dims == 3 else pos

    def _decode_step(self, tok_emb, step, layouts: list[_Layout], layer_of: list[int], cache, dims,
                     select_layer: int | None = None, select: tuple | None = None):
        """One cached step: each layer attends over its own cached layout (already grown by the new
        token), at its own position. ``select`` ``(pruner, memory, sample_ids)`` with ``select_layer``:
        layer ``select_layer - 1`` records the new token's attention, the pruner picks what layers
        ``select_layer..`` attend to (:meth:`~tokenprune.pruner.TokenPruner.decode_select`)."""
        h = tok_emb
        current = None
        for i, layer in enumerate(self.layers):
            if layer_of[i] != current:
                current = layer_of[i]
                lay = layouts[current]
                pe = self.model.rotary_emb(tok_emb, self._positions_at(lay.next_pos + step, dims))
                # unpadded: no mask at all, as Hugging Face decodes (SDPA's fastest path); else padding hidden
                mask = None if lay.full else lay.mask[:, None, None, :]
            if select_layer is not None and i == select_layer - 1:
                with record_attention(layer.self_attn, rows="last") as rec:
                    h = layer(h, attention_mask=mask, position_embeddings=pe, **{self.cache_kw: cache}, use_cache=True)
                pruner, memory, sample_ids = select
                dev = lay.mask.device
                state = DecodeState(attention=rec.maps[0][:, 0].to(dev).float(), visual=lay.visual, mask=lay.mask,
                                    step=step, layer=select_layer, sample_ids=sample_ids, memory=memory)
                sel = pruner.decode_select(state)
                if sel is not None:  # layers select_layer.. share this layout (checked in decode_plan)
                    sel = sel.to(dev).bool() & lay.mask
                    sel[:, -1] = True  # a token always sees itself
                    mask = sel[:, None, None, :]
                continue
            h = layer(h, attention_mask=mask, position_embeddings=pe, **{self.cache_kw: cache}, use_cache=True)
        return h
