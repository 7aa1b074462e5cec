"""FlowCut (NeurIPS'25, arXiv 2505.19536): progressive pruning inside the ViT by the CLS token's information flow.

As the official code ``TungChintao/FlowCut@a2ecd24`` (``flowcut/modeling_clip_flowcut.py``:
``CLIPAttention_forward``, ``CLIPEncoderLayer_forward``, ``CLIPEncoder_forward``, ``apply_flowcut_config``;
``flowcut/utils_flowcut.py``: ``compute_score``, ``adaptive_prune_ratio``; ``flowcut/main.py``: ``flowcut``),
stage ``in_vision``, after every block of the CLIP tower (hook point ``"block"``: after the MLP), while
the block's output holds more than ``target`` patch tokens:

* ``cls_attn = attn[:, :, 0, prefix:].mean(heads)``: the CLS row of the block's attention (softmax
  over *all* tokens, CLS included), head mean, patch columns;
* ``semantic = softmax_j(v_cls . v_j)`` per head, **unscaled** (no ``d ** -0.5``), softmax over all
  tokens, head mean, patch columns (``v`` = the block's ``v_proj`` outputs, bias included);
* ``score = (cls_attn / sum + semantic / sum) * ||mean_heads(v_j)||_1`` (``compute_score``);
* ``cum = score`` at the first such block, then the EMA ``cum = 0.5 cum + 0.5 score`` (carried in
  ``VisionState.memory`` and gathered along with the kept tokens);
* a cut at blocks whose remaining-prune-layer count ``rpl = (n_blocks - 2) - block`` is even:
  ``prune_num = round((N - target) / sqrt(rpl) * (1 - (H / log N) ** 2))`` with ``N`` the current
  patch count and ``H`` the entropy of the normalised ``cls_attn`` (``r`` maxed over the batch, as
  official, so every image keeps one count); at ``rpl = 0`` everything down to ``target``;
  ``keep = max(N - prune_num, target)`` patches: the top ``keep`` by ``cum``, in raster order
  (sorted), the CLS (prefix) tokens in front. Nothing is merged.

Schedule. The official ``select_layer = len(layers) - 2`` (22 on the 24-layer CLIP-L) and
``rpl = select_layer - idx - 1 = 21 - idx``: cuts after blocks 1, 3, ..., 21, the last one (``rpl = 0``) to
``target``, so block 22 -- whose output LLaVA's projector reads (``hidden_states[-2]``) -- runs on
exactly ``target`` patches. Here it is derived from ``n_blocks``, the blocks the tower runs through the
projector's feature layer (23 on LLaVA-1.5): ``rpl = max(n_blocks - 2, 0) - block`` (the same
schedule for LLaVA's ``-2``; a tower run for one block only cuts after it, where the official is
undefined). Hooks: blocks ``0 .. max(n_blocks - 2, 0)``; the scores are read at every one of them
(the EMA advances at odd ``rpl`` too), cuts happen at the even ones.

Budget. The official ``flowcut(model, target_num)`` sets ``target = target_num + 1`` for LLaVA's
``patch`` features (the ``+ 1`` is the CLS, kept to the end and dropped by ``feature_select``), and
the topk takes ``target - 1`` patches. Here ``VisionState.target = keep_count(ratio, P)`` counts patch
tokens only (``= target_num``), and the prefix is kept on top, so exactly ``keep_count(ratio, P)`` patch
tokens reach the projector (64 / 128 / 192 of 576 for ``ratio = 64/576, 128/576, 192/576``).

Options:

| option | official default | what it does |
| --- | --- | --- |
| ``ratio`` | ``128/576`` (``flowcut(model, target_num=128)``) | ``keep_count(ratio, P)`` patches reach the projector |
| ``llm_cut`` | ``True`` (installed for ``anyres``) | LLaVA-NeXT's cut after LLM layer 1 and its decode positions |

The EMA weight (0.5), the cut schedule (even ``rpl``) and the ``sqrt(rpl)`` / entropy law are
hard-coded in the official code and here.

Positions: the official LLaVA code renumbers the kept tokens (``compact``). Batches: each image of a
tower pass keeps its own tokens, but the intermediate counts are the pass's (``r`` is maxed over the
batch), so an image's selection would depend on the images batched with it (the final count would
not). The official evaluation runs one image at a time (LLaVA's ``model_vqa_loader``, batch 1), so
``image_by_image``: the adapter runs the tower image by image; the views of one LLaVA-NeXT image share a
pass, as in the official code.

Other towers: DINOv2 has a CLS like CLIP (the same rule). A tower with register tokens after the CLS
(``prefix > 1``): the CLS is row 0, the registers are kept like the CLS and never ranked, the softmaxes
run over all tokens and the normalisations over the patches (the official slices ``[1:]``).
SigLIP (no CLS, ``prefix = 0``): refused in one line. The official Qwen2-VL port's substitute
(``FlowCut_Qwen``: a mean query, ``softmax(mean_i(q_i) k^T / sqrt(d))`` per head, head mean, times
``||mean_h v||_1``, no semantic term) needs the block's per-head keys and the mean of all its query rows,
which the in-vision hooks do not record (they give head-averaged keys, head-averaged softmax rows and
the prefix's query rows only; the mean of softmax rows is not the softmax of the mean query).

Deliberate differences: (1) top-k ties go to the lower index (``topk_indices``; ``torch.topk``'s order
is unspecified). (2) The entropy uses ``0 log 0 = 0`` (``xlogy``): the official ``p * log(p)`` is NaN at
an exactly-zero attention weight (fp16 underflow) and ``int(nan)`` raises. (3) Scores in float32 (the
official: the tower's dtype, fp16 for LLaVA). (4) A cut that drops nothing (``prune_num = 0``) returns
``None`` (the official gathers every token, the identity).

LLaVA-NeXT (``flowcut/main.py`` ``flowcut`` for ``anyres``; ``flowcut/llava_arch.py``;
``flowcut/modeling_llama_flowcut.py`` ``LlamaModel_forward`` / ``LlamaSdpaAttention_forward``): every view of an
image keeps ``int(target_num / 2)`` patches in the tower (:meth:`FlowCutPruner.vision_view_target`), the crops'
survivors go back to the stitched grid with no row newlines (the adapter), and after LLM layer 1 the visual
tokens are cut to ``target_num`` by :func:`llm_scores` (``extra_stages``: ``in_llm`` at layer 2, and a
``DecodePlan(positions="final")`` shifting every layer's decode positions by the cut, as the official
``position_ids -= visual_token_num - target_num``). On LLaVA-1.5 the tower already brings ``target_num``, and the
LLM cut keeps everything (the official installs it for ``anyres`` only). ``llm_cut=False``: the tower stage alone.
"""
from __future__ import annotations

