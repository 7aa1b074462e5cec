"""Attention probabilities of ONE layer, for only the query rows a pruner needs.

``output_attentions=True`` would switch every layer to eager attention and return every map. We
instead point the chosen attention module (only that one) at a registered
``transformers.AttentionInterface`` function which computes ``softmax(q_rows k^T * scale + mask)``
for the requested rows, averages it over heads, stores it, and then hands the call to the
module's normal implementation (SDPA, FlashAttention, ...), so the layer's output is unchanged.
Every other layer never leaves its fast kernel.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .devices import run_as

RECORDING_IMPL = "tokenprune_record"
Rows = Literal["all", "last", "prefix"]


class _ConfigView:
    """Wraps a module's config so that only ``_attn_implementation`` reads differently."""

    def __init__(self, config: Any, impl: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def head_mean_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    heads: str = "mean") -> torch.Tensor:
    """Head-averaged ``softmax(q k^T * scale + mask)`` in fp32: ``[B, H, Q, d]``, ``[B, H_kv, L, d]``
    -> ``[B, Q, L]``. GQA key heads are repeated to their query heads (``repeat_kv``), which the
    official PyramidDrop and SparseVLM code omit. ``mask`` is ``[B, 1, Q, L]``, boolean or additive.
    ``heads="max"``: the largest probability over heads instead of the mean."""
    groups = query.shape[1] // key.shape[1]  # GQA: query heads per key head
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Q, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    return probs.amax(dim=1) if heads == "max" else probs.mean(dim=1)


