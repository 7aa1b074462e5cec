"""HoloV (NeurIPS'25, arXiv 2510.02912): a holistic, crop-wise budget over the visual tokens.

As the official code (``obananas/HoloV@1d2e65e``: ``llava/model/utils.py`` ``HoloV`` L22-151, called from
``llava/model/llava_arch.py`` L239 ``prepare_inputs_labels_for_multimodal``; the Qwen2.5-VL port
``qwen-model-HoloV/utils.py`` ``HoloV`` L43-198 and ``modeling_qwen2_5_vl.py``: the vision tower's
``forward`` L584-612, ``Qwen2_5_VLForConditionalGeneration.forward`` L1900-1923), on the
projector outputs (the LLM's input embeddings of the image), with a per-token attention vector ``a``:

1. **chunks**: the raster token sequence is cut into ``num_chunks`` contiguous 1-D chunks (the official
   "patches": 576 / 16 = 36 tokens, 1.5 grid rows each, not 2-D tiles); ``N % num_chunks`` leading
   chunks get one extra token; empty chunks (``N < num_chunks``) are skipped.
2. **chunk score**, per chunk of ``n >= 2`` tokens ``x``: ``S = cos(x_i, x_j)`` (``x / (|x| + 1e-6)``)
   with the diagonal zeroed; ``mean_i = sum_j S_ij / (n-1)``; ``var_i = sum_j (S_ij - mean_i)^2 / (n-1)``
   (the zeroed diagonal term included: an official quirk, kept); ``a' = 1e3 a``;
   ``scale = mean|a'| / (mean|var| + 1e-6)``; token score ``a' + alpha * var * scale`` (``alpha`` 0.09;
   the Qwen port's ``alpha 1, beta 0.09, power 1`` is the same formula); chunk score = its mean. A
   1-token chunk scores its raw ``a`` (not ``1e3 a``: official).
3. **allocation**: ``w = score / (sum score + 1e-6)``; ``alloc = floor(w K)``; the remaining
   ``K - sum alloc`` go +1 to the chunks of largest ``w``; a chunk with ``alloc >= n`` is kept whole
   **in raster order** and its excess is lost; otherwise its top-``alloc`` tokens **by attention alone**
   (not by token score), in descending attention order.
4. **output**: the kept tokens in chunk order, then **zero vectors** up to exactly ``K`` (fed to the LLM
   as tokens: official ``pad=zeros``).

Attention vector (``score``): ``auto`` -- towers with a CLS token (LLaVA-1.5 / NeXT's CLIP, InternVL's
InternViT): the CLS row of vision layer ``vision_layer`` (-2, the layer LLaVA's projector reads), mean
over heads (official ``encode_images`` L140-145: ``attentions[-2][:, :, 0, 1:]``, ``.mean(dim=1)``);
CLS-less towers (SigLIP, Qwen): the attention each patch **receives**, the map's column mean over every
query row (the Qwen port: ``attn.mean(heads).mean(query rows)``), or the adapter's ``vision_received``
where frames are pooled after the tower (LLaVA-OneVision / NeXT-Video video). Merged patches (Qwen 2x2,
InternVL pixel shuffle) are averaged per token (the Qwen port's ``view(N/4, 4).mean``), as
``fastervlm`` does. The Qwen2.5-VL port scores at the last block (31): pass ``vision_layer=-1`` there.

Budget: ``K = keep_count(ratio, N)`` (``N``: the view's tokens at scope ``frame``, the sample's at
``clip``); ``num_chunks="auto"`` is the Qwen port's formula ``max(1, int(((1024/576) * N) / K))``: 16 at
64/576 (the LLaVA file's hard-coded 16 and 64), 8 at 128/576, 5 at 192/576; an integer fixes it (16: the
LLaVA file verbatim at any budget).

==============  ===========================================  =============  ===========================================
option          official                                     default        what it does
==============  ===========================================  =============  ===========================================
``ratio``       ``new_image_token_num=64`` (LLaVA, hard-     ``0.5``        ``K = keep_count(ratio, N)`` tokens out,
                coded), ``keep_num = int(N*prune_rate)``                    padding included
                (Qwen)
``num_chunks``  ``num_patches=16`` (LLaVA), Qwen formula     ``"auto"``     1-D chunks; ``auto``: the Qwen formula
``alpha``       ``0.09`` (LLaVA ``alpha``, Qwen ``beta``)    ``0.09``       weight of the scaled similarity variance
``pad``         zero vectors up to ``K``                     ``"zeros"``    ``none``: only the real tokens (an
                                                                            adaptive count, ``<= K``)
``score``       CLS row (LLaVA), column mean (Qwen)          ``"auto"``     ``cls`` / ``column`` force one
``vision_layer`` ``-2`` (LLaVA), last block (Qwen)           ``-2``         the vision layer scored
==============  ===========================================  =============  ===========================================

Output: ``Reduction.tokens`` ``[B, K, D]`` in the official order (chunk order, attention-descending
inside a chunk, zeros last) in the first ``K`` placeholders (``indices = 0..K-1``), ``token_weights``
(one-hot rows, zero rows for the pads: Qwen3-VL's DeepStack features follow), ``positions`` the source
token of each (a pad: the last token, as the Qwen port's ``-1`` index does). Positions: the official
LLaVA code renumbers them (``compact``); the Qwen port gathers the original M-RoPE positions (``keep``).

Views: default scope ``clip`` -- one run over all the sample's prunable views concatenated, the official
LLaVA-NeXT rule (base view + unpadded crops, newlines left out, once with one ``K``); each view's
attention is its own (NeXT: each crop's CLS row). Our row newlines stay in place (never pruned; the
official code drops them). ``scope=frame``: each view on its own.

Deliberate differences: scores in fp32 (official: the similarity in the model dtype); ties (equal
attention inside a chunk, equal chunk weights for the remainder) go to the lower index (``torch.topk``
leaves them unspecified); batched (official: a Python loop per image and per chunk). Not reproduced: the
Qwen port's misalignments (its attention stays in window order while the tokens are in raster order, and
its image slice starts at ``<|vision_start|>``, one token early); ``ratio=1`` returns the view unchanged.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import OptionError
from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    keep_count,
    register_pruner,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

PADS = ("zeros", "none")
SCORES = ("auto", "cls", "column")
EPS = 1e-6  # the official ``esp``


def auto_chunks(n_tokens: int, k: int) -> int:
    """The Qwen port's chunk count (``qwen-model-HoloV/modeling_qwen2_5_vl.py`` L1915-1916),
    ``max(1, int(((1024/576) * N) / K))``: 16 when ``K/N = 64/576``, the LLaVA file's constants."""
    return max(1, int(((1024 / 576) * n_tokens) / k))