import torch

from ..errors import OptionError
from ..in_vision import VisionHook, VisionReduction, VisionState
from ..pruner import (DecodePlan, LLMStage, PrunerNeeds, PruningInputs, Reduction, Stage, TokenPruner, keep_count,
                      register_pruner, topk_indices, validate_int, validate_ratio)

MEMORY_KEY = "flowcut_cumulative"  # VisionState.memory: [B, N_cur] EMA of the scores of the current patches
EMA = 0.5  # official: cumulative_scores = 0.5 * cumulative_scores + 0.5 * scores
LLM_PRUNE_LAYER = 1  # official NeXT: model.model.prune_layer = 1 (the cut follows layer 1; layer 2 sees target_num)


def final_cut_block(n_blocks: int) -> int:
    """The block after which the last cut (``rpl = 0``, down to ``target``) happens: ``max(n_blocks - 2, 0)``.

    Official: ``select_layer - 1`` with ``select_layer = len(layers) - 2``; for LLaVA's feature layer -2
    (``n_blocks = len(layers) - 1``) that is ``n_blocks - 2``, so the feature block runs on ``target`` tokens.
    """
    return max(validate_int(n_blocks, "n_blocks", minimum=1) - 2, 0)


def remaining_prune_layers(block: int, n_blocks: int) -> int:
    """The official ``rpl`` (``remain_prune_layer``) of ``block``: ``final_cut_block(n_blocks) - block``; a
    cut happens where it is even and ``>= 0``."""
    return final_cut_block(n_blocks) - block


def semantic_attention(values: torch.Tensor) -> torch.Tensor:
    """FlowCut's semantic term: ``[B, H, T, d]`` per-head values (CLS first) -> ``[B, T]``, the head mean of
    ``softmax_j(v_0 . v_j)`` per head -- **unscaled**, over all ``T`` tokens (official ``CLIPAttention_forward``:
    ``softmax(bmm(cls_value, value_states^T)).view(bsz, heads, src_len).mean(1)``)."""
    v = values.float()
    logits = torch.einsum("bhd,bhtd->bht", v[:, :, 0], v)  # [B, H, T]
    return logits.softmax(dim=-1).mean(dim=1)


