"""FlowCut (``flowcut``): a hand-computed three-hook sequence; the official rule transcribed from
TungChintao/FlowCut@a2ecd24 (cited per function) and driven, on random attention and values, over the full
LLaVA-1.5 schedule (577 tokens, 24 layers, 23 run; 192/128/64 patches), and, on real tiny CLIP towers
(3 and 8 blocks), against :func:`run_tower`: identical kept patches at every step, features <= 1e-5,
exact final counts; ratio 1.0 is a no-op; bad options and CLS-less towers refused in one line."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput

import tokenprune.methods.flowcut as fc  # registers "flowcut" (methods/__init__.py does not import it yet)
from tokenprune.adapters.attention import head_mean_probs
from tokenprune.adapters.vision_blocks import apply_reduction, run_tower
from tokenprune.errors import OptionError
from tokenprune.in_vision import VisionHook, VisionState
from tokenprune.pruner import Stage, create_pruner, keep_count
from tokenprune.zoo.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# -- the official code, transcribed ----------------------------------------------------------------------
# TungChintao/FlowCut@a2ecd24. Verbatim, but for docstrings and commented-out code left out and the marked
# lines; the old transformers CLIPAttention API it was written against (`self._shape`, `self.scale`) is
# provided by the shims further below.

def compute_score(cls_attn, semantic_attn, value):  # flowcut/utils_flowcut.py `compute_score`

    relation_score = cls_attn/cls_attn.sum(dim=-1, keepdim=True)
    semantic_score = semantic_attn/semantic_attn.sum(dim=-1, keepdim=True)

    final_score = (relation_score + semantic_score) * torch.norm(value, p=1, dim=-1)#/value.shape[-1]

    return final_score


def adaptive_prune_ratio(attn,rpl,target_num):  # flowcut/utils_flowcut.py `adaptive_prune_ratio`

    N = attn.shape[-1]

    prob = attn/attn.sum(dim=-1,keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    entropy_max = torch.log(torch.tensor(N))
    entropy_ratio = entropy/entropy_max

    r = (N-target_num)/rpl**0.5 * (1-entropy_ratio**2)
    if r.shape[0] > 1: r = r.max(0).values

    return int(r.round())


def CLIPAttention_forward(  # flowcut/modeling_clip_flowcut.py `CLIPAttention_forward` (L14-97)
    self,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    causal_attention_mask: Optional[torch.Tensor] = None,
    output_attentions: Optional[bool] = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Tuple[torch.Tensor]]]:
    """Input shape: Batch x Time x Channel"""

    bsz, tgt_len, embed_dim = hidden_states.size()
    # get query proj
    query_states = self.q_proj(hidden_states) * self.scale
    key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
    value_states = self._shape(self.v_proj(hidden_states), -1, bsz)

    value_metric = value_states.clone()

    proj_shape = (bsz * self.num_heads, -1, self.head_dim)
    query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    value_states = value_states.view(*proj_shape)

    src_len = key_states.size(1)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))

    cls_value = value_states[:,:1]
    semantic_weight = torch.bmm(cls_value, value_states.transpose(1,2))

    if attn_weights.size() != (bsz * self.num_heads, tgt_len, src_len):
        raise ValueError(
            f"Attention weights should be of size {(bsz * self.num_heads, tgt_len, src_len)}, but is"
            f" {attn_weights.size()}"
        )

    # apply the causal_attention_mask first
    if causal_attention_mask is not None:
        if causal_attention_mask.size() != (bsz, 1, tgt_len, src_len):
            raise ValueError(
                f"Attention mask should be of size {(bsz, 1, tgt_len, src_len)}, but is"
                f" {causal_attention_mask.size()}"
            )
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + causal_attention_mask
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)

    if attention_mask is not None:
        if attention_mask.size() != (bsz, 1, tgt_len, src_len):
            raise ValueError(
                f"Attention mask should be of size {(bsz, 1, tgt_len, src_len)}, but is {attention_mask.size()}"
            )
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)


    attn_weights = nn.functional.softmax(attn_weights, dim=-1)

    semantic_attn = nn.functional.softmax(semantic_weight, dim=-1).view(bsz, self.num_heads, src_len)

    if output_attentions:
        # this operation is a bit akward, but it's required to
        # make sure that attn_weights keeps its gradient.
        # In order to do so, attn_weights have to reshaped
        # twice and have to be reused in the following
        attn_weights_reshaped = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights_reshaped.view(bsz * self.num_heads, tgt_len, src_len)
    else:
        attn_weights_reshaped = None

    attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)

    attn_output = torch.bmm(attn_probs, value_states)

    if attn_output.size() != (bsz * self.num_heads, tgt_len, self.head_dim):
        raise ValueError(
            f"`attn_output` should be of size {(bsz, self.num_heads, tgt_len, self.head_dim)}, but is"
            f" {attn_output.size()}"
        )

    attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
    attn_output = attn_output.transpose(1, 2)
    attn_output = attn_output.reshape(bsz, tgt_len, embed_dim)

    attn_output = self.out_proj(attn_output)

    return attn_output, attn_weights_reshaped, semantic_attn.mean(1), value_metric.mean(1)


def CLIPEncoderLayer_forward(  # flowcut/modeling_clip_flowcut.py `CLIPEncoderLayer_forward` (L100-172)
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    causal_attention_mask: torch.Tensor,
    output_attentions: Optional[bool] = False,
    target: int = 577,
    rpl: int = 22,
    cumulative_scores: torch.Tensor = None,
    all_keep_indices: torch.Tensor = None,
) -> Tuple[torch.FloatTensor]:
    residual = hidden_states

    hidden_states = self.layer_norm1(hidden_states)
    hidden_states, attn_weights, semantic_attn, v_metric = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        causal_attention_mask=causal_attention_mask,
        output_attentions=output_attentions,
    )
    hidden_states = residual + hidden_states

    residual = hidden_states
    hidden_states = self.layer_norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states

    # ==================================== FlowCut ========================================== #
    if hidden_states.shape[1] > target:

        cls_attention = attn_weights[:, :, 0, 1:].mean(dim=1)        # [B, N]

        scores = compute_score(cls_attention, semantic_attn[:,1:], v_metric[:,1:])  # [B, N]
        if cumulative_scores is None:
            cumulative_scores = scores.clone()
        else:
            cumulative_scores = 0.5*cumulative_scores+0.5*scores

        if not rpl%2:

            prune_num = adaptive_prune_ratio(cls_attention,rpl,target-1) if rpl else hidden_states.shape[1]
            target_num = max(hidden_states.shape[1]-prune_num, target)

            # keep 1 position for cls token
            _, keep_indices = torch.topk(cumulative_scores, target_num-1, dim=1)  # [B, target_num-1]

            keep_indices = keep_indices.sort(dim=1).values
            topk_states = torch.gather(hidden_states[:,1:,:], dim=1, index=keep_indices.unsqueeze(-1).expand(-1,-1,hidden_states.size(-1)))
            cumulative_scores = torch.gather(cumulative_scores, dim=1, index=keep_indices)
            cls_token = hidden_states[:,:1,:]

            all_keep_indices = torch.gather(all_keep_indices, dim=1, index=keep_indices)

            hidden_states = torch.cat([cls_token, topk_states], dim=1)

    # ==================================== FlowCut ========================================== #

    outputs = (hidden_states,)

    if output_attentions:
        outputs += (attn_weights,)

    return outputs, cumulative_scores, all_keep_indices


def CLIPEncoder_forward(  # flowcut/modeling_clip_flowcut.py `CLIPEncoder_forward` (L174-245)
    self,
    inputs_embeds,
    attention_mask: Optional[torch.Tensor] = None,
    causal_attention_mask: Optional[torch.Tensor] = None,
    output_attentions: Optional[bool] = None,
    output_hidden_states: Optional[bool] = None,
    return_dict: Optional[bool] = None,
) -> Union[Tuple, BaseModelOutput]:
    output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
    output_hidden_states = (
        output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
    )
    return_dict = return_dict if return_dict is not None else self.config.use_return_dict

    encoder_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None

    hidden_states = inputs_embeds

    all_keep_indices = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0).expand(hidden_states.shape[0],-1)
    cumulative_scores = None
    for idx, encoder_layer in enumerate(self.layers):
        remain_prune_layer = self.select_layer-idx-1
        if output_hidden_states:
            encoder_states = encoder_states + (hidden_states,)
        # (the gradient-checkpointing branch, training only, left out)
        layer_outputs, cumulative_scores, all_keep_indices = encoder_layer(
            hidden_states,
            attention_mask,
            causal_attention_mask,
            output_attentions=output_attentions,
            target = self.target,
            rpl = remain_prune_layer,
            cumulative_scores = cumulative_scores,
            all_keep_indices = all_keep_indices,
        )

        hidden_states = layer_outputs[0]

        if output_attentions:
            all_attentions = all_attentions + (layer_outputs[1],)

    if output_hidden_states:
        encoder_states = encoder_states + (hidden_states,)

    if not return_dict:
        return tuple(v for v in [hidden_states, encoder_states, all_attentions] if v is not None) + (all_keep_indices,)

    return BaseModelOutput(
        last_hidden_state=hidden_states,
        hidden_states=encoder_states,
        attentions=all_attentions,
    ), all_keep_indices


def official_target(target_num: int) -> int:
    """flowcut/main.py `flowcut`, LLaVA-1.5 (`image_aspect_ratio` 'pad', `select_feature` 'patch')."""
    select_feature = 'patch'
    target_tokens = target_num + 1 if select_feature == 'patch' else target_num
    return target_tokens


class OfficialAttention:
    """The old (transformers 4.3x) ``CLIPAttention`` surface the official forward uses, over ``q/k/v/out``
    projections: a real module's, or callables returning given tensors."""

    def __init__(self, q_proj, k_proj, v_proj, out_proj, num_heads: int, head_dim: int):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.dropout, self.training = 0.0, False

    def _shape(self, tensor: torch.Tensor, seq_len: int, bsz: int):  # transformers 4.37 CLIPAttention._shape
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def __call__(self, **kwargs):
        return CLIPAttention_forward(self, **kwargs)


