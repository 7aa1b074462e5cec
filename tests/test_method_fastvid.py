"""FastVID (``fastvid``): hand-computed segments, budgets, densities and merges; the official rules of both
ports re-implemented from LunarShen/FastVID@a40a109 (cited per function) and compared on random clips; and on
every video family's tiny model: ratio 1.0 == unpruned, the tokens entering each decoder layer == text + the
count the official rule gives on the model's own views (and the same kept positions), cached == uncached,
a batch of two videos == each alone; an image sample and scope="frame" refused in one line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.fastvid as fv  # registers "fastvid" (methods/__init__.py does not import it yet)
from tokenprune.adapters.pre_llm import prune_views
from tokenprune.errors import OptionError
from tokenprune.pruner import PruningInputs

from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def clip_inputs(tokens: torch.Tensor, attention: torch.Tensor, prefix: int = 0, merge: int = 1) -> PruningInputs:
    """What the adapter hands a clip_inputs pruner at scope clip: ``tokens`` ``[B, T, n, D]``, ``attention``
    ``[B, T, P', P']`` (each frame's own map)."""
    b, t, n, d = tokens.shape
    return PruningInputs(tokens=tokens.flatten(1, 2), grid=(1, t * n), view_grids=((1, n),) * t,
                         token_views=torch.arange(t).repeat_interleave(n).expand(b, -1),
                         view_times=torch.arange(t, dtype=torch.float64).expand(b, -1) / 2,
                         view_features=tokens.mean(2), view_attention=attention, vision_prefix=prefix,
                         patch_merge=merge, sample_ids=[f"s{i}" for i in range(b)])


def flat_attention(saliency: torch.Tensor) -> torch.Tensor:
    """``[B, T, n]`` -> ``[B, T, n, n]`` maps whose every row is ``saliency``: the column mean is ``saliency``."""
    return saliency[..., None, :].expand(*saliency.shape, saliency.shape[-1]).clone()


# -- hand-computed ---------------------------------------------------------------------------------------

def unit_angles(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], -1)


def test_segments_hand_computed():
    # consecutive cosines cos(10)=.985, cos(60)=.5, cos(15)=.966, cos(37)=.799
    f = unit_angles([0, 10, 70, 85, 122])
    assert fv.segment_sizes(f, c=2, tau=0.9) == [2, 2, 1]  # lowest 1: boundary 1; < .9: 1 and 3
    assert fv.segment_sizes(f, c=3, tau=0.0) == [2, 2, 1]  # the 2 lowest: .5 (1) and .799 (3)
    assert fv.segment_sizes(f, c=2, tau=0.0) == [2, 3]  # the lowest only
    assert fv.segment_sizes(f, c=1, tau=0.97) == [2, 1, 1, 1]  # < .97: boundaries 1, 2, 3 (not 0: .985)
    assert fv.segment_sizes(f, c=1, tau=-1.0) == [5]  # no cut at all
    assert fv.segment_sizes(f[:3], c=8, tau=-1.0) == [1, 1, 1]  # fewer than c frames: every boundary cuts


def test_onevision_anchor_counts_hand_computed():
    # F = 2 context tokens a frame, p = 4. L=1: the frame holds 2; L=2: ceil(2/4)=1 anchor frame (the last)
    # with 2*2 // 1 = 4; L=5: 2 anchor frames (last and last-4) with 10 // 2 = 5; L=4: the last, 8.
    assert fv.anchor_counts([1, 2, 5, 4], 2, 4) == [2, 0, 4, 5, 0, 0, 0, 5, 0, 0, 0, 8]
    # p = 2, L = 3, F = 1: ceil(3/2) = 2 anchor frames with 3 // 2 = 1 == F (the official single-frame path)
    assert fv.anchor_counts([3], 1, 2) == [1, 0, 1]


def test_qwen_budgets_hand_computed():
    # 5 frames, consecutive cosines .985, .5, .966, .799: below ignore=.95 at 1 and 3 -> runs [2, 2, 1]: frames
    # 0 and 2 are dropped (near-duplicates of the next), valid frames 1, 3, 4.
    unit = unit_angles([0, 10, 70, 85, 122]).float()
    # R=5 per frame, n=8: the segment keeps 25, context max(int(25*.4), 1) = 10, salient 15 -> 5, 5, 5 per valid
    # frame. p=4: one anchor frame, the last valid (4), its share min(10, n//2=4) = 4, so its salient min(5, 8-4) = 4.
    assert fv.qwen_frame_budgets(unit, 5, 8, 0.4, 4, 0.95) == ([0, 5, 0, 5, 4], [0, 0, 0, 0, 4])
    # p=2: anchor frames = valid frames 2 and 0 counted from the last (frames 4 and 1), shares 10 -> 5, 5, capped at 4
    assert fv.qwen_frame_budgets(unit, 5, 8, 0.4, 2, 0.95) == ([0, 4, 0, 5, 4], [0, 4, 0, 0, 4])
    # salient 13 over 3 valid frames -> 5, 4, 4 (remainder to the first): R=4, n=16, d=.4 -> context int(8.0)=8
    # (one anchor frame, cap 8), salient 12 -> 4, 4, 4; R=5, d=.48: context int(12.0)=12 -> capped 8, salient 13
    assert fv.qwen_frame_budgets(unit, 5, 16, 0.48, 4, 0.95) == ([0, 5, 0, 4, 4], [0, 0, 0, 0, 8])
    assert fv.qwen_frame_budgets(unit[:1], 5, 16, 0.4, 4, 0.95) == ([3], [2])  # one frame: R = 3 + max(int(2.0), 1)