def chunk_layout(n_tokens: int, n_chunks: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The official 1-D chunks of ``n_tokens`` raster tokens: ``([P, L] token index, [P, L] valid)``, ``P`` the
    non-empty chunks, ``L`` the longest; chunk ``p`` has ``N // n_chunks + (p < N % n_chunks)`` tokens."""
    base, rem = divmod(n_tokens, n_chunks)
    p = n_chunks if base else rem  # chunks of 0 tokens are skipped
    sizes = base + (torch.arange(p, device=device) < rem).long()
    starts = sizes.cumsum(0) - sizes
    width = base + (1 if rem else 0)
    offset = torch.arange(width, device=device)
    valid = offset < sizes[:, None]
    return (starts[:, None] + offset).clamp_max(n_tokens - 1), valid


def chunk_scores(tokens: torch.Tensor, attn: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                 alpha: float) -> torch.Tensor:
    """HoloV's chunk scores ``[B, P]`` from tokens ``[B, N, D]``, attention ``[B, N]`` and the layout of
    :func:`chunk_layout` (``[P, L]``): the mean over a chunk of ``1e3 a + alpha * var * scale`` (fp32)."""
    x = tokens.float()[:, index]  # [B, P, L, D]
    a = attn.float()[:, index]  # [B, P, L]
    vf = valid.float()
    n = vf.sum(-1)  # [P] tokens per chunk
    f = x / (x.norm(dim=-1, keepdim=True) + EPS)
    eye = torch.eye(index.shape[1], dtype=torch.bool, device=x.device)
    # cosine with the diagonal zeroed, and the padding columns of short chunks zeroed too
    s = (f @ f.transpose(-1, -2)).masked_fill(eye, 0.0) * vf[:, None, :]  # [B, P, L, L]
    denom = (n - 1).clamp_min(1)[:, None]  # [P, 1]
    mean = s.sum(-1) / denom  # [B, P, L]
    var = (((s - mean[..., None]) ** 2) * vf[:, None, :]).sum(-1) / denom  # the zeroed diagonal counts (official)
    scaled = a * 1e3
    scale = ((scaled.abs() * vf).sum(-1) / n) / (((var.abs() * vf).sum(-1) / n) + EPS)  # [B, P]
    token_score = scaled + alpha * (var * scale[..., None])
    score = (token_score * vf).sum(-1) / n  # [B, P]
    return torch.where(n == 1, a[..., 0], score)  # a 1-token chunk: its raw attention (official)


def holov_select(tokens: torch.Tensor, attn: torch.Tensor, k: int, n_chunks: int, alpha: float = 0.09
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official rule for ``k`` tokens out of ``tokens`` ``[B, N, D]`` scored by ``attn`` ``[B, N]``.

    Returns ``(order [B, k] long, real [B, k] bool, chunk_scores [B, P])``: the token each output slot takes
    (chunk order, a chunk kept whole in raster order, else attention-descending) and whether the slot is a
    real token (``False``: a zero pad, the official padding to ``k``).
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    index, valid = chunk_layout(n, n_chunks, dev)
    p, width = index.shape
    scores = chunk_scores(tokens, attn, index, valid, alpha)  # [B, P]
    weights = scores / (scores.sum(-1, keepdim=True) + EPS)
    alloc = (weights * k).floor().long()
    remaining = k - alloc.sum(-1, keepdim=True)  # [B, 1]
    # +1 to the `remaining` largest weights (official topk(min(remaining, P)); ties: the lower chunk)
    rank = torch.sort(weights, dim=-1, descending=True, stable=True).indices.argsort(-1)
    alloc = alloc + (rank < remaining).long()
    sizes = valid.sum(-1)  # [P]
    whole = alloc >= sizes  # [B, P]: kept whole, in raster order; the excess is lost
    a = attn.float()[:, index].masked_fill(~valid, float("-inf"))  # [B, P, L]
    by_attention = torch.sort(a, dim=-1, descending=True, stable=True).indices
    raster = torch.arange(width, device=dev).expand(b, p, -1)
    within = torch.where(whole[..., None], raster, by_attention)  # [B, P, L] offsets in the chunk
    take = torch.arange(width, device=dev) < torch.minimum(alloc, sizes)[..., None]  # [B, P, L]
    source = index.expand(b, -1, -1).gather(2, within).flatten(1)  # [B, P*L] token of each candidate slot
    take = take.flatten(1)
    # the taken slots first, in chunk order (a stable sort keeps their order); P*L >= N >= k
    first = torch.sort((~take).to(torch.uint8), dim=-1, stable=True).indices[:, :k]
    return source.gather(1, first), take.gather(1, first), scores


@register_pruner("holov")
class HoloVPruner(TokenPruner):
    """HoloV: a token budget shared over 1-D chunks of the sequence by attention and similarity variance, the
    top tokens by attention per chunk, zero-padded to exactly K."""

    views = "global"  # the official LLaVA-NeXT rule: base + crops as one sequence
    clip_inputs = True  # at scope clip: the whole clip in one call, each view's own attention beside it
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, num_chunks: int | Literal["auto"] = "auto", alpha: float = 0.09,
                 pad: str = "zeros", score: str = "auto", vision_layer: int = -2):
        self.ratio = validate_ratio(ratio)
        if isinstance(num_chunks, str) and num_chunks != "auto":
            raise OptionError(f"num_chunks must be 'auto' or an integer >= 1, got {num_chunks!r}")
        self.num_chunks = num_chunks if num_chunks == "auto" else validate_int(num_chunks, "num_chunks", 1)
        self.alpha = validate_float(alpha, "alpha")
        if self.alpha < 0:
            raise OptionError(f"alpha must be >= 0 (the weight of the similarity variance), got {alpha!r}")
        self.pad = validate_choice(pad, "pad", PADS)
        self.score = validate_choice(score, "score", SCORES)
        self.vision_layer = validate_int(vision_layer, "vision_layer")

    @property
    def adaptive(self) -> bool:  # type: ignore[override]  (a class attribute elsewhere; here it follows pad)
        """``pad="none"``: the count is what the chunks give (at most ``K``), so the adapters run one view / clip
        per call and report what was kept."""
        return self.pad == "none"

    @property
    def needs(self) -> PrunerNeeds:
        # the column mean needs every query row; the CLS row alone only the prefix rows
        return PrunerNeeds(vision_attention_layer=self.vision_layer,
                           vision_attention_rows="prefix" if self.score == "cls" else "all")

    def chunks_for(self, n_tokens: int) -> int:
        """The chunk count for ``n_tokens`` tokens (``auto``: the Qwen port's formula on this budget)."""
        if self.num_chunks == "auto":
            return auto_chunks(n_tokens, keep_count(self.ratio, n_tokens))
        return self.num_chunks

    def _mode(self, prefix: int) -> str:
        if self.score == "auto":
            return "cls" if prefix >= 1 else "column"
        if self.score == "cls" and prefix < 1:
            raise OptionError("holov score='cls' needs a vision encoder with a CLS token, and this model's has none; "
                              "use score='auto' or 'column'")
        return self.score

    @staticmethod
    def _vector(attn: torch.Tensor, prefix: int, merge: int, n: int, mode: str) -> torch.Tensor:
        """``[..., n]`` from maps ``[..., R, T]``: the CLS row, or the column mean over every query row, over
        the patches (``T = prefix + n * merge``), averaged over each token's ``merge`` patches."""
        if mode == "cls":
            v = attn[..., 0, prefix:]
        else:
            if attn.shape[-2] != attn.shape[-1]:
                raise ValueError(f"holov's column mean needs every query row of the vision attention, got shape "
                                 f"{tuple(attn.shape)}")
            v = attn[..., prefix:].float().mean(dim=-2)
        if v.shape[-1] != n * merge:
            raise ValueError(f"vision attention covers {v.shape[-1]} patches, expected {n} tokens x patch_merge "
                             f"{merge}")
        return v.float().unflatten(-1, (n, merge)).mean(dim=-1)

    def view_scores(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` the attention vector of one view (scope ``frame``): the CLS row, or the attention received
        (``vision_received`` where the adapter pooled the patches after the tower)."""
        mode = self._mode(inputs.vision_prefix)
        if mode == "column" and inputs.vision_received is not None:
            return inputs.vision_received.float()
        if inputs.vision_attention is None:
            raise ValueError("holov needs vision_attention; the adapter did not provide it")
        return self._vector(inputs.vision_attention, inputs.vision_prefix, inputs.patch_merge, inputs.num_tokens, mode)

    def attention(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` each token's attention, from its own view's map at either scope."""
        given = getattr(inputs, "view_scores", None)  # a framework that scores each view for clip pruners
        if given is not None:
            return given.float()
        if inputs.view_attention is None:  # scope frame (or a bare PruningInputs)
            return self.view_scores(inputs)
        mode = self._mode(inputs.vision_prefix)
        if mode == "column" and inputs.vision_received is not None:
            return inputs.vision_received.float()
        maps = inputs.view_attention  # [B, V, R, T]: views of one shape
        b, v = maps.shape[:2]
        return self._vector(maps, inputs.vision_prefix, inputs.patch_merge, inputs.num_tokens // v, mode).reshape(b, -1)

    def select(self, inputs: PruningInputs) -> Reduction:
        b, n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        attn = self.attention(inputs)  # [B, N]
        if self.ratio >= 1.0:  # the unpruned view (the official rule at K = N keeps it too: one chunk, whole)
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1), scores=attn)
        k = self.num_kept(n, inputs.grid)
        order, real, _ = holov_select(inputs.tokens, attn, k, self.chunks_for(n), self.alpha)
        if self.pad == "none":
            counts = real.sum(-1).tolist()  # host sync: an adaptive count
            if len(set(counts)) > 1:
                raise OptionError(f"holov with pad='none' keeps an adaptive count per view, and views pruned in one "
                                  f"batch got different counts {counts}: run them one per batch")
            k = counts[0]
            order, real = order[:, :k], real[:, :k]
        tokens = inputs.tokens.gather(1, order[..., None].expand(-1, -1, inputs.tokens.shape[-1]))
        tokens = torch.where(real[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=dev))
        # one-hot rows over the view's tokens (zero rows for the pads), built in the tokens' dtype
        weights = inputs.tokens.new_zeros(b, k, n).scatter_(2, order[..., None], real[..., None].to(tokens.dtype))
        return Reduction(indices=torch.arange(k, device=dev).expand(b, -1), tokens=tokens, token_weights=weights,
                         positions=torch.where(real, order, n - 1), scores=attn)