class OfficialLayer:
    """A CLIP encoder layer running the official ``CLIPEncoderLayer_forward``."""

    def __init__(self, layer_norm1, self_attn, layer_norm2, mlp):
        self.layer_norm1, self.self_attn, self.layer_norm2, self.mlp = layer_norm1, self_attn, layer_norm2, mlp

    def __call__(self, *args, **kwargs):
        return CLIPEncoderLayer_forward(self, *args, **kwargs)


class OfficialEncoder:
    """The official ``CLIPEncoder`` after ``apply_flowcut_config(model, target_tokens)`` (L296-299)."""

    def __init__(self, layers: list, target_tokens: int):
        self.layers = layers
        self.config = None
        self.gradient_checkpointing, self.training = False, False
        # apply_flowcut_config
        self.target = target_tokens
        self.select_layer = len(self.layers) - 2

    def __call__(self, inputs_embeds: torch.Tensor):
        return CLIPEncoder_forward(self, inputs_embeds, output_attentions=True, output_hidden_states=True,
                                   return_dict=True)


# -- hand-computed -----------------------------------------------------------------------------------------

def state(attention_row: list[float], values: list[list[float]], block: int, n_blocks: int, target: int,
          memory: dict, hidden: torch.Tensor, origin: torch.Tensor) -> VisionState:
    """One image, CLS + patches, one head of ``d = 2``: the CLS row ``attention_row`` ``[T]``, values ``[T, 2]``."""
    t = len(attention_row)
    return VisionState(hidden=hidden, prefix=1, grid=(2, 4), block=block, point="block", n_blocks=n_blocks,
                       target=target, sizes=torch.ones(1, t), origin=origin, memory=memory,
                       attention=torch.tensor(attention_row)[None, None], values=torch.tensor(values)[None, None])


