"""PruMerge / PruMerge+ (methods/prumerge.py): hand-computed counts, orders and merges; the official code
and EffiVLM's fixed-budget port on random inputs; options; the tiny LLaVA end to end.

References, transcribed as close to verbatim as possible (only what feeds them changed: the forward hooks'
captures are arguments, ``self.device`` is the inputs' device, ``self.budgets`` an argument):

* ``42Shawn/LLaVA-PruMerge@097c041`` ``llava/model/multimodal_encoder/clip_encoder.py``: ``complement_idx``
  L12-25, ``outlier_dectection`` L34-47, ``token_prune_merge_advanced`` L100-171 and
  ``token_prune_merge_advanced_plus`` L189-281 (their bodies after the vision forward);
* ``EffiVLM-Bench/EffiVLM-Bench@ab3ee18`` ``kv_cache_compression/siglip_model.py``:
  ``outlier_dectection_prumerge_plus`` L595-615 and ``token_prune_merge_advanced_prumerge_plus`` L636-729.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.prumerge  # noqa: F401  registers "prumerge"/"prumerge_plus" until methods/__init__.py imports it
from tokenprune.errors import OptionError
from tokenprune.methods.prumerge import merge_weights, official_k, outlier_count, select_order
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, check_reduction

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---------------------------------------------------------------- the official code (reference)
def complement_idx(idx, dim):
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1, )
    for i in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def outlier_dectection(attn):
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()

    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1

    # lower_bound = Q1 - 1.5 * IQR
    upper_bound = Q3 + 1.5 * IQR

    outlier_indices = np.where((attn_np > upper_bound))[0]

    ratio = len(outlier_indices) / len(attn_np)
    return ratio


def token_prune_merge_advanced(desired_layer_q, desired_layer_k, image_features, if_adaptive=True,
                               reduction_ratio=1 / 8):
    """Official L100-171 (``image_features`` = ``hidden_states[-2][:, 1:]``, q / k = layer 23's hooks)."""
    B, N, C = image_features.shape

    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)

    cls_attn = attn[:, 0, 1:]

    if if_adaptive:
        reduction_ratio = outlier_dectection(cls_attn)#*3.5
    _, idx = torch.topk(cls_attn, int(N*reduction_ratio), dim=1, largest=True)  # [B, left_tokens] , sorted=True
    index = idx.unsqueeze(-1).expand(-1, -1, C)  # [B, left_tokens, C]

    Key_wo_cls = desired_layer_k[:, 1:]  # [B, N-1, C]

    x_others = torch.gather(image_features, dim=1, index=index)  # [B, left_tokens, C]
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)  # [B, left_tokens, C]
    compl = complement_idx(idx, N)  # [B, N-1-left_tokens]
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))  # [B, N-1-left_tokens, C]
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)  # [B, N-1-left_tokens]

    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)

    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)

    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b,i,:].unsqueeze(0).unsqueeze(0)

            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i+1:, :].unsqueeze(0)

            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i+1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b,:,:].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i+1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b,:].unsqueeze(0)], dim=1)

            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b,:,:].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))

            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)

            cluster_tokens = rest_x_others[:,cluster_indices.squeeze(),:]
            weights = rest_x_others_attn[:,cluster_indices.squeeze()].unsqueeze(-1)

            # update cluster centers
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1) #/ torch.sum(weights)
            updated_center = weighted_avg + x_others[b, i, :]
            updated_x_others[b, i, :] = updated_center

    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # [B, 1, C]
    updated_x_others = torch.cat([updated_x_others, extra_one_token],dim=1)
    image_features = updated_x_others
    return image_features, idx