def test_density_scores_hand_computed():
    # 1-D tokens 0, 1, 3 (D=1, M=3: all three are the 4 nearest): mean d^2 = 10/3, 5/3, 13/3.
    s = fv.density_scores(torch.tensor([[[0.0], [1.0], [3.0]]]))[0]
    expected = [1 * math.exp(-10 / 3),  # nearest denser: token 1, at 1
                3 * math.exp(-5 / 3),  # the densest: the largest distance, 3
                2 * math.exp(-13 / 3)]  # nearest denser: token 1, at 2
    torch.testing.assert_close(s, torch.tensor(expected), rtol=1e-5, atol=0)
    # tokens 0, 1, 5, 6: mean d^2 = 15.5, 10.5, 10.5, 15.5 -- tokens 1 and 5 tie as densest; the lower index
    # counts as denser, so token 1 takes the largest distance (6) and token 5 its distance to token 1 (4)
    s = fv.density_scores(torch.tensor([[[0.0], [1.0], [5.0], [6.0]]]))[0]
    torch.testing.assert_close(s[1:3], torch.tensor([6 * math.exp(-10.5), 4 * math.exp(-10.5)]), rtol=1e-5, atol=0)


def test_merge_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])
    # members 0..3: 0 and 2 join anchor 0, 1 and 3 join anchor 1; n = 2 -> w = max(1/3, .6) = .6
    tokens, weights = fv.merge(x, torch.tensor([0, 1]), torch.arange(4), beta=0.6)
    torch.testing.assert_close(tokens, torch.tensor([[1.2, 0.02], [0.02, 1.4]]))  # .6 a + .4 mean(a, m)
    torch.testing.assert_close(weights @ x, tokens)
    torch.testing.assert_close(weights[0], torch.tensor([0.8, 0.0, 0.2, 0.0]))
    # beta .2: w = 1/3 -> a/3 + 2/3 mean = (1,0)/3 + (1.5, .05) * 2/3 = (4/3, 1/30)
    tokens, _ = fv.merge(x, torch.tensor([0, 1]), torch.arange(4), beta=0.2)
    torch.testing.assert_close(tokens[0], torch.tensor([4 / 3, 1 / 30]))
    # members without the anchors (the Qwen port): anchor 0 gets 1 member -> w = max(1/2, .6): .6 a + .4 m
    tokens, _ = fv.merge(x, torch.tensor([0, 1]), torch.tensor([2, 3]), beta=0.6)
    torch.testing.assert_close(tokens, torch.tensor([[1.4, 0.04], [0.04, 1.8]]))


def test_single_frame_segments_hand_computed():
    # 2 frames of 4 tokens, ratio .75: R = 3, S = 3 - int(1.2) = 2 salient, F = 1 anchor; c=8 > T: each frame
    # its own segment. Frame 0's saliency keeps tokens 0, 1; tokens 2 (1,0) and 3 (.8,.6) tie in density (M=2),
    # the lower index counts denser -> equal scores -> token 2 is the anchor, both join it: .6 x2 + .4 mean(x2, x3)
    # = .8 x2 + .2 x3 = (.96, .12). Frame 1 keeps its tokens 2, 3 (clip 6, 7); anchor 4 = .8 x4 + .2 x5 = (.12, .96).
    x = torch.tensor([[[5.0, 5.0], [4.0, 6.0], [1.0, 0.0], [0.8, 0.6]],
                      [[0.0, 1.0], [0.6, 0.8], [7.0, 1.0], [6.0, 2.0]]])[None]
    sal = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.8, 0.1]]])
    red = tp.create_pruner("fastvid", ratio=0.75)(clip_inputs(x, flat_attention(sal)))
    assert red.indices.tolist() == [[0, 1, 2, 4, 6, 7]] and red.positions is None  # original positions
    expected = torch.tensor([[5.0, 5.0], [4.0, 6.0], [0.96, 0.12], [0.12, 0.96], [7.0, 1.0], [6.0, 2.0]])
    torch.testing.assert_close(red.tokens[0], expected)
    torch.testing.assert_close(red.token_weights[0] @ x[0].flatten(0, 1), expected)
    assert red.num_kept == 6 == 2 * tp.create_pruner("fastvid", ratio=0.75).num_kept(4, (2, 2))


def test_received_attention_is_the_saliency_where_given():
    # the same clip as above, with maps that rank tokens 3, 2 first, and vision_received (what the adapter gives
    # for frames pooled after the tower) ranking 0, 1 / 2, 3 first as before: vision_received decides.
    x = torch.tensor([[[5.0, 5.0], [4.0, 6.0], [1.0, 0.0], [0.8, 0.6]],
                      [[0.0, 1.0], [0.6, 0.8], [7.0, 1.0], [6.0, 2.0]]])[None]
    maps = flat_attention(torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]]))
    inputs = clip_inputs(x, maps)
    assert tp.create_pruner("fastvid", ratio=0.75)(inputs).indices.tolist() == [[0, 2, 3, 4, 5, 6]]
    inputs.vision_received = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.05, 0.05, 0.8, 0.1]])
    red = tp.create_pruner("fastvid", ratio=0.75)(inputs)
    assert red.indices.tolist() == [[0, 1, 2, 4, 6, 7]] and red.scores.tolist() == inputs.vision_received.tolist()