def test_hand_computed_sequence():
    """8 patches (2x4), ratio 1/4: target 2; n_blocks 4: hooks after blocks 0, 1, 2 with rpl 2, 1, 0."""
    pruner = create_pruner("flowcut", ratio=0.25)
    assert [h.block for h in pruner.vision_hooks(4)] == [0, 1, 2]
    eps = 1e-9
    memory: dict = {}
    hidden = torch.arange(9.0)[None, :, None]
    origin = torch.arange(-1, 8)[None]
    # Block 0 (rpl 2). CLS attention to the patches .4, .4, then ~0: relation = [.5, .5, 0 x 6]. v_CLS = 0, so
    # v_CLS . v_j = 0 for all 9 tokens: semantic = 1/9 each, 1/8 over the patches. ||v_j||_1 = 1 1 4 3 2 5 2 .5.
    # score = (relation + 1/8) * ||v||_1 = .625 .625 .5 .375 .25 .625 .25 .0625.
    # Entropy of the normalised attention ~ log 2 = log(8) / 3: prune_num = round(6 / sqrt(2) * (1 - 1/9))
    # = round(3.77) = 4; keep max(8 - 4, 2) = 4 patches: the .625s (0, 1, 5) and .5 (2).
    red = pruner.select(state([0.2 - 6 * eps, 0.4, 0.4] + [eps] * 6,
                              [[0, 0], [1, 0], [1, 0], [4, 0], [3, 0], [2, 0], [5, 0], [1, 1], [0.5, 0]],
                              0, 4, 2, memory, hidden, origin))
    assert red.length == 5 and red.slots.tolist() == [[0, 1, 2, 3, -1, -1, 4, -1, -1]]
    hidden, sizes, origin, _ = apply_reduction(red, hidden, torch.ones(1, 9), origin, torch.arange(1, 9)[None])
    assert origin.tolist() == [[-1, 0, 1, 2, 5]]
    assert torch.allclose(memory[fc.MEMORY_KEY], torch.tensor([[0.625, 0.625, 0.5, 0.625]]))
    # Block 1 (rpl 1, odd: the EMA only). Uniform attention and semantic: .25 + .25; ||v||_1 = 4 1 2 1:
    # score = 2 .5 1 .5; cum = (.625 .625 .5 .625 + 2 .5 1 .5) / 2 = 1.3125 .5625 .75 .5625.
    assert pruner.select(state([0.2] * 5, [[0, 0], [4, 0], [1, 0], [2, 0], [0, 1]], 1, 4, 2, memory,
                               hidden, origin)) is None
    assert torch.allclose(memory[fc.MEMORY_KEY], torch.tensor([[1.3125, 0.5625, 0.75, 0.5625]]))
    # Block 2 (rpl 0: down to the target, 2). Relation .25 each. v_CLS = (1, 0): v_CLS . v_j = 0 0 ln3 0 over
    # the patches (unscaled), semantic over the patches 1/6 1/6 1/2 1/6; ||v||_1 = 1 2 ln3 1:
    # score = .4167 .8333 .8240 .4167; cum = .8646 .6979 .7870 .4896: patches 0 and 2 (originals 0 and 2).
    # (Without the EMA: 1 and 2; without the semantic term: 0 and 1.)
    ln3 = math.log(3)
    red = pruner.select(state([0.6, 0.1, 0.1, 0.1, 0.1], [[1, 0], [0, 1], [0, 2], [ln3, 0], [0, 1]], 2, 4, 2,
                              memory, hidden, origin))
    assert red.slots.tolist() == [[0, 1, -1, 2, -1]]
    assert torch.allclose(red.scores[0, 1:], torch.tensor([0.8646, 0.6979, 0.7870, 0.4896]), atol=1e-4)
    assert torch.isnan(red.scores[0, 0])  # the CLS is never ranked
    _, _, origin, _ = apply_reduction(red, hidden, sizes, origin, torch.arange(1, 5)[None])
    assert origin.tolist() == [[-1, 0, 2]]
    # Target reached: nothing more, whatever the block.
    assert pruner.select(state([0.5, 0.25, 0.25], [[1, 0], [1, 0], [1, 0]], 2, 4, 2, {}, hidden[:, :3],
                               origin)) is None