def token_prune_merge_advanced_plus(desired_layer_q, desired_layer_k, image_features, if_adaptive=True,
                                    reduction_ratio=1 / 8, last=575):
    """Official L189-281, adaptive branch; ``last`` is the official literal ``575`` (= N - 1 on LLaVA-1.5)."""
    device = image_features.device
    B, N, C = image_features.shape

    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)

    cls_attn = attn[:, 0, 1:]

    if if_adaptive:
        reduction_ratio = outlier_dectection(cls_attn)#*3.5
    _, idx = torch.topk(cls_attn, int(N*reduction_ratio), dim=1, largest=True)  # [B, left_tokens] , sorted=True

    if if_adaptive:
        step_length = int(1/reduction_ratio)
        arithmetic_sequence = torch.arange(0, last, int(step_length/3)).to(device=device)
        original_tensor_1d = idx.flatten().to(device=device)
        filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d]).to(device=device)
        concatenated_tensor = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
        idx = concatenated_tensor

    index = idx.unsqueeze(-1).expand(-1, -1, C)  # [B, left_tokens, C]

    Key_wo_cls = desired_layer_k[:, 1:]  # [B, N-1, C]

    x_others = torch.gather(image_features, dim=1, index=index)  # [B, left_tokens, C]
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)  # [B, left_tokens, C]
    compl = complement_idx(idx, N)  # [B, N-1-left_tokens]
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))  # [B, N-1-left_tokens, C]
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)  # [B, N-1-left_tokens]

    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)

    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)

    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b,i,:].unsqueeze(0).unsqueeze(0)

            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i+1:, :].unsqueeze(0)

            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i+1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b,:,:].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i+1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b,:].unsqueeze(0)], dim=1)

            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b,:,:].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))

            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)

            cluster_tokens = rest_x_others[:,cluster_indices.squeeze(),:]
            weights = rest_x_others_attn[:,cluster_indices.squeeze()].unsqueeze(-1)

            # update cluster centers
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1) #/ torch.sum(weights)
            updated_center = x_others[b, i, :]  + weighted_avg
            updated_x_others[b, i, :] = updated_center

    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # [B, 1, C]
    updated_x_others = torch.cat([updated_x_others, extra_one_token],dim=1)
    image_features = updated_x_others
    return image_features, idx


# ---------------------------------------------------------------- EffiVLM's fixed-budget port (reference)
def outlier_dectection_prumerge_plus(attn):

    attn_shape = attn.shape
    image_num = attn_shape[0]
    ratios = []

    # for each image (multi_images) or for base image (single_image)
    for i in range(image_num):
        cur_attn = attn[i].to(dtype=torch.float32).cpu().numpy().flatten()

        Q1 = np.percentile(cur_attn, 25)
        Q3 = np.percentile(cur_attn, 75)
        IQR = Q3 - Q1

        upper_bound = Q3 + 1.5 * IQR

        outlier_indices = np.where((cur_attn > upper_bound))[0]
        ratio = len(outlier_indices) / len(cur_attn)
        ratios.append(ratio)

    return sum(ratios) / len(ratios)


def effivlm_column_mean(desired_layer_q, desired_layer_k, C):
    """EffiVLM L636-640: the single-head map averaged over the queries (SigLIP has no CLS)."""
    attn = (desired_layer_q.float() @ desired_layer_k.transpose(-2, -1).float()) * C ** -0.5
    attn = nn.functional.softmax(attn, dim=-1, dtype=torch.float32)

    # Regardless of whether it is a single image use anyres or multiple images, take the average
    cls_attn = torch.mean(attn, dim=1)
    return cls_attn