def test_multi_frame_segment_hand_computed():
    # 3 frames of 4 tokens, one segment (c=1, tau=-1), ratio .75 -> S=2, F=1; p=4: the last frame is the only
    # anchor frame, with 1*3 // 1 = 3 anchors, capped at its 2 non-salient tokens (10, 11). Every frame keeps
    # its tokens 0, 1; the segment's non-salient tokens 2, 3, 6, 7, 10, 11 join anchor 10 (1,0) or 11 (0,1):
    # 10 <- {2 (2,.1), 6 (3,0), 10}: .6 (1,0) + .4 (2, .1/3) = (1.4, .04/3);
    # 11 <- {3 (.2,3), 7 (0,2), 11}: .6 (0,1) + .4 (.2/3, 2) = (.08/3, 1.4).
    sal = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(1, 3, 4)
    x = torch.tensor([[[9.0, 1.0], [8.0, 2.0], [2.0, 0.1], [0.2, 3.0]],
                      [[9.0, 1.5], [8.0, 2.5], [3.0, 0.0], [0.0, 2.0]],
                      [[9.0, 1.2], [8.0, 2.2], [1.0, 0.0], [0.0, 1.0]]])[None]
    red = tp.create_pruner("fastvid", ratio=0.75, c=1, tau=-1)(clip_inputs(x, flat_attention(sal)))
    assert red.indices.tolist() == [[0, 1, 4, 5, 8, 9, 10, 11]]
    torch.testing.assert_close(red.tokens[0, 6:], torch.tensor([[1.4, 0.04 / 3], [0.08 / 3, 1.4]]))
    torch.testing.assert_close(red.tokens[0, :6], x[0, :, :2].flatten(0, 1))
    # c=8: three one-frame segments instead, 3 x 3 tokens
    assert tp.create_pruner("fastvid", ratio=0.75)(clip_inputs(x, flat_attention(sal))).num_kept == 9


def test_ratio_maps_to_the_retention_ratio():
    p = tp.create_pruner("fastvid")
    assert (p.ratio, p.c, p.tau, p.d, p.p, p.beta, p.variant) == (0.10, 8, 0.9, 0.4, 4, 0.6, "onevision")
    assert p.num_kept(196, (14, 14)) == 19  # int(196 * .1): 12 salient + 7 context (official OneVision)
    assert tp.create_pruner("fastvid", ratio=0.27).num_kept(196, (14, 14)) == 52  # int(52.92)
    assert tp.create_pruner("fastvid", ratio=0.001).num_kept(196, (14, 14)) == 1  # at least one per frame
    assert p.needs == tp.PrunerNeeds(vision_attention_layer=-1)
    assert p.scope == "clip" and p.clip_inputs and p.adaptive and p.quantised and p.position_policy == "keep"


def test_options_are_validated_in_one_line():
    for bad in (dict(c=0), dict(p=0), dict(d=1.5), dict(beta=-0.1), dict(tau="x"), dict(variant="llava"),
                dict(ignore=2.0)):
        with pytest.raises(OptionError) as err:
            tp.create_pruner("fastvid", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="scope"):
        tp.create_pruner("fastvid", scope="frame")


def test_ratio_one_and_the_official_no_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 8, generator=g)
    inputs = clip_inputs(x, torch.randn(2, 5, 9, 9, generator=g).softmax(-1))
    assert tp.create_pruner("fastvid", ratio=1.0)(inputs).indices.tolist() == [list(range(45))] * 2
    # the rule itself at r = 1, d = 0 (below the ratio-1 shortcut): every token salient, kept as it is
    pruner = tp.create_pruner("fastvid", ratio=1.0, d=0.0)
    x0, sal, feats = pruner._clip(inputs)
    idx, tokens, _ = pruner._onevision(x0[0].float(), sal[0], feats[0])
    assert idx.tolist() == list(range(45))
    torch.testing.assert_close(tokens, x[0].flatten(0, 1), rtol=0, atol=0)


# -- the official rules, re-implemented from the official code ---------------------------------------------