def _record_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
    """Attention function: records the head-averaged probabilities (and keys), then runs the real kernel.

    ``query`` is ``[B, H, Lq, d]``, ``key`` ``[B, H_kv, Lk, d]`` (post-rotary); the mask (if any) is
    the 4-D one the module's normal implementation takes (boolean or additive, ``[B, 1, Lq, Lk]``).
    """
    rec: AttentionRecorder = module._tokenprune_recorder  # type: ignore[attr-defined]
    if rec.keep_keys:
        rec.keys.append(key)
    if rec.keep_values:
        rec.values.append(value)
    if rec.n_queries:  # -1: every row
        rec.queries.append(query if rec.n_queries < 0 else query[:, :, : rec.n_queries])
    if rec.rows is not None:
        lq, lk = query.shape[-2], key.shape[-2]
        if torch.is_tensor(rec.rows):  # [B, Q] query positions, per sample, on the caller's device
            index = rec.rows.to(query.device)  # (on a model split over devices, not the layer's)
        elif rec.rows == "last":
            index = torch.full((query.shape[0], 1), lq - 1, dtype=torch.long, device=query.device)
        elif rec.rows == "prefix":
            index = torch.arange(rec.n_prefix, device=query.device).expand(query.shape[0], -1)
        else:
            index = torch.arange(lq, device=query.device).expand(query.shape[0], -1)
        q = query.gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
        if attention_mask is not None:
            mask = attention_mask[..., : lk].expand(query.shape[0], 1, lq, lk)
            mask = mask.gather(2, index[:, None, :, None].expand(-1, 1, -1, lk))
        elif getattr(module, "is_causal", False) and lq > 1:
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            mask = causal[index][:, None]
        else:
            mask = None
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        rec.maps.append(head_mean_probs(q, key, mask, scale, rec.heads))  # [B, rows, Lk], head-averaged (or max)
    return rec.inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def input_attention(layer: nn.Module, hidden: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                    mask: torch.Tensor, rows: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """The attention ``layer`` would compute on ``hidden``, for query ``rows`` only: ``[B, Q, L]``.
    ``position_embeddings=None``: without the rotary embedding (PruneVid's scores); ``heads``: as
    :func:`head_mean_probs`.

    Used where a method scores with the *next* layer's attention before that layer runs on the
    reduced sequence (PyramidDrop). Runs the layer's own input norm, ``q_proj`` on the ``Q`` rows
    and ``k_proj`` on all ``L`` tokens (with its ``q_norm`` / ``k_norm`` where it has them), and its
    modeling file's ``apply_rotary_pos_emb``; no value
    or output projection, no MLP. ``hidden`` ``[B, L, D]``; ``mask`` ``[B, 1, L, L]`` boolean;
    ``rows`` ``[B, Q]`` positions.

    On a dispatched model (accelerate ``device_map``) this runs under the layer's hook
    (:func:`~tokenprune.adapters.devices.run_as`): inputs go to the layer's execution device,
    offloaded weights are loaded for the call; the result is on the layer's execution device.
    """
    attn = layer.self_attn
    rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or not hasattr(attn, "q_proj"):
        raise NotImplementedError(f"input attention is not supported for {type(attn).__name__}")
    # Only tensors go through the hook (it moves anything with a ``.to``, modules included).
    return run_as(layer, lambda *t: _input_attention(layer, rotary, *t, heads=heads), hidden, position_embeddings,
                  mask, rows)


def _input_attention(layer: nn.Module, rotary: Callable, hidden: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor,
                     rows: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """:func:`input_attention`'s arithmetic, every tensor on the layer's device."""
    attn = layer.self_attn
    b, length, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    xq = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(b, rows.shape[1], -1, head_dim)
    k = attn.k_proj(x).view(b, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3(-VL): per-head RMSNorm of q and k before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos_q = cos.gather(-2, rows[..., None].expand(-1, -1, cos.shape[-1]).expand(cos.shape[0], -1, -1))
        sin_q = sin.gather(-2, rows[..., None].expand(-1, -1, sin.shape[-1]).expand(sin.shape[0], -1, -1))
        q, _ = rotary(q, q, cos_q, sin_q)
        k, _ = rotary(k, k, cos, sin)
    row_mask = mask.gather(2, rows[:, None, :, None].expand(-1, 1, -1, length))
    return head_mean_probs(q, k, row_mask, attn.scaling, heads)


AttentionInterface.register(RECORDING_IMPL, _record_forward)


class AttentionRecorder:
    """What one recording captured: ``maps``, one ``[B, rows, Lk]`` map per call of the module,
    ``keys``, the post-rotary ``[B, H_kv, Lk, d]`` keys of each call, ``values`` its ``[B, H_kv, Lk, d]``
    values and ``queries`` its first ``n_queries`` query rows ``[B, H, n, d]`` (each only if asked).

    A module called once per image (Qwen2-VL's vision attention runs image by image) records one
    map per image, in order.
    """

    def __init__(self, rows: Rows | torch.Tensor | None, n_prefix: int, inner: Callable, keep_keys: bool = False,
                 keep_values: bool = False, n_queries: int = 0, heads: str = "mean"):
        self.rows = rows
        self.heads = heads
        self.n_prefix = n_prefix
        self.inner = inner
        self.keep_keys = keep_keys
        self.keep_values = keep_values
        self.n_queries = n_queries
        self.maps: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []
        self.query_mask: torch.Tensor | None = None  # [B, Q] real rows, set by a caller that chose the rows


@contextlib.contextmanager
def record_attention(module: nn.Module, rows: Rows | torch.Tensor | None = "all", n_prefix: int = 1,
                     keys: bool = False, values: bool = False, queries: int = 0,
                     heads: str = "mean") -> Iterator[AttentionRecorder]:
    """Record the head-averaged attention probabilities of ``module`` while the block runs.

    Args:
        module: an attention module that dispatches through ``self.config._attn_implementation``.
        rows: ``"all"`` query rows, only the ``"last"`` one, the first ``n_prefix`` (CLS) rows, a
            ``[B, Q]`` tensor of query positions per sample, or ``None`` for no map (keys only).
        n_prefix: number of rows for ``"prefix"``.
        keys: also keep the post-rotary keys the module computed.
        values: also keep its values.
        queries: also keep its first ``queries`` query rows (``-1``: every row), before any scaling.
        heads: ``"mean"`` (head-averaged maps) or ``"max"`` (the largest probability over heads).
    """
    config = module.config
    impl = config._attn_implementation or "sdpa"
    if impl == RECORDING_IMPL:
        raise RuntimeError("nested attention recording on one module")
    if impl in ALL_ATTENTION_FUNCTIONS:
        inner = ALL_ATTENTION_FUNCTIONS[impl]
    else:  # "eager" is each modeling file's own function, not a registered one
        inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    recorder = AttentionRecorder(rows, n_prefix, inner, keep_keys=keys, keep_values=values, n_queries=queries,
                                 heads=heads)
    module.config = _ConfigView(config, RECORDING_IMPL)
    module._tokenprune_recorder = recorder
    try:
        yield recorder
    finally:
        module.config = config
        del module._tokenprune_recorder