def effivlm_prumerge_plus(cls_attn, desired_layer_k, image_features, budgets, if_adaptive=True):
    """EffiVLM L642-729 (``self.budgets`` -> ``budgets``, ``self.device`` -> the inputs' device)."""
    device = image_features.device
    B, N, C = image_features.shape
    assert cls_attn.ndim == 2

    if if_adaptive:
        reduction_ratio = outlier_dectection_prumerge_plus(cls_attn)#*3.5

    # Maintaining the preset budget
    budgets_token = max(int(budgets * N), 1)
    iqr_token = max(int(N*reduction_ratio), 1)
    image_num = cls_attn.shape[0]

    if budgets_token > iqr_token:
        _, iqr_idx = torch.topk(cls_attn, iqr_token, dim=1, largest=True)  # [B, left_tokens]
        idx = torch.zeros((image_num, budgets_token), dtype=iqr_idx.dtype, device=device)

        for i in range(image_num):

            remaining_tokens = budgets_token - iqr_token

            # Sampling by arithmetic progression
            step_length = max(1, int(N / budgets_token))
            arithmetic_sequence = torch.arange(0, N, step_length).to(device=device)

            original_tensor_1d = iqr_idx[i].flatten()
            filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d]).to(device=device)

            # If the filtered sequence is too long, truncate it
            if len(filtered_sequence) > remaining_tokens:
                filtered_sequence = filtered_sequence[:remaining_tokens]
            # If the filtered sequence is too short, randomly select additional indices
            elif len(filtered_sequence) < remaining_tokens:
                # code will not reach here
                available_indices = torch.tensor([x for x in range(N) if x not in original_tensor_1d and x not in filtered_sequence],
                                            device=device)
                if len(available_indices) > 0:
                    extra_indices = available_indices[torch.randperm(len(available_indices))[:remaining_tokens - len(filtered_sequence)]]
                    filtered_sequence = torch.cat([filtered_sequence, extra_indices])

            # make sure the length of idx is budgets_token
            concatenated_tensor = torch.cat([iqr_idx[i], filtered_sequence])[:budgets_token]
            idx[i] = concatenated_tensor
    else:
        _, idx = torch.topk(cls_attn, budgets_token, dim=1, largest=True)

    index = idx.unsqueeze(-1).expand(-1, -1, C)  # [B, left_tokens, C]
    x_others = torch.gather(image_features, dim=1, index=index)  # [B, left_tokens, C]
    Key_others = torch.gather(desired_layer_k, dim=1, index=index)  # [B, left_tokens, C]
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    compl = complement_idx(idx, N)  # [B, N-1-left_tokens]
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))  # [B, N-1-left_tokens, C]
    non_topk_Key = torch.gather(desired_layer_k, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)  # [B, N-1-left_tokens]

    Key_others_norm = nn.functional.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = nn.functional.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)

    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b,i,:].unsqueeze(0).unsqueeze(0)

            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i+1:, :].unsqueeze(0)

            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i+1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b,:,:].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i+1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b,:].unsqueeze(0)], dim=1)

            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b,:,:].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))

            cos_sim_num = max(min(int(32), cos_sim_matrix.shape[2]), 1)
            _, cluster_indices = torch.topk(cos_sim_matrix, k=cos_sim_num, dim=2, largest=True)

            cluster_tokens = rest_x_others[:,cluster_indices.squeeze(),:]
            weights = rest_x_others_attn[:,cluster_indices.squeeze()].unsqueeze(-1)

            # update cluster centers
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1) #/ torch.sum(weights)
            updated_center = x_others[b, i, :]  + weighted_avg
            updated_x_others[b, i, :] = updated_center

    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # [B, 1, C]
    updated_x_others = torch.cat([updated_x_others, extra_one_token],dim=1)
    image_features = updated_x_others
    return image_features, idx


# ---------------------------------------------------------------- helpers
def qk_inputs(q: torch.Tensor, k: torch.Tensor, features: torch.Tensor, prefix: int = 1,
              prefix_features: torch.Tensor | None = None) -> PruningInputs:
    """PruningInputs as the adapter fills them: ``q`` ``[B, R, C]`` query rows, ``k`` ``[B, prefix + N, C]``."""
    b, n = features.shape[:2]
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else (1, n)
    return PruningInputs(tokens=torch.zeros(b, n, 4), grid=grid, vision_prefix=prefix, vision_features=features,
                         vision_prefix_features=prefix_features, vision_queries=q, vision_keys_full=k,
                         sample_ids=[f"s{i}" for i in range(b)])