def official_onevision(video_hidden_states, frame_attn_weights, frame_global_features, retention_ratio, DySeg_c,
                       DySeg_tau, STPrune_d, DTM_p, DTM_beta):
    """LunarShen/FastVID@a40a109 fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py,
    Qwen2Model.forward, the "FastVID" block, on the video span alone (video_start_idx 0, no text), batch 1.
    Verbatim but for: the density noise (torch.rand * 1e-6) left out -- random inputs have no exact ties."""
    frame_num, frame_token_len, hidden_states_dim = video_hidden_states.shape
    video_token_len = frame_num * frame_token_len
    batchframe_indices = torch.arange(frame_num).unsqueeze(1)
    alltoken_indices = torch.arange(video_token_len).view(frame_num, frame_token_len)
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices_topk = torch.topk(similarity_matrix, DySeg_c - 1, largest=False).indices
    cut_indices_cos = torch.nonzero(similarity_matrix < DySeg_tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()
    keep_indexs, final_tokens = (), []
    frame_retain_num = int(frame_token_len * retention_ratio)
    frame_salient_num = frame_retain_num - int(frame_retain_num * STPrune_d)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int)
    frame_context_num = frame_retain_num - frame_salient_num
    offset = 0
    for seg_i_len in segment_sizes:
        seg_context_num = frame_context_num * seg_i_len
        temp_num = (seg_i_len + DTM_p - 1) // DTM_p
        cur_frm_context_num = seg_context_num // temp_num
        end = offset + seg_i_len
        seg_indices = torch.arange(seg_i_len - 1, -1, -1)
        mask = (seg_indices % DTM_p == 0)
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end
    salient_indexes = torch.topk(frame_attn_weights, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    final_tokens.append(video_hidden_states[batch_indices, salient_indexes].view(-1, hidden_states_dim))
    keep_indexs += (alltoken_indices[batch_indices, salient_indexes].view(-1),)
    all_indices = torch.arange(frame_token_len).unsqueeze(0).expand(frame_num, -1)
    all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
    all_indices_mask.scatter_(1, salient_indexes, False)
    filtered_indices = all_indices[all_indices_mask].view(frame_num, frame_token_len - frame_salient_num)
    batch_indices = batchframe_indices.expand(-1, frame_token_len - frame_salient_num)
    token_filtered = video_hidden_states[batch_indices, filtered_indices]
    alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]
    tmp_frm_hidden_states = token_filtered
    dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (hidden_states_dim ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density_mask = density[:, None, :] > density[:, :, None]
    density_mask = density_mask.type(tmp_frm_hidden_states.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, index_parent = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    density_score = dist_0 * density
    sampled_indexs = torch.topk(density_score, k=frame_context_num, dim=-1).indices
    batch_indices = batchframe_indices.expand(-1, frame_context_num)
    frm_context_tokens = token_filtered[batch_indices, sampled_indexs]
    frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
    to_be_merge_tokens = token_filtered / token_filtered.norm(dim=-1, keepdim=True)
    merge_target_tokens = to_be_merge_tokens[batch_indices, sampled_indexs]
    similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(frame_num, frame_token_len - frame_salient_num, frame_context_num, dtype=token_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=DTM_beta)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), token_filtered) / counts
    frm_context_tokens = avg_weights * frm_context_tokens + (1 - avg_weights) * aggregated_hidden
    context_for_frame_mask = (frm_context_num_list == frame_context_num)
    final_tokens.append(frm_context_tokens[context_for_frame_mask].view(-1, hidden_states_dim))
    keep_indexs += (frm_context_global_indexes[context_for_frame_mask].view(-1),)
    idx_seg_start = 0
    for seg_i_len in segment_sizes:
        if seg_i_len > 1:
            cur_seg_context_num_list = frm_context_num_list[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_context_num = cur_seg_context_num_list[-1]
            cur_seg_target_mask = (cur_seg_context_num_list > frame_context_num)
            cur_seg_target_num = cur_seg_target_mask.sum()
            cur_seg_density_score = density_score[idx_seg_start:idx_seg_start + seg_i_len][cur_seg_target_mask]
            cur_seg_token_filtered = token_filtered[idx_seg_start:idx_seg_start + seg_i_len]
            cur_seg_token_target = cur_seg_token_filtered[cur_seg_target_mask]
            cur_seg_token_filtered = cur_seg_token_filtered.view(1, -1, hidden_states_dim).expand(cur_seg_target_num, -1, -1)
            cur_seg_alltoken_indices = alltoken_filtered_indices[idx_seg_start:idx_seg_start + seg_i_len][cur_seg_target_mask]
            sampled_indexs = torch.topk(cur_seg_density_score, k=int(cur_seg_context_num), dim=-1).indices
            batch_indices = batchframe_indices[:cur_seg_target_num].expand(-1, int(cur_seg_context_num))
            cur_context_tokens = cur_seg_token_target[batch_indices, sampled_indexs]
            cur_context_global_indexes = cur_seg_alltoken_indices[batch_indices, sampled_indexs]
            to_be_merge_tokens = cur_seg_token_filtered / cur_seg_token_filtered.norm(dim=-1, keepdim=True)
            merge_target_tokens = cur_context_tokens / cur_context_tokens.norm(dim=-1, keepdim=True)
            similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
            assign_one_hot = torch.zeros(int(cur_seg_target_num), to_be_merge_tokens.shape[1], int(cur_seg_context_num),
                                         dtype=token_filtered.dtype)
            assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=DTM_beta)
            counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), cur_seg_token_filtered) / counts
            cur_context_tokens = avg_weights * cur_context_tokens + (1 - avg_weights) * aggregated_hidden
            final_tokens.append(cur_context_tokens.view(-1, hidden_states_dim))
            keep_indexs += (cur_context_global_indexes.view(-1),)
        idx_seg_start += seg_i_len
    hidden_states = torch.cat(final_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs, dim=0)
    sorted_indexs = torch.argsort(keep_indexs)
    return keep_indexs[sorted_indexs], hidden_states[sorted_indexs]


