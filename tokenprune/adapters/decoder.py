"""Prefill and cached greedy decoding over a Hugging Face decoder, with in-LLM pruning.

We run the decoder layers ourselves instead of calling ``generate``: position ids with gaps
(pruned tokens keep their original positions), per-layer sequence lengths (FastV drops tokens
from layer K on, so layers >= K cache fewer keys) and per-layer attention masks are not
expressible through ``generate``. Each layer is the model's own module, called exactly as its
parent model calls it; masks are 4-D boolean ``[B, 1, Lq, Lk]`` (SDPA's format).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..pruner import PruningInputs, TokenPruner
from .attention import record_attention


@dataclass
class LLMInputs:
    """One left-padded batch ready for the decoder.

    Attributes:
        embeds: ``[B, L, D]`` input embeddings (visual tokens already in place).
        mask: ``[B, L]`` bool, ``False`` for left padding.
        positions: ``[B, L]`` (1-D RoPE) or ``[3, B, L]`` (M-RoPE) position ids.
        image_mask: ``[B, L]`` bool, ``True`` at visual tokens (for in-LLM pruners and stats).
        sample_ids: one id per sample (seeds random in-LLM pruners).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    image_mask: torch.Tensor
    sample_ids: list[str]


@dataclass
class DecodeResult:
    """Output of :meth:`DecoderRunner.generate`.

    Attributes:
        tokens: ``[B, T]`` generated ids (``pad_id`` after a sample's end).
        first_logits: ``[B, V]`` float logits of the first generated token (exactness tests).
        prefill_tokens: ``[B, n_layers]`` tokens each decoder layer saw at prefill, per sample.
        visual_tokens: ``[B, n_layers]`` visual tokens among them.
        new_tokens: ``[B]`` generated tokens up to and including EOS.
    """

    tokens: torch.Tensor
    first_logits: torch.Tensor
    prefill_tokens: torch.Tensor
    visual_tokens: torch.Tensor
    new_tokens: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


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


def prune_layer(pruner: TokenPruner | None) -> int | None:
    """The decoder layer an in-LLM pruner acts before: the one after the layer whose attention it reads."""
    if pruner is None or pruner.needs.llm_attention_layer is None:
        return None
    return pruner.needs.llm_attention_layer + 1