def random_qk(seed: int, n: int, c: int = 32, prefix: int = 1, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, prefix + n, c, generator=g)
    k = torch.randn(batch, prefix + n, c, generator=g)
    x = torch.randn(batch, n, c, generator=g)
    return q, k, x


# ---------------------------------------------------------------- hand-computed
# 16 patch values: sorted, twelve of 1 .. 1.3, then 5 and 9. Q1 = 1 + 0.75 * 0.1 = 1.075 (position 3.75),
# Q3 = 1.2 + 0.25 * 0.1 = 1.225 (position 11.25), IQR = 0.15, bound 1.225 + 0.225 = 1.45: two outliers,
# 9 (patch 5) then 5 (patch 10). Scores are these values over one softmax denominator, which scales
# the quartiles and the bound alike.
HAND = torch.tensor([1.0, 1.1, 1.2, 1.3, 1.0, 9.0, 1.1, 1.2, 1.0, 1.1, 5.0, 1.2, 1.3, 1.0, 1.1, 1.2])


def hand_inputs(prefix_features: bool = True):
    c = 4
    q = torch.zeros(1, 1, c)
    q[0, 0, 0] = 1.0
    k = torch.zeros(1, 17, c)  # CLS key 0: logit 0, weight e^0 = 1 in the softmax
    k[0, 1:, 0] = torch.log(HAND) * c ** 0.5  # q.k * C^-0.5 = log(v): softmax weight v
    k[0, 1:, 1:] = torch.randn(16, c - 1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 16, 6, generator=torch.Generator().manual_seed(1))
    cls = torch.randn(1, 1, 6) if prefix_features else None
    return qk_inputs(q, k, x, prefix_features=cls), HAND / (1 + HAND.sum())


def test_outlier_count_and_official_k_hand_computed():
    assert outlier_count(HAND) == 2
    assert outlier_count(torch.ones(10)) == 0  # IQR 0: nothing strictly above Q3
    assert official_k(576, 23) == 23 and official_k(16, 2) == 2
    assert official_k(729, 23) == 22 and official_k(729, 1) == 0  # int(N * (count / N)) in float64, as official