def official_qwen2_5_vl(video_hidden_states, frame_attn_weights, frame_global_features, retention_ratio, DySeg_c,
                        DySeg_tau, DySeg_ignore, STPrune_d, DTM_p, DTM_beta):
    """LunarShen/FastVID@a40a109 fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py,
    Qwen2_5_VLForConditionalGeneration.forward, the pruning block after get_rope_index, on the video span alone
    (prompt_start_len 0). Verbatim but for the density noise, left out (no exact ties in random inputs)."""
    frame_num, frm_tokens, _ = video_hidden_states.shape
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices = torch.topk(similarity_matrix, DySeg_c - 1, largest=False).indices
    cos_indices = torch.nonzero(similarity_matrix < DySeg_tau).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices, cos_indices])).sort().values
    segment_sizes = [cut_indices[0].item() + 1]
    for i in range(1, cut_indices.shape[0]):
        segment_sizes.append(cut_indices[i].item() - cut_indices[i - 1].item())
    segment_sizes.append(frame_num - cut_indices[-1].item() - 1)
    segments_hidden_states = torch.split(video_hidden_states, segment_sizes)
    segments_attn_weights = torch.split(frame_attn_weights, segment_sizes)
    segments_global_features = torch.split(frame_global_features, segment_sizes)
    vision_tokens, keep_indexs = [], []
    frame_retain_num = int(frm_tokens * retention_ratio)
    seg_index_start = 0
    for seg_i in range(len(segment_sizes)):
        cur_hidden_states = segments_hidden_states[seg_i]
        cur_attn_weights = segments_attn_weights[seg_i]
        cur_global_features = segments_global_features[seg_i]
        cur_seg_len, frm_len = cur_attn_weights.shape
        seg_retain_num = frame_retain_num * cur_seg_len
        seg_context_num = max(int(seg_retain_num * STPrune_d), 1)
        seg_salient_num = seg_retain_num - seg_context_num
        if cur_seg_len == 1:
            frm_salient_num = [seg_salient_num]
            frm_context_num = [seg_context_num]
        else:
            cur_global_similarity_matrix = (cur_global_features[:-1] * cur_global_features[1:]).sum(dim=1)
            cur_cut_indices = torch.nonzero(cur_global_similarity_matrix < DySeg_ignore).squeeze(1).sort().values
            if cur_cut_indices.shape[0] > 0:
                cur_segment_sizes = [cur_cut_indices[0].item() + 1]
                for i in range(1, cur_cut_indices.shape[0]):
                    cur_segment_sizes.append(cur_cut_indices[i].item() - cur_cut_indices[i - 1].item())
                cur_segment_sizes.append(cur_seg_len - cur_cut_indices[-1].item() - 1)
            else:
                cur_segment_sizes = [cur_seg_len]
            valid_seg_len = len(cur_segment_sizes)
            chunk_size = seg_salient_num // valid_seg_len
            remainder = seg_salient_num % valid_seg_len
            frm_salient_num = [chunk_size + (1 if i < remainder else 0) for i in range(valid_seg_len)]
            temp_num = (valid_seg_len + DTM_p - 1) // DTM_p
            chunk_size = seg_context_num // temp_num
            remainder = seg_context_num % temp_num
            temp_context_num = [chunk_size + (1 if i < remainder else 0) for i in range(temp_num)]
            tmp_ctx_idx = 0
            frm_context_num = []
            for tmp_i in range(valid_seg_len):
                if tmp_i % DTM_p == 0:
                    frm_context_num.append(min(temp_context_num[tmp_ctx_idx], frm_len // 2))
                    if temp_context_num[tmp_ctx_idx] + frm_context_num[-1] > frm_len:
                        temp_context_num[tmp_ctx_idx] = frm_len - frm_context_num[-1]
                    tmp_ctx_idx += 1
                else:
                    frm_context_num.append(0)
            frm_context_num.reverse()
            valid_frm_salient_num, valid_frm_context_num = [], []
            for k in range(valid_seg_len):
                valid_frm_salient_num.extend([0] * (cur_segment_sizes[k] - 1))
                valid_frm_context_num.extend([0] * (cur_segment_sizes[k] - 1))
                if frm_context_num[k] == 0:
                    valid_frm_salient_num.append(min(frm_salient_num[k], frm_len))
                    valid_frm_context_num.append(0)
                elif frm_context_num[k] > 0:
                    valid_frm_context_num.append(min(frm_context_num[k], frm_len // 2))
                    valid_frm_salient_num.append(min(frm_salient_num[k], frm_len - valid_frm_context_num[-1]))
            frm_salient_num, frm_context_num = valid_frm_salient_num, valid_frm_context_num
        cur_salient_indexs, cur_context_indexs = [], []
        for frame_i in range(cur_seg_len):
            frm_top_indexes = torch.topk(cur_attn_weights[frame_i], frm_salient_num[frame_i]).indices \
                if frm_salient_num[frame_i] > 0 else None
            if frm_context_num[frame_i] > 0:
                frm_all_indexs = torch.arange(frm_len)
                remaining_indexs = frm_all_indexs[~torch.isin(frm_all_indexs, frm_top_indexes)] \
                    if frm_top_indexes is not None else frm_all_indexs
                tmp_frm_hidden_states = cur_hidden_states[frame_i][remaining_indexs].unsqueeze(0)
                _, tmp_N, tmp_D = tmp_frm_hidden_states.shape
                dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (tmp_D ** 0.5)
                dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
                density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
                mask = (density[:, None, :] > density[:, :, None]).type(tmp_frm_hidden_states.dtype)
                dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
                dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
                score = dist * density
                _, sampled_indexs = torch.topk(score, k=frm_context_num[frame_i], dim=-1)
                frm_context_indexes = remaining_indexs[sampled_indexs[0].sort().values]
            else:
                frm_context_indexes = None
            if frm_top_indexes is not None:
                cur_salient_indexs.append(frm_top_indexes + frame_i * frm_len)
            if frm_context_indexes is not None:
                cur_context_indexs.append(frm_context_indexes + frame_i * frm_len)
        cur_tome_hidden_states = cur_hidden_states.reshape(cur_seg_len * frm_len, -1)
        cur_salient_indexs = torch.cat(cur_salient_indexs)
        cur_salient_hidden_states = cur_tome_hidden_states[cur_salient_indexs]
        cur_all_indexs = torch.arange(cur_seg_len * frm_len)
        cur_tome_tokens = cur_tome_hidden_states / cur_tome_hidden_states.norm(dim=-1, keepdim=True)
        cur_context_hidden_states = []
        for tmp_context_indexs in cur_context_indexs:
            tmp_retain_index = torch.cat([cur_salient_indexs, tmp_context_indexs])
            tmp_merge_indexs = cur_all_indexs[~torch.isin(cur_all_indexs, tmp_retain_index)]
            similarity = torch.mm(cur_tome_tokens[tmp_merge_indexs], cur_tome_tokens[tmp_context_indexs].T)
            assign_one_hot = torch.zeros(tmp_merge_indexs.shape[0], tmp_context_indexs.shape[0], dtype=cur_hidden_states.dtype)
            assign_one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=DTM_beta)
            counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            aggregated_hidden = torch.mm(assign_one_hot.T, cur_tome_hidden_states[tmp_merge_indexs]) / counts
            target_hidden = cur_tome_hidden_states[tmp_context_indexs]
            cur_context_hidden_states.append(avg_weights * target_hidden + (1 - avg_weights) * aggregated_hidden)
        cur_index_combined = torch.cat([cur_salient_indexs, torch.cat(cur_context_indexs)])
        cur_hidden_combined = torch.cat([cur_salient_hidden_states, torch.cat(cur_context_hidden_states, dim=0)], dim=0)
        sorted_indexs = torch.argsort(cur_index_combined)
        vision_tokens.append(cur_hidden_combined[sorted_indexs])
        keep_indexs.append(cur_index_combined[sorted_indexs] + seg_index_start)
        seg_index_start = seg_index_start + cur_seg_len * frm_len
    return torch.cat(keep_indexs), torch.cat(vision_tokens)


def column_saliency(attention: torch.Tensor, prefix: int, merge: int) -> torch.Tensor:
    """The attention source (see methods/fastvid.py): ``[T, P', P']`` -> ``[T, n]``, received attention averaged
    over the patch query rows, then over each token's ``merge`` patches."""
    col = attention[:, prefix:, prefix:].float().mean(1)
    return col.view(col.shape[0], -1, merge).mean(-1)


def random_clip(seed: int, t: int = 12, n: int = 36, dim: int = 24, merge: int = 1, prefix: int = 0):
    """A clip with temporal structure: ``[1, t, n, dim]`` tokens (a random base per run of frames, a drift per
    frame, noise per token) and ``[1, t, P', P']`` row-softmax attention maps."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(t - 1, generator=g)[:4].tolist())
    runs = torch.tensor([b - a for a, b in zip([-1] + cuts, cuts + [t - 1])])
    base = (3 * torch.randn(len(runs), dim, generator=g)).repeat_interleave(runs, 0)
    drift = torch.rand(t, 1, generator=g) * torch.randn(t, dim, generator=g)
    x = base[:, None] + drift[:, None] + torch.randn(t, n, dim, generator=g)
    p = prefix + n * merge
    attention = (3 * torch.randn(t, p, p, generator=g)).softmax(-1)
    return x[None], attention[None]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio,c,tau,d,p,beta", [(0.25, 4, 0.9, 0.4, 4, 0.6), (0.3, 8, 0.9, 0.4, 2, 0.6),
                                                  (0.2, 3, 0.5, 0.5, 3, 0.3), (0.25, 1, 0.99, 0.4, 4, 0.6)])
def test_onevision_equals_official_rule_on_random_clips(seed, ratio, c, tau, d, p, beta):
    x, attention = random_clip(seed)
    red = tp.create_pruner("fastvid", ratio=ratio, c=max(c, 1), tau=tau, d=d, p=p, beta=beta)(clip_inputs(x, attention))
    sal = column_saliency(attention[0], 0, 1)
    keep, tokens = official_onevision(x[0], sal, x[0].mean(1), ratio, c, tau, d, p, beta)
    assert red.indices[0].tolist() == keep.tolist()
    assert (red.tokens[0] - tokens).abs().max().item() <= 1e-5
    torch.testing.assert_close(red.token_weights[0] @ x[0].flatten(0, 1), red.tokens[0], rtol=0, atol=1e-5)


def test_onevision_segments_of_several_frames_are_exercised():
    """The random clips above hold multi-frame segments (and single ones), so both DTM paths are compared."""
    sizes = [fv.segment_sizes(random_clip(s)[0][0].mean(1), 4, 0.9) for s in range(6)]
    assert all(max(z) > 1 for z in sizes) and any(min(z) == 1 for z in sizes)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio,c,tau,ignore,d,p", [(0.27, 4, 0.84, 0.95, 0.4, 4), (0.3, 3, 0.9, 0.999, 0.4, 2),
                                                    (0.2, 6, 0.5, 0.99, 0.5, 1)])
def test_qwen_port_equals_official_rule_on_random_clips(seed, ratio, c, tau, ignore, d, p):
    x, attention = random_clip(seed, t=10, n=16, merge=4)
    pruner = tp.create_pruner("fastvid", ratio=ratio, c=c, tau=tau, ignore=ignore, d=d, p=p, variant="qwen2_5_vl")
    red = pruner(clip_inputs(x, attention, merge=4))
    keep, tokens = official_qwen2_5_vl(x[0], column_saliency(attention[0], 0, 4), x[0].mean(1), ratio, c, tau, ignore,
                                       d, p, 0.6)
    assert red.indices[0].tolist() == keep.tolist()
    assert (red.tokens[0] - tokens).abs().max().item() <= 1e-5


def test_qwen_port_drops_near_duplicate_frames_in_the_random_clips():
    """The random clips above hold frames the qwen2_5_vl rule drops whole (cosine >= ignore with the next)."""
    dropped = 0
    for seed in range(6):
        f = random_clip(seed, t=10, n=16, merge=4)[0][0].mean(1)
        unit, start = f / f.norm(dim=-1, keepdim=True), 0
        for length in fv.segment_sizes(f, 4, 0.84):
            salient, context = fv.qwen_frame_budgets(unit[start:start + length], 4, 16, 0.4, 4, 0.95)
            dropped += sum(s == 0 and k == 0 for s, k in zip(salient, context))
            start += length
    assert dropped > 10


def test_random_clips_batched_equal_each_alone():
    xs, maps = zip(*(random_clip(s) for s in (0, 0)))
    x, attention = torch.cat(xs), torch.cat(maps)
    x[1] = x[1] * 1.5  # same segments, same count; other tokens
    for variant in fv.VARIANTS:
        pruner = tp.create_pruner("fastvid", ratio=0.25, c=4, variant=variant)
        both = pruner(clip_inputs(x, attention))
        for i in range(2):
            alone = pruner(clip_inputs(x[i:i + 1], attention[i:i + 1]))
            assert torch.equal(alone.indices[0], both.indices[i]) and torch.equal(alone.tokens[0], both.tokens[i])


def test_clips_of_different_counts_in_one_batch_are_one_line():
    # clip 0's segments [1, 3, 1, 6, 1] keep 12 x 6 salient + 3 + 9 + 3 + 2 x (18 // 2) + 3 = 108 (R = 9 a frame);
    # clip 1's [1, 2, 1, 7, 1]: 72 + 3 + 6 + 3 + 2 x (21 // 2) + 3 = 107
    (x0, a0), (x1, a1) = random_clip(0), random_clip(1)
    pruner = tp.create_pruner("fastvid", ratio=0.25, c=4)
    assert [pruner(clip_inputs(x, a)).num_kept for x, a in ((x0, a0), (x1, a1))] == [108, 107]
    with pytest.raises(OptionError, match="one at a time") as err:
        pruner(clip_inputs(torch.cat([x0, x1]), torch.cat([a0, a1])))
    assert "\n" not in str(err.value)


# -- on every video family's tiny model --------------------------------------------------------------------

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl"]
# ratio .6 on frames of 9 (Qwen2/2.5/3, OneVision) or 16 tokens (NeXT-Video, InternVL): salient tokens AND anchors.
# c=3 on 4 frames: 3 segments, one of 2 frames (both DTM paths); tau=-1: no cut by threshold; ignore=1: no frame
# dropped as a near-duplicate (the qwen2_5_vl rule's budgets then add up to R per frame, so two clips of one
# layout keep one count; the adapters run each clip on its own anyway, as fastvid is adaptive).
RATIO = 0.6


def clip_for(family: str, seed: int = 0) -> tp.Video:
    """4 views (Qwen's temporal patches are 2 frames); Qwen3-VL at 96 px for 3x3 tokens a frame (the official
    density takes each token's 4 nearest non-salient neighbours: a frame needs 4 of them)."""
    return video(8 if family.startswith("qwen") else 4, side=96 if family == "qwen3_vl" else 48, seed=seed)


def make(family: str, ratio: float | None = None) -> fv.FastVIDPruner:
    variant = "qwen2_5_vl" if family == "qwen2_5_vl" else "onevision"
    return tp.create_pruner("fastvid", ratio=RATIO if ratio is None else ratio, c=3, tau=-1.0,
                            ignore=1.0, variant=variant)


def received_reaches_the_pruner(lvlm, clip: tp.Video, pruner: fv.FastVIDPruner) -> bool:
    """Whether the adapter hands the pruner ``vision_received`` for this clip (frames pooled after the tower, where
    the framework passes it at scope clip), checked against the views' own."""
    seen = []
    spy = type("Spy", (fv.FastVIDPruner,), {"select": lambda self, inputs: seen.append(inputs) or
                                            fv.FastVIDPruner.select(self, inputs)})(**pruner.options)
    enc = lvlm.encode([clip], PROMPTS[:1], spy.needs)
    prune_views(enc.views, spy, ["0"], lvlm.project_features)
    if seen[0].vision_received is None:
        return False
    assert torch.equal(seen[0].vision_received[0], torch.cat([v.vision_received for v in enc.views if v.prunable]))
    return True


def official_on_views(lvlm, clip: tp.Video, pruner: fv.FastVIDPruner) -> tuple[list[int], torch.Tensor]:
    """The official rule on the model's own views: (kept sequence positions, kept tokens). Saliency: each view's
    column mean, or its ``vision_received`` where the adapter hands that to the pruner."""
    enc = lvlm.encode([clip], PROMPTS[:1], pruner.needs)
    frames = [v for v in enc.views if v.prunable]
    x = torch.stack([v.tokens for v in frames]).float()
    if received_reaches_the_pruner(lvlm, clip, pruner):
        sal = torch.stack([v.vision_received.float() for v in frames])
    else:
        sal = torch.stack([column_saliency(v.vision_attention[None], v.vision_prefix, v.patch_merge)[0]
                           for v in frames])
    seq = torch.cat([v.seq_index for v in frames])
    if pruner.variant == "onevision":
        keep, tokens = official_onevision(x, sal, x.mean(1), pruner.ratio, pruner.c, pruner.tau, pruner.d, pruner.p,
                                          pruner.beta)
    else:
        keep, tokens = official_qwen2_5_vl(x, sal, x.mean(1), pruner.ratio, pruner.c, pruner.tau, pruner.ignore,
                                           pruner.d, pruner.p, pruner.beta)
    return seq[keep].tolist(), tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    clips = [clip_for(family, 0), clip_for(family, 1)]
    pruner = make(family)
    # the official rule on the model's own views: the same positions kept, the same merged tokens
    enc = lvlm.encode(clips[:1], PROMPTS[:1], pruner.needs)
    frames = [v for v in enc.views if v.prunable]
    assert len(frames) == 4
    assert sorted(fv.segment_sizes(torch.stack([v.tokens.mean(0) for v in frames]), 3, -1.0)) == [1, 1, 2]
    visual_positions = {i for v in frames for i in v.seq_index.tolist()}
    by_position = {s: tok for seq, toks, *_ in prune_views(enc.views, pruner, ["0"], lvlm.project_features)
                   for s, tok in zip(seq.tolist(), toks.float()) if s in visual_positions}
    ref_seq, ref_tokens = official_on_views(lvlm, clips[0], pruner)
    assert sorted(by_position) == ref_seq
    assert torch.stack([by_position[s] for s in ref_seq]).sub(ref_tokens).abs().max().item() <= 1e-5
    n_visual = len(visual_positions)
    expected = len(ref_seq)
    assert expected < n_visual
    # ratio 1.0 == unpruned
    ref = lvlm.generate(clips, PROMPTS, max_new_tokens=4)
    full = lvlm.generate(clips, PROMPTS, pruner=make(family, 1.0), max_new_tokens=4)
    assert torch.equal(full.token_ids, ref.token_ids)
    assert (full.first_logits - ref.first_logits).abs().max().item() <= 1e-5
    # tokens entering each decoder layer at prefill == text + the official count
    n_text = lvlm.prepare(clips[:1], PROMPTS[:1])["input_ids"].shape[1] - n_visual
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate(clips[:1], PROMPTS[:1], pruner=pruner, max_new_tokens=1)
    finally:
        counter.close()
    layers = len(lvlm.runner.layers)
    assert [counter.lengths[i][0] for i in range(layers)] == [n_text + expected] * layers
    assert out.stats[0].visual_tokens_kept == expected
    # cached == uncached; the batch == each alone
    ids = ["a", "b"]
    cached = lvlm.generate(clips, PROMPTS, pruner=pruner, max_new_tokens=4, ignore_eos=True, sample_ids=ids)
    uncached = lvlm.generate(clips, PROMPTS, pruner=pruner, max_new_tokens=4, ignore_eos=True, use_cache=False,
                             sample_ids=ids)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    for i, sid in enumerate(ids):
        alone = lvlm.generate(clips[i:i + 1], PROMPTS[i:i + 1], pruner=pruner, max_new_tokens=4, ignore_eos=True,
                              sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i]) and alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_video_checks_at_the_defaults(family):
    """tests/video_checks.py at the official c, tau, d, p, beta (4 views < c: one-frame segments): ratio 1.0 ==
    unpruned, per-layer counts == what the run reports, cached == uncached, batch == alone."""
    check_pruner_on(lvlm_for(family), [clip_for(family, 0), clip_for(family, 1)], PROMPTS, "fastvid", ratio=0.6,
                    new_tokens=4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_an_image_sample_is_refused_in_one_line(family):
    with pytest.raises(OptionError, match="video") as err:
        lvlm_for(family).generate([images(1)[0]], PROMPTS[:1], pruner=make(family), max_new_tokens=1)
    assert "\n" not in str(err.value)