def test_register_tokens_are_kept_and_the_cls_row_ranks():
    """CLS + 1 register + 4 patches, target 2, the last cut (rpl 0). CLS row over the patches .1 .2 .05 .05:
    relation .25 .5 .125 .125; semantic uniform (v_CLS = 0); ||v||_1 = 1: patches 0 and 1. The register's own
    row (favouring patches 2 and 3) is not read; both prefix tokens stay in front."""
    attention = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.05, 0.05], [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]])[None]
    values = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.float32)[None, None]
    st = VisionState(hidden=torch.zeros(1, 6, 2), prefix=2, grid=(2, 2), block=0, point="block", n_blocks=2,
                     target=2, sizes=torch.ones(1, 6), origin=torch.tensor([[-1, -1, 0, 1, 2, 3]]),
                     attention=attention, values=values)
    red = create_pruner("flowcut", ratio=0.5).select(st)
    assert red.slots.tolist() == [[0, 1, 2, 3, -1, -1]]


def test_schedule_derived_from_the_blocks_run():
    """LLaVA-1.5: 24 layers, 23 run (hidden_states[-2]): hooks after blocks 0..21, cuts after 1, 3, ..., 21."""
    hooks = create_pruner("flowcut").vision_hooks(23)
    assert hooks == tuple(VisionHook(i, "block", attention="prefix", values=True) for i in range(22))
    official = [22 - idx - 1 for idx in range(24)]  # select_layer = 24 - 2; rpl = select_layer - idx - 1
    ours = [fc.remaining_prune_layers(i, 23) for i in range(22)]
    assert ours == official[:22]
    assert [i for i, r in enumerate(ours) if r % 2 == 0] == list(range(1, 22, 2))
    assert fc.final_cut_block(2) == 0 and fc.final_cut_block(1) == 0  # a 1-block run cuts after its block


# -- the official rule on random inputs, LLaVA-1.5's full schedule ------------------------------------------