def test_prumerge_hand_computed():
    inputs, a = hand_inputs()
    red = tp.create_pruner("prumerge")(inputs)
    check_reduction(tp.create_pruner("prumerge"), inputs, red)
    # kept [5, 10] in descending attention; N - 1 = 15 < 32 neighbours: every other token
    expected = torch.zeros(3, 16)
    for row, i in enumerate([5, 10]):
        expected[row] = a
        expected[row, i] = 1.0
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[[5, 10]] = False
    expected[2] = a * dropped
    assert red.indices.tolist() == [[0, 1, 2]]
    assert red.positions.tolist() == [[5, 10, 3]]  # the extra token: the dropped patch of highest score (1.3, first)
    torch.testing.assert_close(red.feature_weights[0, :, 0], torch.zeros(3))  # CLS column unused
    torch.testing.assert_close(red.feature_weights[0, :, 1:], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(red.scores[0], a, rtol=0, atol=1e-6)


def test_prumerge_plus_hand_computed():
    inputs, a = hand_inputs(prefix_features=False)
    red = tp.create_pruner("prumerge_plus")(inputs)
    # ratio 2/16: step int(8.0) = 8, int(8 / 3) = 2, arange(0, 15, 2) = 0, 2, ..., 14; 10 already kept
    kept = [5, 10, 0, 2, 4, 6, 8, 12, 14]
    assert red.positions[0, :9].tolist() == kept
    assert red.feature_weights.shape == (1, 10, 16)  # no prefix features: patch columns only
    expected = a.repeat(9, 1)
    expected[torch.arange(9), kept] = 1.0
    torch.testing.assert_close(red.feature_weights[0, :9], expected, rtol=0, atol=1e-6)
    dropped = [1, 3, 7, 9, 11, 13, 15]
    torch.testing.assert_close(red.feature_weights[0, 9], torch.zeros(16).index_put((torch.tensor(dropped),), a[dropped]))
    assert int(red.positions[0, 9]) == 3  # highest-score dropped patch (1.3 at 3 and 12; 12 is kept)


def test_fixed_budget_hand_computed():
    inputs, _ = hand_inputs()
    # keep_count(6/16) = 6 tokens: B = 5 selected + the extra one. IQR top max(int(16 * 2/16), 1) = 2 < 5:
    # [5, 10], filled from arange(0, 16, int(16 / 5) = 3) = 0, 3, 6, 9, 12, 15 minus those, truncated to 3.
    red = tp.create_pruner("prumerge_plus", ratio=6 / 16, budget="fixed")(inputs)
    assert red.positions[0, :5].tolist() == [5, 10, 0, 3, 6] and red.num_kept == 6
    # keep_count(3/16) = 3: B = 2 <= 2 outliers: the top 2 only
    red = tp.create_pruner("prumerge_plus", ratio=3 / 16, budget="fixed")(inputs)
    assert red.positions[0, :2].tolist() == [5, 10] and red.num_kept == 3
    # PruMerge with a fixed budget: the top B by score (official if_adaptive=False)
    red = tp.create_pruner("prumerge", ratio=5 / 16, budget="fixed")(inputs)
    assert red.positions[0, :4].tolist() == [5, 10, 3, 12] and red.num_kept == 5  # ties (1.3): lower index first
    # keep_count = 1: B = 0, the extra token alone (every patch weighted by its score)
    red = tp.create_pruner("prumerge_plus", ratio=1 / 16, budget="fixed")(inputs)
    assert red.num_kept == 1 and bool((red.feature_weights[0, 0, 1:] > 0).all())


def test_official_crash_guards():
    # no outliers (flat attention): PruMerge keeps nothing but the extra token (as official); PruMerge+
    # (official: ZeroDivisionError) samples token 0 only, the limit of arange(0, N - 1, step) as step grows
    scores = torch.full((16,), 1 / 16)
    assert select_order(scores, plus=False, budget=None).tolist() == []
    assert select_order(scores, plus=True, budget=None).tolist() == [0]
    # (int(step / 3) == 0, the other official crash, needs over a third of outliers: the IQR fence never
    # lets more than a quarter through, so step >= 4; the guard is never reached)
    # every token kept: no (all-zero) extra token
    w, p = merge_weights(torch.randn(2, 3), torch.tensor([0.1, 0.9]), torch.tensor([1, 0]))
    assert w.shape == (2, 2) and p.tolist() == [1, 0]


# ---------------------------------------------------------------- against the official code
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("plus", [False, True])
def test_equals_official_on_random_inputs_llava15(seed, plus):
    n = 576  # LLaVA-1.5: the official 575 holds
    q, k, x = random_qk(seed, n)
    ref, ref_idx = (token_prune_merge_advanced_plus if plus else token_prune_merge_advanced)(q, k, x)
    pruner = tp.create_pruner("prumerge_plus" if plus else "prumerge")
    red = pruner(qk_inputs(q[:, :1], k, x))
    assert 4 < ref_idx.shape[1] < n // 2
    assert red.positions[0, :-1].tolist() == ref_idx[0].tolist()  # the same tokens, in the official order
    torch.testing.assert_close(red.feature_weights[0] @ x[0], ref[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [100, 49])
def test_equals_official_with_derived_constants(n):
    # other towers: the official 575 becomes N - 1 (the transcription's only edit)
    q, k, x = random_qk(5, n, prefix=1)
    ref, ref_idx = token_prune_merge_advanced_plus(q, k, x, last=n - 1)
    red = tp.create_pruner("prumerge_plus")(qk_inputs(q[:, :1], k, x))
    assert red.positions[0, :-1].tolist() == ref_idx[0].tolist()
    torch.testing.assert_close(red.feature_weights[0] @ x[0], ref[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("budgets", [0.1, 0.02, 0.5])
def test_fixed_budget_equals_effivlm_siglip(budgets):
    # LLaVA-OneVision's SigLIP: 729 patches, no CLS, the column mean of the single-head map
    n = 729
    q, k, x = random_qk(7, n, c=24, prefix=0)
    cls_attn = effivlm_column_mean(q, k, x.shape[-1])
    ref, ref_idx = effivlm_prumerge_plus(cls_attn, k, x, budgets)
    ratio = (int(budgets * n) + 1) / n  # EffiVLM's int(b N) selected + its extra token
    pruner = tp.create_pruner("prumerge_plus", ratio=ratio, budget="fixed")
    red = pruner(qk_inputs(q, k, x, prefix=0))
    check_reduction(pruner, qk_inputs(q, k, x, prefix=0), red)
    assert red.num_kept == int(budgets * n) + 1 == ref.shape[1]
    assert red.positions[0, :-1].tolist() == ref_idx[0].tolist()
    torch.testing.assert_close(red.scores, cls_attn, rtol=0, atol=1e-7)
    torch.testing.assert_close(red.feature_weights[0] @ x[0], ref[0], rtol=0, atol=1e-5)


def test_fixed_budget_with_cls_equals_effivlm_rule():
    # a CLS tower (EffiVLM's InternVL port scores with the CLS row and merges with the patch keys)
    n = 576
    q, k, x = random_qk(3, n)
    attn = F.softmax((q @ k.transpose(1, 2)) * x.shape[-1] ** -0.5, dim=-1)
    ref, ref_idx = effivlm_prumerge_plus(attn[:, 0, 1:], k[:, 1:], x, 0.25)
    red = tp.create_pruner("prumerge_plus", ratio=145 / 576, budget="fixed")(qk_inputs(q[:, :1], k, x))
    assert red.positions[0, :-1].tolist() == ref_idx[0].tolist()
    torch.testing.assert_close(red.feature_weights[0] @ x[0], ref[0], rtol=0, atol=1e-5)


def test_fixed_budget_prumerge_equals_official_non_adaptive_branch():
    q, k, x = random_qk(4, 576)
    ref, ref_idx = token_prune_merge_advanced(q, k, x, if_adaptive=False, reduction_ratio=1 / 8)  # 72 tokens
    red = tp.create_pruner("prumerge", ratio=73 / 576, budget="fixed")(qk_inputs(q[:, :1], k, x))
    assert red.positions[0, :-1].tolist() == ref_idx[0].tolist()
    torch.testing.assert_close(red.feature_weights[0] @ x[0], ref[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- options, needs, the contract
def test_options_and_modes():
    p = tp.create_pruner("prumerge_plus")
    assert p.adaptive and p.quantised and not p.uses_ratio and p.num_kept(576, (24, 24)) == 576
    assert p.scopes == ("frame",) and p.position_policy == "compact" and p.position_policy_mrope == "keep"
    needs = p.needs
    assert needs.vision_qk and needs.vision_features and needs.vision_attention_layer == -1
    assert needs.vision_attention_rows == "prefix"  # the CLS path reads one query row
    assert tp.create_pruner("prumerge", score="column_mean").needs.vision_attention_rows == "all"
    f = tp.create_pruner("prumerge_plus", ratio=0.25, budget="fixed")
    assert not f.adaptive and not f.quantised and f.uses_ratio and f.num_kept(576, (24, 24)) == 144
    assert tp.pruner_from_spec("prumerge_plus:budget=fixed:score=cls:vision_layer=-2").options == {
        "ratio": 0.5, "budget": "fixed", "score": "cls", "vision_layer": -2}


@pytest.mark.parametrize("bad", [dict(budget="exact"), dict(score="mean"), dict(vision_layer=1.5),
                                 dict(ratio=0), dict(neighbours=4)])
def test_bad_options(bad):
    with pytest.raises(OptionError):
        tp.create_pruner("prumerge_plus", **bad)


def test_cls_score_without_cls_and_missing_inputs():
    q, k, x = random_qk(0, 16, prefix=0)
    with pytest.raises(OptionError, match="CLS"):
        tp.create_pruner("prumerge", score="cls")(qk_inputs(q, k, x, prefix=0))
    with pytest.raises(ValueError, match="every query row"):  # the column mean reads every query
        tp.create_pruner("prumerge")(qk_inputs(q[:, :0], k, x, prefix=0))
    with pytest.raises(ValueError, match="vision_qk"):
        tp.create_pruner("prumerge")(PruningInputs(tokens=torch.zeros(1, 16, 4), grid=(4, 4), vision_features=x))


def test_batches():
    # fixed budget: the batched call is each view alone (contract); adaptive: one count per call
    q, k, x = random_qk(2, 64, batch=3)
    check_pruner_contract(tp.create_pruner("prumerge_plus", ratio=0.2, budget="fixed"), qk_inputs(q, k, x))
    p = tp.create_pruner("prumerge_plus")
    counts = [p(qk_inputs(q[i:i + 1, :1], k[i:i + 1], x[i:i + 1])).num_kept for i in range(3)]
    assert len(set(counts)) > 1
    with pytest.raises(OptionError, match="one view per call"):
        p(qk_inputs(q[:, :1], k, x))
    for i in range(3):
        inputs = qk_inputs(q[i:i + 1], k[i:i + 1], x[i:i + 1])
        check_reduction(p, inputs, p(inputs))


# ---------------------------------------------------------------- end to end (tiny LLaVA, CLIP with CLS)
@pytest.fixture(scope="module")
def tiny():
    from test_adapters import lvlm_for

    return lvlm_for("llava")  # tokenprune.zoo.tiny.tiny_llava() wrapped (shared with the adapter tests)


def test_adapter_inputs_and_tokens_are_the_officials(tiny):
    from test_adapters import PROMPTS, images
    from tokenprune.adapters.pre_llm import prune_views

    pruner = tp.create_pruner("prumerge_plus")
    batch = tiny.prepare(images(1), PROMPTS[:1])
    views = [v for v in tiny.encode_images(batch, pruner.needs) if v.prunable]
    tower = tiny.model.model.vision_tower
    captured = {}
    attn = tower.encoder.layers[-1].self_attn  # official: layers[23] of LLaVA-1.5's 24, hooked as below
    hooks = [attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
             attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))]
    with torch.no_grad():
        hs = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    n = hs[-2].shape[1] - 1
    ref, ref_idx = token_prune_merge_advanced_plus(captured["q"], captured["k"], hs[-2][:, 1:], last=n - 1)
    rows = views[0].vision_queries.shape[0]  # the CLS row at least (every row where the adapter gives them)
    assert rows >= 1
    torch.testing.assert_close(views[0].vision_queries, captured["q"][0, :rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(views[0].vision_keys_full, captured["k"][0], rtol=0, atol=1e-6)
    (seq, tokens, sources, _), = [kept for kept, v in zip(prune_views(views, pruner, ["0"], tiny.project_features),
                                                        views)]
    assert tokens.shape[0] == ref.shape[1]
    assert sources[:-1].tolist() == views[0].seq_index[ref_idx[0]].tolist()
    assert seq.tolist() == views[0].seq_index[: ref.shape[1]].tolist()  # the first slots of the image span
    with torch.no_grad():
        torch.testing.assert_close(tokens, tiny.project_features(ref)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,options", [("prumerge", {}), ("prumerge_plus", {}),
                                          ("prumerge_plus", dict(budget="fixed", ratio=0.25))])
def test_generate_gives_the_llm_what_the_pruner_kept(tiny, name, options):
    from test_adapters import PROMPTS, LayerInputCounter, images

    pruner = tp.create_pruner(name, **options)
    imgs = images(2)
    alone = []
    for i in range(2):  # each image alone: the count the LLM must receive
        out = tiny.generate(imgs[i:i + 1], PROMPTS[i:i + 1], pruner=pruner, max_new_tokens=2)
        alone.append(out.stats[0].visual_tokens_kept)
    counter = LayerInputCounter(tiny.runner.layers)
    try:
        out = tiny.generate(imgs, PROMPTS, pruner=pruner, max_new_tokens=2)
    finally:
        counter.close()
    kept = [s.visual_tokens_kept for s in out.stats]
    assert kept == alone and all(1 <= k_ <= 64 for k_ in kept)
    if options:
        assert kept == [16, 16]  # keep_count(0.25, 64)
    longest = max(s.text_tokens + s.visual_tokens_kept for s in out.stats)  # left-padded batch
    assert [counter.lengths[i][0] for i in range(len(tiny.runner.layers))] == [longest] * len(tiny.runner.layers)
    for s in out.stats:
        assert s.visual_per_layer == [s.visual_tokens_kept] * len(s.visual_per_layer)


@pytest.fixture(scope="module")
def tiny_siglip():
    """A tiny LLaVA with a SigLIP tower (no CLS; strategy "full", the last layer's features, as
    LLaVA-OneVision reads its 26-layer SigLIP): 8x8 patches, every one a token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tokenprune.zoo.image_processors import clip_image_processor
    from tokenprune.zoo.tiny import LLAVA_TEMPLATE, _text_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=64, patch_size=8),
        text_config=dict(model_type="llama", **_text_config(len(tok))), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    processor = LlavaProcessor(
        image_processor=clip_image_processor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=0)
    return tp.wrap(LlavaForConditionalGeneration(config).eval(), processor)


def test_siglip_column_mean_is_effivlms(tiny_siglip):
    from test_adapters import PROMPTS, images
    from tokenprune.adapters.pre_llm import prune_views

    budgets = 0.25
    pruner = tp.create_pruner("prumerge_plus", ratio=(int(budgets * 64) + 1) / 64, budget="fixed")  # score auto
    batch = tiny_siglip.prepare(images(1), PROMPTS[:1])
    views = [v for v in tiny_siglip.encode_images(batch, pruner.needs) if v.prunable]
    assert views[0].vision_prefix == 0
    if views[0].vision_queries.shape[0] != views[0].vision_keys_full.shape[0]:
        pytest.skip("the adapter passes the prefix query rows only; the column mean needs every row")
    tower = tiny_siglip.model.model.vision_tower
    layer = tower.vision_model.encoder.layers[-1] if hasattr(tower, "vision_model") else tower.encoder.layers[-1]
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
             layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))]
    with torch.no_grad():
        features = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
    for h in hooks:
        h.remove()
    cls_attn = effivlm_column_mean(captured["q"], captured["k"], features.shape[-1])
    ref, ref_idx = effivlm_prumerge_plus(cls_attn, captured["k"], features, budgets)
    (seq, tokens, sources, _), = prune_views(views, pruner, ["0"], tiny_siglip.project_features)
    assert sources[:-1].tolist() == views[0].seq_index[ref_idx[0]].tolist()
    with torch.no_grad():
        torch.testing.assert_close(tokens, tiny_siglip.project_features(ref)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("zoo", ["tiny-llava-next", "tiny-qwen2-vl", "tiny-internvl"])
def test_families_without_raw_qk_refuse_in_one_line(zoo):
    """PruMerge's single-head attention needs the raw q / k rows of one view's tower pass: defined on the llava
    family; elsewhere one line, before anything runs."""
    from PIL import Image

    lvlm = tp.load(zoo)
    img = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(OptionError, match="raw query / key") as err:
        lvlm.generate([img], ["what?"], pruner=tp.create_pruner("prumerge_plus"), max_new_tokens=1)
    assert "\n" not in str(err.value)
