"""CDPruner (arXiv 2506.10967): a conditional DPP over the visual tokens, weighted by instruction relevance.

As the official code (``Theia-4869/CDPruner``: ``llava/model/llava_arch.py`` ``encode_images(images,
texts)``, ``multimodal_encoder/clip_encoder.py``): on the projector outputs, similarity ``S`` = cosine
of the tokens (fp32); relevance ``rel`` of each token to the instruction, min-max normalised
(``(rel - min + 1e-6) / (max - min)``); kernel ``L = rel_i S_ij rel_j``; greedy fast MAP inference of
the DPP (Cholesky-style incremental update) picks ``round(ratio * N)`` tokens, then sorted.

Relevance: the official code embeds the raw question with the CLIP text tower and the patches with
CLIP's visual projection, and uses the **negated** cosine averaged over text chunks
(``relevance="negated"``, the default, as the official code; ``"plain"`` flips it). Where no CLIP
text tower is at hand (every model here: the demo, Qwen and InternVL have none, and LLaVA's tower
ships without its text half), relevance is our extension: the cosine between each projected visual
token and the LLM's own input embeddings of the prompt text after the image, averaged over those
text tokens -- the same kind of quantity in the space the LLM reads, available on every model offline.

Deliberate differences: min-max normalisation per view (official: over the batch of crops of one
image); the text is the whole prompt after the image, template included (official: the raw question).
Per view on multi-view inputs; positions compact on LLaVA-style models, original on Qwen.
"""
from __future__ import annotations

import torch

from ..pruner import PrunerNeeds, PruningInputs, Reduction, TokenPruner, register_pruner, validate_choice, validate_ratio

RELEVANCE = ("negated", "plain")


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``[B, N, N]``: ``[B, k]`` items in the order picked
    (fast incremental Cholesky update, Chen et al. 2018, as CDPruner's official loop).

    Once the kernel's rank is used up (more items than feature dimensions), every remaining gain is
    ~0 and the official loop divides by ``sqrt(<= 0)``; we clamp that divisor and skip items already
    picked explicitly, so the remaining picks go by the largest (float-residual) gain instead of NaN.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    cis = kernel.new_zeros(k, b, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    picked = []
    for i in range(k):
        j = di2s.nan_to_num(nan=-1e30).masked_fill(chosen, float("-inf")).argmax(dim=-1)  # [B]
        picked.append(j)
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / di2s[rows, j].clamp_min(1e-12).sqrt()[:, None]
        cis[i] = eis
        di2s = di2s - eis.square()
        chosen[rows, j] = True
    return torch.stack(picked, dim=1)


@register_pruner("cdpruner")
class CDPrunerPruner(TokenPruner):
    """CDPruner: a conditional DPP over the projected tokens (similarity x instruction relevance), greedy MAP."""

    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, relevance: str = "negated"):
        self.ratio = validate_ratio(ratio)
        self.relevance = validate_choice(relevance, "relevance", RELEVANCE)

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(text=True)

    def relevance_scores(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` min-max normalised relevance of each token to the prompt text."""
        if inputs.text_tokens is None:
            raise ValueError("cdpruner needs the prompt text (text_tokens); the adapter did not provide it")
        v = inputs.tokens.float()
        t = inputs.text_tokens.float()
        mask = inputs.text_mask if inputs.text_mask is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        cos = (v / v.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)
        rel = (cos * mask[:, None, :]).sum(-1) / mask.sum(-1, keepdim=True).clamp_min(1)  # [B, N]
        if self.relevance == "negated":
            rel = -rel
        low, high = rel.amin(dim=-1, keepdim=True), rel.amax(dim=-1, keepdim=True)
        return (rel - low + 1e-6) / (high - low).clamp_min(1e-12)

    def select(self, inputs: PruningInputs) -> Reduction:
        k = self.num_kept(inputs.num_tokens, inputs.grid)
        x = inputs.tokens.float()
        x = x / x.norm(dim=-1, keepdim=True)
        rel = self.relevance_scores(inputs)
        kernel = rel[:, :, None] * (x @ x.transpose(1, 2)) * rel[:, None, :]
        return Reduction(indices=dpp_greedy_map(kernel, k).sort(dim=-1).values)
