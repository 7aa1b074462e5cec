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

RECORDING_IMPL = "tokenprune_record"
Rows = Literal["all", "last", "prefix"]


class _ConfigView:
    """Wraps a module's config so that only ``_attn_implementation`` reads differently."""

    def __init__(self, config: Any, impl: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _record_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
    """Attention function: records the head-averaged probabilities, then runs the real kernel.

    ``query`` is ``[B, H, Lq, d]``, ``key`` ``[B, H_kv, Lk, d]``; the mask (if any) is the 4-D one
    the module's normal implementation takes (boolean or additive, ``[B, 1, Lq, Lk]``).
    """
    rec: AttentionRecorder = module._tokenprune_recorder  # type: ignore[attr-defined]
    if rec.rows == "last":
        q, row_sel = query[:, :, -1:], slice(-1, None)
    elif rec.rows == "prefix":
        q, row_sel = query[:, :, : rec.n_prefix], slice(0, rec.n_prefix)
    else:
        q, row_sel = query, slice(None)
    groups = q.shape[1] // key.shape[1]  # GQA: query heads per key head
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, rows, Lk]
    if attention_mask is not None:
        mask = attention_mask[:, :, row_sel, : k.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    elif getattr(module, "is_causal", False) and q.shape[-2] > 1:
        lq, lk = query.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)[row_sel]
        scores = scores.masked_fill(~causal, float("-inf"))
    rec.maps.append(scores.softmax(dim=-1).mean(dim=1))  # [B, rows, Lk], head-averaged
    return rec.inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(RECORDING_IMPL, _record_forward)


class AttentionRecorder:
    """What one recording captured: a list of ``[B, rows, Lk]`` maps, one per call of the module.

    A module called once per image (Qwen2-VL's vision attention runs image by image) records one
    map per image, in order.
    """

    def __init__(self, rows: Rows, n_prefix: int, inner: Callable):
        self.rows = rows
        self.n_prefix = n_prefix
        self.inner = inner
        self.maps: list[torch.Tensor] = []


@contextlib.contextmanager
def record_attention(module: nn.Module, rows: Rows = "all", n_prefix: int = 1) -> Iterator[AttentionRecorder]:
    """Record the head-averaged attention probabilities of ``module`` while the block runs.

    Args:
        module: an attention module that dispatches through ``self.config._attn_implementation``.
        rows: ``"all"`` query rows, only the ``"last"`` one, or the first ``n_prefix`` (CLS) rows.
        n_prefix: number of rows for ``"prefix"``.
    """
    config = module.config
    impl = config._attn_implementation or "sdpa"
    if impl == RECORDING_IMPL:
        raise RuntimeError("nested attention recording on one module")
    if impl in ALL_ATTENTION_FUNCTIONS:
        inner = ALL_ATTENTION_FUNCTIONS[impl]
    else:  # "eager" is each modeling file's own function, not a registered one
        inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    recorder = AttentionRecorder(rows, n_prefix, inner)
    module.config = _ConfigView(config, RECORDING_IMPL)
    module._tokenprune_recorder = recorder
    try:
        yield recorder
    finally:
        module.config = config
        del module._tokenprune_recorder