@pytest.mark.parametrize("target_num", [192, 128, 64])
def test_official_schedule_on_random_inputs(target_num):
    """577 tokens through the official ``CLIPEncoderLayer_forward`` of 24 layers and through ``select`` (23 blocks
    run), on the same random per-head q, k, v at every layer (their sharpness varying by layer): identical kept
    patches after every block, the same per-block counts (the official entropy law), exactly ``target_num`` at
    the end."""
    gen = torch.Generator().manual_seed(target_num)
    b, heads, d, n_layers = 2, 2, 8, 24
    ratio = target_num / 576
    assert keep_count(ratio, 576) == target_num
    pruner = create_pruner("flowcut", ratio=ratio)
    hooks = {h.block for h in pruner.vision_hooks(n_layers - 1)}
    memory: dict = {}
    ours_hidden = official_hidden = torch.arange(577.0)[None, :, None].expand(b, -1, heads * d)  # each token's id
    ours_origin = torch.arange(-1, 576).expand(b, -1)
    keep_indices, cumulative = torch.arange(577).expand(b, -1), None
    q = k = v = None

    def given(name):  # a projection returning this layer's random tensor, [B, T, H * d]
        return lambda _: {"q": q, "k": k, "v": v}[name]

    attention = OfficialAttention(given("q"), given("k"), given("v"), torch.zeros_like, heads, d)
    layer = OfficialLayer(lambda h: h, attention, lambda h: h, torch.zeros_like)  # identity norms, zero outputs
    counts, official_counts = [], []
    for idx in range(n_layers):
        t = official_hidden.shape[1]
        sharp = 0.5 + 3.0 * torch.rand((), generator=gen).item()
        q = torch.randn(b, t, heads * d, generator=gen) * sharp
        k = torch.randn(b, t, heads * d, generator=gen)
        v = torch.randn(b, t, heads * d, generator=gen) * (1 + torch.rand(b, t, 1, generator=gen))
        outputs, cumulative, keep_indices = layer(official_hidden, None, None, output_attentions=True,
                                                  target=official_target(target_num), rpl=22 - idx - 1,
                                                  cumulative_scores=cumulative, all_keep_indices=keep_indices)
        official_hidden = outputs[0]
        official_counts.append(official_hidden.shape[1] - 1)
        if idx in hooks:  # what the recorder hands the pruner: head-mean CLS row, per-head values
            qh, kh, vh = (x.view(b, t, heads, d).transpose(1, 2) for x in (q, k, v))
            st = VisionState(hidden=ours_hidden, prefix=1, grid=(24, 24), block=idx, point="block",
                             n_blocks=n_layers - 1, target=keep_count(ratio, 576), sizes=torch.ones(b, t),
                             origin=ours_origin, memory=memory, values=vh,
                             attention=head_mean_probs(qh[:, :, :1], kh, None, d ** -0.5))
            red = pruner.select(st)
            if red is not None:
                ours_hidden, _, ours_origin, _ = apply_reduction(red, ours_hidden, st.sizes, ours_origin,
                                                                 torch.zeros(b, 1, dtype=torch.long))
        counts.append(ours_hidden.shape[1] - 1)
        assert torch.equal(ours_hidden, official_hidden), f"kept tokens differ after block {idx}"
    assert counts == official_counts
    assert torch.equal(ours_origin[:, 1:], keep_indices)
    assert counts[-1] == target_num and counts[21] == target_num and counts[20] > target_num
    steps = sorted(set(counts), reverse=True)
    assert len(steps) >= 6, f"the random inputs barely exercise the entropy law: {counts}"
    assert all(counts[i] == counts[i - 1] for i in range(2, 22, 2))  # cuts only after odd blocks


# -- real tiny CLIP towers: run_tower against the official tower forward ------------------------------------

