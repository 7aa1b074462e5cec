"""CDPruner (arXiv 2506.10967): a conditional DPP over the visual tokens, weighted by instruction relevance.

As the official code (``Theia-4869/CDPruner``: ``llava/model/llava_arch.py`` ``encode_images(images,
texts)``, ``multimodal_encoder/clip_encoder.py``): on the projector outputs, similarity ``S`` = cosine
of the tokens (fp32); relevance ``rel`` of each token to the instruction, min-max normalised
(``(rel - min + 1e-6) / (max - min)``); kernel ``L = rel_i S_ij rel_j``; greedy fast MAP inference of
the DPP (Cholesky-style incremental update) picks ``round(ratio * N)`` tokens, then sorted.

Relevance: the official code embeds the question with the CLIP text tower (77-token chunks) and the
patches with CLIP's visual projection of the post-layernorm layer -2 features, and uses the
**negated** cosine averaged over text chunks (``relevance="negated"``, the default, as the official
code; ``"plain"`` flips it). ``clip=CHECKPOINT`` (an HF CLIP folder or hub id: the model's own vision
tower's CLIP, e.g. ``openai/clip-vit-large-patch14-336`` for LLaVA-1.5) computes exactly that. Without
it (the default; the demo, Qwen and InternVL have no CLIP text tower at all) relevance is our
extension: the cosine between each projected visual token and the LLM's own input embeddings of the
prompt text after the image, averaged over those text tokens -- the same formula in the space the
LLM reads, available on every model offline.

Deliberate differences: min-max normalisation per view (official: over the batch of crops of one
image); the text is the prompt as given to ``generate`` (official: the question without the task's
answer-format suffix), and without ``clip`` its embeddings after the image, template included.
Per view on multi-view inputs; positions compact on LLaVA-style models, original on Qwen.
"""
from __future__ import annotations

import functools

import torch

from ..pruner import PrunerNeeds, PruningInputs, Reduction, TokenPruner, register_pruner, validate_choice, validate_ratio

RELEVANCE = ("negated", "plain")


@functools.lru_cache(maxsize=2)
def load_clip(name: str):
    """An HF CLIP checkpoint (local folder or hub id) and its tokenizer, loaded once per process."""
    from transformers import AutoTokenizer, CLIPModel

    from ..errors import TokenpruneError

    try:
        return CLIPModel.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise TokenpruneError(f"cdpruner: cannot load the CLIP checkpoint {name!r}: {str(exc).splitlines()[0][:200]}; "
                              "give a local folder or a reachable hub id (e.g. openai/clip-vit-large-patch14-336)") from None


@torch.no_grad()
def clip_text_embeds(model, tokenizer, text: str) -> torch.Tensor:
    """``[M, P]``: the text in chunks of the text tower's context (77), zero-padded, as the official code."""
    ids = tokenizer(text=[text], return_tensors="pt")
    context = model.text_model.config.max_position_embeddings
    segments = (ids["input_ids"].shape[1] - 1) // context + 1
    pad = context * segments - ids["input_ids"].shape[1]
    chunks = {k: torch.cat([v, v.new_zeros((1, pad))], 1).reshape(-1, context).to(model.device)
              for k, v in ids.items() if k in ("input_ids", "attention_mask")}
    return model.text_projection(model.text_model(**chunks).pooler_output)


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

    def __init__(self, ratio: float = 0.5, relevance: str = "negated", clip: str | None = None):
        self.ratio = validate_ratio(ratio)
        self.relevance = validate_choice(relevance, "relevance", RELEVANCE)
        self.clip = None if clip in (None, "", "none") else str(clip)

    @property
    def needs(self) -> PrunerNeeds:
        # With a CLIP checkpoint: its visual projection reads the vision features, its text tower the prompt.
        return PrunerNeeds(text=True, vision_features=self.clip is not None)

    def _clip_cosine(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` the official relevance: CLIP image embeddings vs the prompt's CLIP text embeddings."""
        from ..errors import OptionError

        if inputs.vision_features is None or inputs.prompts is None:
            raise ValueError("cdpruner with clip needs vision_features and prompts; the adapter did not provide them")
        model, tokenizer = load_clip(self.clip)
        feats = inputs.vision_features
        width = model.vision_model.config.hidden_size
        if feats.shape[-1] != width:
            raise OptionError(f"cdpruner: the CLIP checkpoint {self.clip!r} has vision width {width}, the model's vision "
                              f"features {feats.shape[-1]}: name the checkpoint of the model's own CLIP vision tower")
        model.to(feats.device)
        with torch.no_grad():
            image = model.visual_projection(model.vision_model.post_layernorm(feats.float()))  # [B, N, P]
            image = image / image.norm(dim=-1, keepdim=True)
            out = []
            for b, text in enumerate(inputs.prompts):
                t = clip_text_embeds(model, tokenizer, text).float()
                out.append((image[b] @ (t / t.norm(dim=-1, keepdim=True)).T).mean(-1))
        return torch.stack(out)

    def relevance_scores(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` min-max normalised relevance of each token to the prompt text."""
        if self.clip is not None:
            rel = self._clip_cosine(inputs)
        else:
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
        return Reduction(indices=dpp_greedy_map(kernel, k).sort(dim=-1).values, scores=rel)  # relevance