class DecoderRunner:
    """Runs a decoder (``layers``, ``norm``, ``rotary_emb``, ``embed_tokens``) and its LM head.

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

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` embeddings."""
        return self.model.embed_tokens(ids)

    # -- one forward over a (part of a) sequence ------------------------------------------------
    def _run_layers(self, h, mask, positions, image_mask, cache, pruner, keep_fixed, sample_ids, q_len):
        """Run every layer; returns the last hidden state and per-layer token/visual counts.

        ``mask`` / ``positions`` / ``image_mask`` describe the keys of this forward (the whole
        cache for a decode step). When ``pruner`` is set, FastV-style selection happens before
        layer ``K``; ``keep_fixed`` (``[B, L]`` bool over the prefix) replays an earlier selection.
        """
        n_layers = len(self.layers)
        k_layer = prune_layer(pruner)
        tokens, visual = [], []
        pe = self.model.rotary_emb(h, positions[..., -q_len:] if q_len < positions.shape[-1] else positions)
        mask4 = causal_mask_4d(mask, q_len)
        selection, rec = None, None  # rec: layer K-1's recorded attention, read at layer K
        for i, layer in enumerate(self.layers):
            if k_layer is not None and i == k_layer and i < n_layers:
                keep = keep_fixed if keep_fixed is not None else self._select(pruner, rec, mask, image_mask, sample_ids)
                keep = keep & mask
                selection = keep
                index = left_pack(keep)
                h = gather_seq(h, index, 1)
                mask, image_mask = gather_seq(keep, index, 1), gather_seq(image_mask, index, 1)
                positions = gather_seq(positions, index, positions.dim() - 1)
                pe = self.model.rotary_emb(h, positions)
                mask4 = causal_mask_4d(mask, h.shape[1])
            tokens.append(mask.sum(1))
            visual.append((image_mask & mask).sum(1))
            want = k_layer is not None and keep_fixed is None and i == k_layer - 1
            if want:
                rows = pruner.needs.llm_attention_queries
                with record_attention(layer.self_attn, rows="last" if rows == "last" else "all") as rec:
                    h = layer(h, attention_mask=mask4, position_embeddings=pe, past_key_values=cache, use_cache=cache is not None)
            else:
                h = layer(h, attention_mask=mask4, position_embeddings=pe, past_key_values=cache, use_cache=cache is not None)
        return h, torch.stack(tokens, 1), torch.stack(visual, 1), selection

    def _select(self, pruner: TokenPruner, rec, mask, image_mask, sample_ids) -> torch.Tensor:
        """Run the in-LLM pruner on the recorded attention; ``[B, L]`` bool of tokens to keep."""
        attn = rec.maps[0]  # [B, rows, L]
        keep = mask & ~image_mask
        n_img = image_mask.sum(1)
        # Samples with the same number of visual tokens are pruned as one batch.
        for n in torch.unique(n_img).tolist():
            if n == 0:
                continue  # no visual tokens (a text-only sample): nothing to prune
            rows = (n_img == n).nonzero().flatten()
            img_pos = left_pack(image_mask[rows])  # [b, n] positions of the visual tokens, in order
            sub = attn[rows]
            scores = sub.gather(2, img_pos[:, None, :].expand(-1, sub.shape[1], -1))  # [b, rows, n]
            row_mask = mask[rows] if scores.shape[1] == mask.shape[1] else torch.ones(len(rows), 1, dtype=torch.bool, device=mask.device)
            red = pruner(PruningInputs(
                tokens=torch.zeros(len(rows), n, 1, device=mask.device), grid=(1, n),
                sample_ids=[sample_ids[r] for r in rows.tolist()], llm_attention=scores, llm_query_mask=row_mask,
            ))
            kept = img_pos.gather(1, red.indices)
            keep[rows.unsqueeze(1), kept] = True
        return keep

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h[:, -1:])).float()[:, 0]

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int, pruner: TokenPruner | None = None,
                 use_cache: bool = True, ignore_eos: bool = False) -> DecodeResult:
        """Greedy decoding of up to ``max_new_tokens`` per sample.

        With ``use_cache=False`` every step re-runs the whole (pruned) sequence: the reference
        that cached decoding must match. An in-LLM pruner selects once, at prefill; the reference
        replays that selection, as the cache does. ``ignore_eos`` always decodes
        ``max_new_tokens`` (fixed-length latency runs, decoding tests).
        """
        b = inputs.embeds.shape[0]
        device = inputs.embeds.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        eos = self.eos_ids.to(device) if not ignore_eos else torch.empty(0, dtype=torch.long, device=device)
        cache = DynamicCache() if use_cache else None
        h, n_tok, n_vis, keep = self._run_layers(inputs.embeds, inputs.mask, inputs.positions, inputs.image_mask,
                                                 cache, pruner, None, inputs.sample_ids, inputs.embeds.shape[1])
        logits = self._logits(h)
        first_logits = logits
        sync()  # timing boundaries only: never inside the decode loop
        t_prefill = time.perf_counter()
        out = torch.full((b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        new_tokens = torch.zeros(b, dtype=torch.long, device=device)
        # Decode positions continue after the largest prompt position (M-RoPE: over all 3 axes).
        flat_pos = inputs.positions.reshape(-1, *inputs.positions.shape[-2:]).amax(0)  # [B, L]
        next_pos = flat_pos.masked_fill(~inputs.mask, -1).amax(1) + 1  # [B]
        full_mask, full_pos, full_img = inputs.mask, inputs.positions, inputs.image_mask
        embeds = inputs.embeds
        keep_mask = keep  # [B, L] over the prompt, or None
        pruned_mask = None
        if keep is not None:
            pruned_mask = gather_seq(keep, left_pack(keep), 1)
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            out[:, step] = token
            new_tokens += (~finished).long()
            finished = finished | torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):  # one host sync per step, as HF does
                break
            tok_emb = self.embed(token[:, None])
            pos = (next_pos + step).view(1, b, 1).expand(*full_pos.shape[:-2], b, 1) if full_pos.dim() == 3 else (next_pos + step)[:, None]
            one = torch.ones(b, 1, dtype=torch.bool, device=device)
            full_mask = torch.cat([full_mask, one], 1)
            full_pos = torch.cat([full_pos, pos], -1)
            full_img = torch.cat([full_img, ~one], 1)
            if use_cache:
                h = self._decode_step(tok_emb, full_mask, pos, pruned_mask, cache, prune_layer(pruner))
                if pruned_mask is not None:
                    pruned_mask = torch.cat([pruned_mask, one], 1)
            else:
                embeds = torch.cat([embeds, tok_emb], 1)
                if keep_mask is not None:
                    keep_mask = torch.cat([keep_mask, one], 1)
                h, _, _, _ = self._run_layers(embeds, full_mask, full_pos, full_img, None, pruner, keep_mask,
                                              inputs.sample_ids, embeds.shape[1])
            logits = self._logits(h)
        sync()
        t_end = time.perf_counter()
        return DecodeResult(tokens=out, first_logits=first_logits, prefill_tokens=n_tok, visual_tokens=n_vis,
                            new_tokens=new_tokens, timings={"prefill": t_prefill - t0, "decode": t_end - t_prefill})

    def _decode_step(self, tok_emb, full_mask, pos, pruned_mask, cache, k_layer):
        """One cached step: layers < K attend over the full cache, layers >= K over the pruned one."""
        pe = self.model.rotary_emb(tok_emb, pos)
        mask_full = full_mask[:, None, None, :]
        mask_pruned = None
        if pruned_mask is not None:
            mask_pruned = torch.cat([pruned_mask, torch.ones_like(pruned_mask[:, :1])], 1)[:, None, None, :]
        h = tok_emb
        for i, layer in enumerate(self.layers):
            m = mask_pruned if (mask_pruned is not None and i >= k_layer) else mask_full
            h = layer(h, attention_mask=m, position_embeddings=pe, past_key_values=cache, use_cache=True)
        return h