def official_tower(tower: nn.Module, pixel_values: torch.Tensor, target_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official FlowCut CLIP forward on ``tower``'s own weights; LLaVA's ``feature_select`` (layer -2,
    'patch'): ``([B, target_num, D] features, [B, target_num] kept patches)``."""
    vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
    layers = [OfficialLayer(l.layer_norm1, OfficialAttention(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj,
                                                             l.self_attn.out_proj, l.self_attn.num_heads,
                                                             l.self_attn.head_dim), l.layer_norm2, l.mlp)
              for l in vm.encoder.layers]
    # CLIPVisionTransformer_forward (L271-279): embeddings, pre_layrnorm, the encoder
    hidden_states = vm.pre_layrnorm(vm.embeddings(pixel_values))
    outputs, all_keep_indices = OfficialEncoder(layers, official_target(target_num))(hidden_states)
    return outputs.hidden_states[-2][:, 1:], all_keep_indices


@pytest.fixture(scope="module")
def towers():
    """Tiny CLIP towers of 3 (``tiny_llava``'s) and 8 blocks, 8x8 patches + CLS; queries and keys scaled up so
    that the attention is peaked enough for the entropy law to cut before the last step."""
    out = {}
    for n_layers in (3, 8):
        model, _ = tiny_llava(vision={"num_hidden_layers": n_layers})
        tower = model.model.vision_tower.eval()
        with torch.no_grad():
            for layer in getattr(tower, "vision_model", tower).encoder.layers:
                layer.self_attn.q_proj.weight.mul_(10.0)
                layer.self_attn.k_proj.weight.mul_(10.0)
        out[n_layers] = tower
    return out


@pytest.mark.parametrize("n_layers", [3, 8])
def test_run_tower_matches_the_official_tower(towers, n_layers):
    tower = towers[n_layers]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(n_layers))
    for target_num in (48, 32, 16, 6):
        pruner = create_pruner("flowcut", ratio=target_num / 64)
        with torch.no_grad():
            run = run_tower(tower, pixels, pruner, feature_layer=-2, prefix=1)
            features, keep = official_tower(tower, pixels, target_num)
        assert run.features.shape == (2, 1 + target_num, 32)  # exactly keep_count(ratio, 64) patches
        assert torch.equal(run.origin, keep)
        assert (run.features[:, 1:] - features).abs().max() <= 1e-5
        assert run.blocks[-1] == (1 + target_num, 1 + target_num)  # the feature block runs on the target
        if n_layers == 8:  # 7 blocks run: cuts after blocks 1 and 3 by the entropy law, after block 5 to the target
            entering = [n for n, _ in run.blocks]
            assert entering[:2] == [65, 65]
            assert 65 > entering[2] == entering[3] > entering[4] == entering[5] > 1 + target_num


def test_ratio_one_is_a_no_op(towers):
    tower = towers[3]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pruner = create_pruner("flowcut", ratio=1.0)
    seen = []
    select = pruner.select
    pruner.select = lambda st: seen.append(select(st)) or seen[-1]
    with torch.no_grad():
        run = run_tower(tower, pixels, pruner, feature_layer=-2, prefix=1)
        reference = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert seen == [None]  # the one hook (block 0 of 2 run) cut nothing
    assert torch.equal(run.features, reference)


def test_feature_layer_last(towers):
    """All 3 blocks run (feature layer -1): the last cut after block 1, block 2 on the target."""
    with torch.no_grad():
        run = run_tower(towers[3], torch.randn(1, 3, 64, 64), create_pruner("flowcut", ratio=0.25), feature_layer=-1,
                        prefix=1)
    assert run.features.shape[1] == 17 and run.blocks == [(65, 65), (65, 65), (17, 17)]


# -- options and refusals -----------------------------------------------------------------------------------

def test_defaults_and_bad_options():
    pruner = create_pruner("flowcut")
    assert pruner.stage is Stage.IN_VISION and keep_count(pruner.ratio, 576) == 128  # official target_num=128
    assert pruner.image_by_image  # the batch max would couple the images of one tower pass
    for bad in (0, 1.5, -0.1, "half", True, None):
        with pytest.raises(OptionError):
            create_pruner("flowcut", ratio=bad)
    with pytest.raises(OptionError, match="no option"):
        create_pruner("flowcut", ema=0.3)
    with pytest.raises(OptionError):
        pruner.vision_hooks(0)


def test_a_tower_without_cls_is_refused():
    siglip = VisionState(hidden=torch.zeros(1, 4, 2), prefix=0, grid=(2, 2), block=0, point="block", n_blocks=3,
                         target=2, sizes=torch.ones(1, 4), origin=torch.arange(4)[None],
                         attention=torch.full((1, 1, 4), 0.25), values=torch.ones(1, 1, 4, 2))
    with pytest.raises(OptionError, match="no CLS") as info:
        create_pruner("flowcut", ratio=0.5).select(siglip)
    assert "\n" not in str(info.value)


# -- LLaVA-NeXT: int(target/2) per view in the tower, the crops back on the grid, the cut after LLM layer 1 ----------

def official_llm_prune_branch(query_states, key_states, value_states, visual_token_pos, visual_token_num,
                              last_instruct_pos, target_num, head_dim):
    """flowcut/modeling_llama_flowcut.py `LlamaSdpaAttention_forward`, the `if "prune" in prune_kwargs` branch
    (L246-286), verbatim but for the signature; ``key_states`` / ``value_states`` already `repeat_kv`-ed."""
    bsz = query_states.shape[0]
    keep_indices = []
    for b in range(bsz):
        if visual_token_num[b] <= target_num:
            continue

        start = visual_token_pos[b]
        end = start + visual_token_num[b]
        # vis_k: [head, vis_len, d]
        vis_k = key_states[b,:,start:end]
        # vis_v: [head, vis_len, d]
        vis_v = value_states[b,:,start:end]

        text_q = query_states[b,:,last_instruct_pos[b]-1:last_instruct_pos[b]]
        text_v = value_states[b,:,last_instruct_pos[b]-1:last_instruct_pos[b]]

        relation_weight = torch.bmm(text_q,vis_k.transpose(1,2))/math.sqrt(head_dim)
        relation_attn = nn.functional.softmax(relation_weight, dim=-1, dtype=torch.float32).to(query_states.dtype).mean(0)

        semantic_weight = torch.bmm(text_v, vis_v.transpose(1,2))/math.sqrt(head_dim)  # se_attn: [1,vis_len]
        semantic_attn = nn.functional.softmax(semantic_weight, dim=-1, dtype=torch.float32).to(query_states.dtype).mean(0)

        score = compute_score(relation_attn, semantic_attn, vis_v.mean(0))   # score: [1, vis_len]

        keep_index = torch.topk(score, target_num, dim=1).indices
        keep_indices.append(keep_index.sort().values)
    return torch.cat(keep_indices, dim=0) if keep_indices else None


@pytest.mark.parametrize("seed", range(4))
def test_llm_cut_matches_the_official_branch(seed):
    """Random layer-1 q / k / v (GQA 8 query heads over 2 kv heads), a 40-token prompt with 24 visual tokens
    at 5..28: the pruner's cut (through PruningInputs as the decoder builds them) == the official indices."""
    g = torch.Generator().manual_seed(seed)
    heads, kv, d, length, start, n_vis, target = 8, 2, 16, 40, 5, 24, 9
    q = torch.randn(1, heads, length, d, generator=g)
    k = torch.randn(1, kv, length, d, generator=g)
    v = torch.randn(1, kv, length, d, generator=g)
    official = official_llm_prune_branch(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), [start], [n_vis],
                                         [length], target, d)
    from tokenprune.pruner import PruningInputs

    vis = slice(start, start + n_vis)
    inputs = PruningInputs(tokens=torch.zeros(1, n_vis, 4), grid=(1, n_vis), llm_queries=q[:, :, -1:].transpose(1, 2),
                           llm_keys=k[:, :, vis].transpose(1, 2).flatten(2), llm_values=v[:, :, vis].transpose(1, 2),
                           text_values=v[:, :, start + n_vis:].transpose(1, 2), num_placeholders=n_vis * 4,
                           text_tokens=torch.zeros(1, length - start - n_vis, 4), layer=2, stage=0)
    pruner = create_pruner("flowcut", ratio=target / (n_vis * 4))
    red = pruner.select(inputs)
    assert red.indices.tolist() == official.tolist()


def test_llm_cut_hand_computed():
    """One head, d = 1, three visual tokens: q = 1, k = (0, 1, 2), v = (1, -2, 3), v_last = 1 ->
    relation = softmax(0, 1, 2), semantic = softmax(1, -2, 3); score = (relation + semantic) * |v|;
    relation = (0.0900, 0.2447, 0.6652), semantic = (2.718, 0.135, 20.09) / 22.94 = (0.1185, 0.0059, 0.8756);
    token 0: (0.0900 + 0.1185) * 1 = 0.2085, token 1: (0.2447 + 0.0059) * 2 = 0.5012, token 2: (0.6652 + 0.8756) * 3
    = 4.6225
    -> keep 2 of 3: tokens 1 and 2."""
    from tokenprune.pruner import PruningInputs

    inputs = PruningInputs(tokens=torch.zeros(1, 3, 2), grid=(1, 3), llm_queries=torch.ones(1, 1, 1, 1),
                           llm_keys=torch.tensor([[[0.0], [1.0], [2.0]]]),
                           llm_values=torch.tensor([[[[1.0]], [[-2.0]], [[3.0]]]]),
                           text_values=torch.ones(1, 1, 1, 1), num_placeholders=6, text_tokens=torch.zeros(1, 1, 2))
    red = create_pruner("flowcut", ratio=2 / 6).select(inputs)
    assert red.indices.tolist() == [[1, 2]]
    assert red.scores[0].tolist() == pytest.approx([0.2085, 0.5012, 4.6225], abs=2e-4)
    assert create_pruner("flowcut", ratio=0.5).select(inputs).indices.tolist() == [[0, 1, 2]]  # 3 <= target: no cut


def _next_images():
    import numpy as np
    from PIL import Image

    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8))
            for i, (h, w) in enumerate([(40, 70), (64, 64)])]