def flow_scores(cls_attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Official ``compute_score``: ``(cls_attn / sum + semantic / sum) * ||v||_1``.

    Args:
        cls_attention: ``[B, N]`` the CLS row's head-averaged attention to the ``N`` patches.
        semantic: ``[B, N]`` :func:`semantic_attention` at the patches.
        values: ``[B, N, d]`` the patches' values averaged over heads.

    Returns:
        ``[B, N]`` float32 scores (higher: keep).
    """
    relation = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    semantic = semantic / semantic.sum(dim=-1, keepdim=True)
    return (relation + semantic) * torch.norm(values, p=1, dim=-1)


def llm_scores(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, text_value: torch.Tensor) -> torch.Tensor:
    """FlowCut's score at LLM layer 1 (official ``LlamaSdpaAttention_forward``, the ``prune_kwargs`` branch).

    Args:
        query: ``[B, H, d]`` the last prompt token's post-rotary query.
        keys: ``[B, N, H_kv, d]`` the visual tokens' post-rotary keys.
        values: ``[B, N, H_kv, d]`` their values.
        text_value: ``[B, H_kv, d]`` the last prompt token's value.

    Returns:
        ``[B, N]``: ``compute_score(relation, semantic, mean_h v)`` with ``relation = mean_h softmax_j(q k_j /
        sqrt d)`` and ``semantic = mean_h softmax_j(v_last v_j / sqrt d)``, both softmaxes over the visual tokens
        only, GQA key/value heads repeated to the query heads (``repeat_kv``), float32.
    """
    groups = query.shape[1] // keys.shape[2]
    k = keys.float().repeat_interleave(groups, dim=2)  # [B, N, H, d]
    v = values.float().repeat_interleave(groups, dim=2)
    tv = text_value.float().repeat_interleave(groups, dim=1)  # [B, H, d]
    scale = query.shape[-1] ** -0.5
    relation = (torch.einsum("bhd,bnhd->bhn", query.float(), k) * scale).softmax(-1).mean(1)  # [B, N]
    semantic = (torch.einsum("bhd,bnhd->bhn", tv, v) * scale).softmax(-1).mean(1)
    return flow_scores(relation, semantic, v.mean(dim=2))


def prune_count(cls_attention: torch.Tensor, rpl: int, target: int) -> int:
    """Official ``adaptive_prune_ratio``: patches to drop at a cut with ``rpl > 0`` remaining prune layers.

    ``r = (N - target) / sqrt(rpl) * (1 - (H / log N) ** 2)``, ``H`` the entropy of the normalised
    ``cls_attention`` ``[B, N]``; the batch's largest ``r``, rounded (half to even, ``torch.round``).
    ``0 log 0 = 0`` (the official ``p * log(p)`` would give NaN). One host sync: the count sets the
    sequence length.
    """
    n = cls_attention.shape[-1]
    prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    entropy = -torch.special.xlogy(prob, prob).sum(dim=-1)
    entropy_ratio = entropy / torch.log(torch.tensor(n))  # a CPU scalar, as official (float32)
    r = (n - target) / rpl ** 0.5 * (1 - entropy_ratio ** 2)
    return int(r.max().round())


@register_pruner("flowcut")
class FlowCutPruner(TokenPruner):
    """FlowCut: progressive pruning inside the ViT by CLS attention, CLS-value similarity and value norms (EMA)."""

    stage = Stage.IN_VISION
    scopes = ("frame",)  # each image's own tower pass and budget
    image_by_image = True  # the cut sizes are the pass's largest: one image per tower pass, as the official eval
    position_policy = "compact"  # official LLaVA: the kept tokens renumbered
    position_policy_mrope = "keep"  # official Qwen2-VL port: original M-RoPE positions

    extra_stages = (Stage.IN_LLM, Stage.DECODE)  # LLaVA-NeXT's second cut after LLM layer 1 and its decode positions

    def __init__(self, ratio: float = 128 / 576, llm_cut: bool = True):
        self.ratio = validate_ratio(ratio)
        if not isinstance(llm_cut, bool):
            raise OptionError(f"llm_cut must be true or false, got {llm_cut!r}")
        self.llm_cut = llm_cut

    def vision_view_target(self, patches: int, image_tokens: int, n_views: int) -> int:
        """Official ``flowcut(model, target_num)``: one view keeps ``target_num`` patches; an anyres image's
        views keep ``int(target_num / 2)`` each (``target_num = keep_count(ratio, image_tokens)``, the image's
        visual tokens: base view + unpadded crops), and the LLM layer-1 cut brings the image to ``target_num``."""
        if n_views <= 1:
            return keep_count(self.ratio, patches)
        return keep_count(self.ratio, image_tokens) // 2

    @property
    def needs(self) -> PrunerNeeds:
        """The LLM cut: layer 1's last-row query, keys and values, the cut seen from layer 2 on."""
        if not self.llm_cut:
            return PrunerNeeds()
        return PrunerNeeds(llm_stages=(LLMStage(layer=LLM_PRUNE_LAYER + 1, queries="last", qkv=True),))

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        """``[target_num]``: the LLM cut keeps ``keep_count(ratio, N)`` of the image's ``N`` tokens."""
        return [keep_count(self.ratio, n_tokens)] if self.llm_cut else []

    def decode_plan(self, n_layers: int) -> DecodePlan | None:
        """Every layer's decode positions shifted by what the LLM cut removed (``position_ids -= visual_token_num
        - target_num``), the full caches of layers 0-1 included."""
        return DecodePlan(positions="final") if self.llm_cut else None

    def vision_hooks(self, n_blocks: int) -> tuple[VisionHook, ...]:
        """After each block ``0 .. max(n_blocks - 2, 0)``: its CLS attention row and its per-head values."""
        return tuple(VisionHook(block=i, point="block", attention="prefix", values=True)
                     for i in range(final_cut_block(n_blocks) + 1))

    def select(self, state):
        """A tower step (:class:`~tokenprune.in_vision.VisionState`) or the LLM cut
        (:class:`~tokenprune.pruner.PruningInputs`)."""
        if isinstance(state, PruningInputs):
            return self._llm_cut(state)
        return self._tower_step(state)

    def _llm_cut(self, inputs: PruningInputs) -> Reduction:
        """After LLM layer 1: keep the top ``target_num = keep_count(ratio, num_placeholders)`` visual tokens by
        :func:`llm_scores`, in sequence order; every token when the tower already brought no more (LLaVA-1.5:
        the official runs no LLM cut there, and ``visual_token_num <= target_num`` skips it)."""
        n = inputs.num_tokens
        b = inputs.batch_size
        dev = inputs.tokens.device
        target = keep_count(self.ratio, inputs.num_placeholders or n)
        if n <= target:
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1))
        if inputs.llm_queries is None or inputs.llm_values is None or inputs.llm_keys is None:
            raise ValueError("flowcut's LLM cut needs layer 1's query, keys and values (LLMStage qkv)")
        keys = inputs.llm_keys.unflatten(2, inputs.llm_values.shape[2:])  # [B, N, H_kv, d]
        scores = llm_scores(inputs.llm_queries[:, -1], keys, inputs.llm_values, inputs.text_values[:, -1])
        return Reduction(indices=topk_indices(scores, target), scores=scores)

    def _tower_step(self, state: VisionState) -> VisionReduction | None:
        """One FlowCut step after block ``state.block``: update the EMA; at an even ``rpl`` keep the top patches.

        Reads ``state.attention`` ``[B, prefix, T]`` (row 0: the CLS) and ``state.values`` ``[B, H, T, d]``.
        Returns ``None`` where nothing is cut (``ratio`` 1, odd ``rpl``, ``target`` reached); else the
        reduction keeping the prefix and ``keep`` patches in raster order, with ``scores`` the EMA
        (``NaN`` at the prefix, which is never ranked).
        """
        p = state.prefix
        if p < 1:
            raise OptionError("flowcut scores patches by the CLS token's attention and value, and this tower has no "
                              "CLS token (SigLIP): use a CLIP-tower model (LLaVA-1.5 / NeXT) or another method")
        t = state.num_tokens
        n = t - p
        if n <= state.target:  # official: `if hidden_states.shape[1] > target` (target counting the CLS)
            return None
        if state.attention is None or state.values is None:
            raise ValueError("flowcut needs the block's CLS attention row and values; the adapter did not provide them")
        cls_attention = state.attention[:, 0, p:].float()  # [B, N]
        semantic = semantic_attention(state.values)[:, p:]  # [B, N]
        values = state.values.float().mean(dim=1)[:, p:]  # [B, N, d]
        scores = flow_scores(cls_attention, semantic, values)
        cumulative = state.memory.get(MEMORY_KEY)
        if cumulative is not None and cumulative.shape != scores.shape:
            raise ValueError(f"flowcut's running scores cover {tuple(cumulative.shape)} tokens but block {state.block} "
                             f"has {tuple(scores.shape)}: another reduction ran between its hooks")
        cumulative = scores if cumulative is None else EMA * cumulative + (1 - EMA) * scores
        state.memory[MEMORY_KEY] = cumulative
        rpl = remaining_prune_layers(state.block, state.n_blocks)
        if rpl < 0 or rpl % 2:
            return None
        prune_num = prune_count(cls_attention, rpl, state.target) if rpl else t
        keep = max(n - prune_num, state.target)
        if keep >= n:  # nothing dropped (the official gathers every patch: the identity)
            return None
        kept = topk_indices(cumulative, keep)  # [B, keep], raster order
        state.memory[MEMORY_KEY] = cumulative.gather(1, kept)
        b = kept.shape[0]
        dev = kept.device
        indices = torch.cat([torch.arange(p, device=dev).expand(b, -1), kept + p], dim=1)
        shown = torch.cat([cumulative.new_full((b, p), float("nan")), cumulative], dim=1)
        return VisionReduction.keep(indices, t, scores=shown)