@pytest.fixture(scope="module")
def next_lvlm():
    import tokenprune as tp

    torch.manual_seed(0)
    return tp.load("tiny-llava-next")


def test_next_counts_by_pre_hooks(next_lvlm):
    """tiny-llava-next (4x4 patches per view, 5 views per image here, 4 LLM layers). Image 1 (64 x 64): 16 base +
    64 high-res tokens = 80 -> target_num = 20 at ratio 0.25, 10 patches per view leave the tower (+ CLS), and
    after LLM layer 1 the 20 best of those placed; layers 0-1 see no row newlines."""
    lvlm = next_lvlm
    tower = lvlm.model.model.vision_tower
    blocks: list[int] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: blocks.append(a[0].shape[:2]))  # the runner calls the halves
             for layer in tower.encoder.layers]
    llm: list[int] = []
    hooks += [layer.register_forward_pre_hook(
        lambda m, a, k: llm.append((k["hidden_states"] if "hidden_states" in k else a[0]).shape[1]), with_kwargs=True)
        for layer in lvlm.decoder()[0].layers]
    images, prompts = _next_images()[1:], ["Which colour?"]
    try:
        ref = lvlm.generate(images, prompts, max_new_tokens=1)
        llm.clear()
        blocks.clear()
        out = lvlm.generate(images, prompts, pruner=create_pruner("flowcut", ratio=0.25), max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    st, un = out.stats[0], ref.stats[0]
    text = un.tokens_per_layer[0] - 80 - 8  # 8 rows of high-res tokens, each ending in a newline
    assert st.visual_tokens_in == 80 and st.visual_tokens_kept == 20
    # the 2 tower blocks LLaVA reads (feature layer -2 of 3), the 5 views in one pass: the cut after block 0
    assert blocks == [(5, 17), (5, 11)]
    placed = st.visual_per_layer[0]
    assert 20 < placed <= 10 + 4 * 10 and llm == [text + placed] * 2 + [text + 20] * 2
    assert st.visual_per_layer == [placed, placed, 20, 20]


def test_next_ratio_one_is_the_official_layout_without_newlines(next_lvlm):
    """At ratio 1.0 with 5 views, int(80 / 2) = 40 >= 16 patches per view: nothing cut in the tower nor after layer 1,
    but the official multi-crop branch appends no newlines: the logits equal HF's own image features with the
    newline rows removed, run through the LLM with contiguous positions."""
    lvlm = next_lvlm
    model = lvlm.model
    images, prompts = _next_images()[1:], ["Which colour?"]
    out = lvlm.generate(images, prompts, pruner=create_pruner("flowcut", ratio=1.0), max_new_tokens=1)
    batch = lvlm.prepare(images, prompts)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats))  # [16 + 8 * (8 + 1), D]: base, then 8 rows of 8 tokens + a newline
        keep = torch.ones(feats.shape[0], dtype=torch.bool)
        keep[16 + 8::9] = False
        ids = batch["input_ids"][0]
        image = ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids)
        pos = image.nonzero().flatten()
        seq = torch.cat([embeds[: pos[0]], feats[keep], embeds[pos[-1] + 1:]])[None]
        logits = model(inputs_embeds=seq).logits[0, -1]
    assert out.stats[0].visual_per_layer == [80] * 4
    torch.testing.assert_close(out.first_logits[0], logits, rtol=1e-5, atol=1e-5)


def test_next_cached_matches_uncached_and_batch_matches_alone(next_lvlm):
    lvlm = next_lvlm
    images, prompts = _next_images(), ["What is it?", "Which colour?"]
    for ratio in (0.5, 0.25):
        pruner = create_pruner("flowcut", ratio=ratio)
        cached = lvlm.generate(images, prompts, pruner=pruner, max_new_tokens=4, ignore_eos=True)
        uncached = lvlm.generate(images, prompts, pruner=pruner, max_new_tokens=4, ignore_eos=True, use_cache=False)
        assert torch.equal(cached.token_ids, uncached.token_ids)
        for i in range(2):
            alone = lvlm.generate(images[i:i + 1], prompts[i:i + 1], pruner=pruner, max_new_tokens=4, ignore_eos=True)
            assert torch.equal(alone.token_ids[0], cached.token_ids[i])
            torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=1e-5, atol=1e-5)


def test_next_decode_positions_shift_every_layer():
    """The official decode step subtracts ``visual_token_num - target_num`` from the position at every layer: a
    'final' plan gives layers 0-1 (full cache) the same next position as layers 2+ (the cut layout)."""
    pruner = create_pruner("flowcut", ratio=0.25)
    assert pruner.decode_plan(4).positions == "final"
    assert create_pruner("flowcut", ratio=0.25, llm_cut=False).decode_plan(4) is None
    assert pruner.acts_in(Stage.IN_LLM) and pruner.acts_in(Stage.DECODE)
    assert pruner.vision_view_target(576, 2880, 5) == keep_count(0.25, 2880) // 2  # official int(target_num / 2)
    assert pruner.vision_view_target(576, 576, 1) == 144
