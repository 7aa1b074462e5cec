"""FrameFusion (``framefusion``): the cost rule, the patch similarities and run merges by hand, a stage-by-stage
run by hand; the official ``FrameFusion`` module transcribed from thu-nics/FrameFusion@fbec1d2
(``framefusion/main.py``) and compared call for call on random sequences (identical surviving tokens, hidden
states <= 1e-5); and on every video family's tiny model: the official decoder loop
(``Qwen2DecoderLayer_merge_then_prune_by_cost_forward``: the module on layer 0's input, then after every layer's
attention, before its MLP) run on the model's own layers against tokenprune's prefill (same first logits and
per-layer counts), ratio 1.0 == unpruned, the tokens entering each layer by forward pre-hooks == text + the
visual tokens the method reports, cached == uncached, a batch of two videos == each alone; an image sample
refused in one line; the framework's contract checks."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import tokenprune as tp
import tokenprune.methods.framefusion as ff  # registers "framefusion" (methods/__init__.py does not import it yet)
from tokenprune.errors import OptionError
from tokenprune.pruner import LLMStage, PrunerNeeds, PruningInputs, Reduction
from tokenprune.testing import check_pruner_contract, synthetic_inputs

from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def unit(degrees: list[float]) -> torch.Tensor:
    """2-D unit vectors at the given angles: the cosine of two is the cosine of their angle difference."""
    a = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], -1).float()


def stage_inputs(tokens: torch.Tensor, stage: int, memory: list[dict], grids=None, attention=None,
                 n_layers: int = 28) -> PruningInputs:
    """What the decoder hands the pruner at ``stage``: visual tokens ``[1, n, D]``, views at stage 0."""
    n = tokens.shape[1]
    return PruningInputs(tokens=tokens, grid=(1, n), view_grids=grids if stage == 0 else None, stage=stage,
                         layer=stage, num_layers=n_layers, memory=memory, sample_ids=["s"],
                         llm_attention=None if attention is None else attention[None, None])


# -- hand-computed ---------------------------------------------------------------------------------------------

def test_cost_rule_by_hand():
    # no merge yet: p = 1 - L cost / L = 1 - cost
    assert ff.pruning_ratio([], 0.3, 28) == pytest.approx(0.7)
    # after a step that merged half: s = 0.5, spent 0.5, remain 8.4 - 0.5 = 7.9 over 27 layers at s = 0.5
    assert ff.pruning_ratio([0.5], 0.3, 28) == pytest.approx(1 - 7.9 / 13.5)
    # [0.5, 0.2]: s = 0.5, 0.4; spent 0.9; remain 8.4 - 0.9 = 7.5 over 26 layers at s = 0.4
    assert ff.pruning_ratio([0.5, 0.2], 0.3, 28) == pytest.approx(1 - 7.5 / 10.4)
    # cost 1: nothing to drop (the unpruned model); a budget above what is left: 0
    assert ff.pruning_ratio([], 1.0, 4) == 0
    assert ff.pruning_ratio([0.2], 0.9, 4) == 0  # remain 3.6 - 0.8 = 2.8 > 3 * 0.8
    # spent more than L cost: the official "The cost is too small", one line
    with pytest.raises(OptionError, match="too small") as err:
        ff.pruning_ratio([0.1, 0.1], 0.4, 4)  # 1.6 - (0.9 + 0.81) < 0
    assert "\n" not in str(err.value)


def test_patch_similarity_and_run_merge_by_hand():
    # 3 frames x 2 patches, sequence f0p0 f0p1 f1p0 f1p1 f2p0 f2p1 = 0..5
    # patch 0 at 0, 30, 40 degrees; patch 1 at 0, 90, 100 degrees
    x = unit([0, 0, 30, 90, 40, 100])
    patch = torch.tensor([0, 1, 0, 1, 0, 1])
    sim, order = ff.patch_similarity(x, patch)
    assert order.tolist() == [0, 2, 4, 1, 3, 5]  # by patch, then by frame
    c30, c10 = np.cos(np.pi / 6), np.cos(np.pi / 18)
    torch.testing.assert_close(sim, torch.tensor([-2, c30, c10, -2, 0.0, c10], dtype=torch.float32), atol=1e-6, rtol=0)
    kept, into, w = ff.run_merge(sim >= 0.6, order)
    # patch 0: 2 and 4 (one run) into 0, each 1/3; patch 1: 5 into 3, each 1/2; 1 untouched
    assert kept.tolist() == [True, True, False, True, False, False]
    assert into.tolist() == [0, -1, 0, 2, 0, 2]  # slots into the kept tokens 0, 1, 3
    torch.testing.assert_close(w, torch.tensor([1 / 3, 0, 1 / 3, 1 / 2, 1 / 3, 1 / 2]))
    red = Reduction(indices=kept.nonzero().flatten()[None], merge_into=into[None], merge_into_weights=w[None])
    out = red.apply(x[None])[0]
    torch.testing.assert_close(out, torch.stack([(x[0] + x[2] + x[4]) / 3, x[1], (x[3] + x[5]) / 2]))


def test_stages_by_hand():
    p = tp.create_pruner("framefusion", ratio=0.5, cost_layers=4)
    memory = [{}]
    grids = ((1, 2),) * 3
    x = unit([0, 0, 30, 90, 40, 100])[None]  # as above: 3 of 6 tokens similar >= 0.6
    # stage 0: p = 1 - 2 / 4 = 0.5; share 3 / 6 = 0.5 is not < 0.5: the budget branch merges the int(0.5 * 6) = 3
    # most similar (the same three), and stops merging and pruning
    red = p.select(stage_inputs(x, 0, memory, grids, n_layers=4))
    assert red.indices.tolist() == [[0, 1, 3]] and red.merge_into.tolist() == [[0, -1, 0, 2, 0, 2]]
    assert memory[0]["merged"] and memory[0]["pruned"] and memory[0]["patch"].tolist() == [0, 1, 1]
    later = p.select(stage_inputs(unit([0, 10, 20])[None], 1, memory, attention=torch.tensor([0.5, 0.3, 0.2])))
    assert later.indices.tolist() == [[0, 1, 2]] and later.merge_into is None  # nothing more

    # ratio 0.6 on 4 layers: p = 1 - 2.4 / 4 = 0.4 < 0.5: the budget branch with the int(0.4 * 6) = 2 most similar
    # (the two cos 10 of patch order places 2 and 5: tokens 4 and 5): 4 into 2, 5 into 3, halves
    p = tp.create_pruner("framefusion", ratio=0.6, cost_layers=4)
    memory = [{}]
    red = p.select(stage_inputs(x, 0, memory, grids, n_layers=4))
    assert red.indices.tolist() == [[0, 1, 2, 3]] and red.merge_into.tolist() == [[-1, -1, 2, 3, 2, 3]]
    torch.testing.assert_close(red.merge_into_weights, torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5]]))
    assert memory[0]["merged"] and memory[0]["pruned"] and memory[0]["patch"].tolist() == [0, 1, 0, 1]

    # 4 frames x 2 patches: patch 0 at 0, 5, 0, 3 degrees (sims cos 5, cos 5, cos 3: all merge), patch 1 at
    # 0, 0, 90, 0 (sims 1, 0, 0: one merges): 4 of 8
    x = unit([0, 0, 5, 0, 0, 90, 3, 0])[None]
    grids = ((1, 2),) * 4
    # ratio 0.9 over 28 layers: p = 1 - 25.2 / 28 = 0.1; 0.5 is not < 0.1: budget branch, int(0.1 * 8) = 0 merged
    red = tp.create_pruner("framefusion", ratio=0.9).select(stage_inputs(x, 0, [{}], grids))
    assert red.indices.tolist() == [list(range(8))]
    # ratio 0.4: p = 1 - 11.2 / 28 = 0.6 > 0.5: appended (>= 0.1: merging goes on)
    p = tp.create_pruner("framefusion", ratio=0.4)
    memory = [{}]
    red = p.select(stage_inputs(x, 0, memory, grids))
    assert red.indices.tolist() == [[0, 1, 5, 7]]  # 2, 4, 6 into 0 (a run of 3); 3 into 1
    assert red.merge_into.tolist() == [[0, 1, 0, 1, 0, -1, 0, -1]]
    torch.testing.assert_close(red.merge_into_weights, torch.tensor([[1 / 4, 1 / 2, 1 / 4, 1 / 2, 1 / 4, 0, 1 / 4, 0]]))
    assert memory[0]["sparsity"] == [0.5] and memory[0]["patch"].tolist() == [0, 1, 1, 1] and not memory[0]["merged"]
    # stage 1 (inside layer 0): patch 1's three tokens at 90, 0, 90 degrees: sims 0, 0 -> share 0 < 0.1: appended,
    # merging stops (p = 1 - 10.7 / 13.5 > 0)
    y = unit([0, 90, 0, 90])[None]
    red = p.select(stage_inputs(y, 1, memory, attention=torch.tensor([0.1, 0.2, 0.3, 0.4])))
    assert red.indices.tolist() == [[0, 1, 2, 3]] and memory[0]["sparsity"] == [0.5, 0.0] and memory[0]["merged"]
    # stage 2 (inside layer 1): the cut. s = 0.5, 0.5; spent 1.0; remain 11.2 - 1 = 10.2 over 26 layers at 0.5:
    # p = 1 - 10.2 / 13 = 0.2154; k = round(4 * 0.7846) = round(3.14) = 3: the top 3 of [0.1, 0.7, 0.2, 0.4]
    red = p.select(stage_inputs(y, 2, memory, attention=torch.tensor([0.1, 0.7, 0.2, 0.4])))
    assert red.indices.tolist() == [[1, 2, 3]] and memory[0]["pruned"]
    assert memory[0]["patch"].tolist() == [1, 1, 1]
    red = p.select(stage_inputs(y[:, :3], 3, memory, attention=torch.tensor([0.9, 0.05, 0.05])))
    assert red.indices.tolist() == [[0, 1, 2]]  # done: nothing more


def test_schedule_and_options():
    p = tp.create_pruner("framefusion")
    assert p.ratio == 0.3 and p.similarity == 0.6 and p.ratio_lower_bound == 0.1 and p.cost_layers is None
    stages = p.llm_schedule(4)
    assert stages == (LLMStage(0), LLMStage(1, "previous", "last", after_attention=True),
                      LLMStage(2, "previous", "last", after_attention=True),
                      LLMStage(3, "previous", "last", after_attention=True))
    assert tp.create_pruner("framefusion", ratio=1.0).llm_schedule(4) == ()
    for bad in [dict(similarity=2), dict(ratio_lower_bound=-1), dict(cost_layers=0), dict(similarity="x")]:
        with pytest.raises(OptionError) as err:
            tp.create_pruner("framefusion", **bad)
        assert "\n" not in str(err.value)


def test_refuses_one_view_and_mixed_grids():
    p = tp.create_pruner("framefusion")
    x = torch.randn(1, 6, 4)
    with pytest.raises(OptionError, match="one view"):
        p.select(stage_inputs(x, 0, [{}], ((2, 3),)))
    with pytest.raises(OptionError, match="different grids"):
        p.select(stage_inputs(x, 0, [{}], ((1, 2), (2, 2))))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3, 0.1])
def test_contract(ratio):
    check_pruner_contract(tp.create_pruner("framefusion", ratio=ratio), synthetic_inputs(grid=(6, 8)))


# -- the official module, transcribed ----------------------------------------------------------------------------
# thu-nics/FrameFusion@fbec1d2 framefusion/main.py, near-verbatim (batch 1). One line differs, marked: the cut's
# image span is the visual positions (the official slices [start, start + count), the same when they are
# contiguous, as in this test's sequences).

TEXT_TOKEN = -1
IGNORE_TOKEN = -2


def official_cosine_similarity(mat1, mat2):
    dot_product = torch.sum(mat1 * mat2, dim=-1)
    norm_vec1 = torch.norm(mat1, dim=-1)
    norm_vec2 = torch.norm(mat2, dim=-1)
    return dot_product / (norm_vec1 * norm_vec2)


def official_find_contigious_latter_index(index_tensor):
    bsz, n = index_tensor.shape
    t_prev = torch.cat([torch.zeros((bsz, 1), dtype=index_tensor.dtype, device=index_tensor.device), index_tensor[:, :-1]], dim=1)
    t_next = torch.cat([index_tensor[:, 1:], torch.zeros((bsz, 1), dtype=index_tensor.dtype, device=index_tensor.device)], dim=1)
    run_starts = (index_tensor == 1) & (t_prev == 0)
    run_ends = (index_tensor == 1) & (t_next == 0)
    start_indices = torch.nonzero(run_starts, as_tuple=True)
    end_indices = torch.nonzero(run_ends, as_tuple=True)
    run_lengths = (end_indices[1] - start_indices[1] + 1).to(index_tensor.dtype)
    output = torch.zeros_like(index_tensor, dtype=index_tensor.dtype)
    output[end_indices[0], end_indices[1]] = run_lengths
    return output


class OfficialFrameFusion:
    def __init__(self, cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1, num_layers=28):
        self.cost = cost
        self.similarity_lower_bound = similarity_lower_bound
        self.ratio_lower_bound = ratio_lower_bound
        self.num_layers = num_layers  # (the official passes its default 28 to _compute_pruning_ratio)

    def prepare(self, patch_type, patch_num, image_token_start_index, image_token_end_index, image_token_length,
                original_length, finish_merging=False, finish_pruning=False, sparsity_list=None):
        self.patch_type = patch_type
        self.patch_num = patch_num
        self.image_token_start_index = image_token_start_index
        self.image_token_end_index = image_token_end_index
        self.image_token_length = image_token_length
        self.original_length = original_length
        self.finish_merging = finish_merging
        self.finish_pruning = finish_pruning
        self.sparsity_list = [] if sparsity_list is None else sparsity_list
        self.ids = torch.arange(original_length)[None]  # (test bookkeeping: which input token each entry is)

    def forward(self, hidden_states, position_embeddings, attention_mask, self_attn_weights=None):
        bsz, q_len, hidden_size = hidden_states.size()
        device = hidden_states.device
        if q_len > 1 and self.finish_merging == True and self.finish_pruning == False:
            image_token_pruning_length = int(self.image_token_length - (self.original_length - q_len))
            last_layer_attention = self_attn_weights
            last_layer_attention_avg = torch.mean(last_layer_attention, dim=(1, 2))[0]
            visual = (self.patch_type[0] != TEXT_TOKEN).nonzero().flatten()  # (differs: the visual positions)
            last_layer_attention_avg_image = last_layer_attention_avg[visual]
            pruning_ratio = self._compute_pruning_ratio(self.sparsity_list, self.cost, self.num_layers)
            top_attention_rank_index = visual[torch.sort(last_layer_attention_avg_image, descending=True, stable=True)
                                              .indices[:round(image_token_pruning_length * (1 - pruning_ratio))]]
            keep_indexs = torch.cat(((self.patch_type[0] == TEXT_TOKEN).nonzero().flatten(), top_attention_rank_index))
            keep_indexs = keep_indexs.sort().values
            hidden_states = hidden_states[:, keep_indexs, :]
            position_embeddings = [position_embeddings[0][:, keep_indexs], position_embeddings[1][:, keep_indexs]]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :, keep_indexs, :][:, :, :, keep_indexs]
            self.patch_type = self.patch_type[:, keep_indexs]  # (the official leaves it: merging is over)
            self.ids = self.ids[:, keep_indexs]
            self.finish_pruning = True
        if q_len > 1 and (not self.finish_merging):
            sparsity_upper_bound = self._compute_pruning_ratio(self.sparsity_list, self.cost, self.num_layers)
            similarity_by_patch, token_index_by_patch = self.compute_similarity_and_token_index_by_patch(
                hidden_states, self.patch_type, self.patch_num)
            frame_token_num = torch.sum(self.patch_type != TEXT_TOKEN).item()
            merge_index_by_patch = torch.where(similarity_by_patch >= self.similarity_lower_bound)[1]
            above_k_ratio = merge_index_by_patch.shape[0] / frame_token_num
            if above_k_ratio < sparsity_upper_bound:
                self.sparsity_list.append(above_k_ratio)
                if above_k_ratio < self.ratio_lower_bound:
                    self.finish_merging = True
            else:
                # (topk ties: the lower index, as tokenprune's stable sort)
                topk_indices = torch.sort(similarity_by_patch, dim=-1, descending=True, stable=True).indices[
                    :, :int(sparsity_upper_bound * frame_token_num)]
                topk_indices, _ = torch.sort(topk_indices)
                merge_index_by_patch = topk_indices[0]
                self.finish_merging = True
                self.finish_pruning = True
            hidden_states, token_mask = self.merge_tokens_and_get_mask(hidden_states, similarity_by_patch,
                                                                       token_index_by_patch, merge_index_by_patch)
            self.patch_type = self.patch_type.to(device)[token_mask].reshape(bsz, -1)
            self.ids = self.ids[token_mask].reshape(bsz, -1)
            hidden_states = hidden_states[token_mask, :].reshape(bsz, -1, hidden_size)
            position_embeddings = [position_embeddings[0][:, token_mask[0]], position_embeddings[1][:, token_mask[0]]]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :, token_mask[0], :][:, :, :, token_mask[0]]
        return hidden_states, position_embeddings, attention_mask

    @staticmethod
    def compute_similarity_and_token_index_by_patch(hidden_states, token_patch_type, patch_num):
        bsz, q_len, _ = hidden_states.size()
        device = hidden_states.device
        token_patch_type_by_patch, token_index_by_patch = torch.where(
            token_patch_type == torch.arange(patch_num, device=device)[:, None])
        token_patch_type_by_patch = token_patch_type_by_patch[None, :]
        token_index_by_patch = token_index_by_patch[None, :]
        similarity_by_patch = official_cosine_similarity(
            hidden_states[torch.arange(bsz, device=device), token_index_by_patch[:, :-1], :],
            hidden_states[torch.arange(bsz, device=device), token_index_by_patch[:, 1:], :])
        similarity_by_patch[token_patch_type_by_patch[:, :-1] != token_patch_type_by_patch[:, 1:]] = -2
        similarity_by_patch = torch.cat((torch.full(size=(bsz, 1), fill_value=IGNORE_TOKEN,
                                                    dtype=hidden_states.dtype, device=device), similarity_by_patch), dim=1)
        return similarity_by_patch, token_index_by_patch

    @staticmethod
    def merge_tokens_and_get_mask(hidden_states, similarity_by_patch, token_index_by_patch, merge_index_by_patch):
        device = hidden_states.device
        if merge_index_by_patch.shape[0] == 0:
            keep_mask = torch.ones(hidden_states.shape[:-1], dtype=torch.bool, device=device)
            return hidden_states, keep_mask
        bsz, q_len, _ = hidden_states.size()
        bsz_index = torch.arange(bsz, device=hidden_states.device)[:, None]
        merge_mask_by_patch = torch.zeros(bsz, similarity_by_patch.shape[1], dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        merge_mask_by_patch[bsz_index, merge_index_by_patch] = 1
        last_merge_token_by_patch = official_find_contigious_latter_index(merge_mask_by_patch)
        keep_mask = torch.ones(hidden_states.shape[:-1], dtype=torch.bool, device=device)
        keep_mask[bsz_index, token_index_by_patch[bsz_index, merge_index_by_patch]] = False
        unique_merge_nums = torch.sort(torch.unique(last_merge_token_by_patch.to(torch.long))).values
        unique_merge_nums = (unique_merge_nums[1:] if (unique_merge_nums[0] == 0).item() else unique_merge_nums)
        merge_num_indices, token_merge_index_in_patch = torch.where(last_merge_token_by_patch == unique_merge_nums[:, None])
        merge_nums = unique_merge_nums[merge_num_indices]
        token_merge_start_index_in_patch = token_merge_index_in_patch - merge_nums
        token_merge_member_start_index_in_patch = torch.repeat_interleave(token_merge_start_index_in_patch, merge_nums)
        merge_member_length = torch.sum(merge_nums)
        merge_member_contigious_sequence = torch.arange(1, merge_member_length + 1, device=device)
        merge_nums_cumulative_counts = torch.cumsum(merge_nums, dim=0)
        merge_nums_start = torch.cat((torch.tensor([0], device=device), merge_nums_cumulative_counts[:-1]))
        contigious_sequence_by_merge_nums = merge_member_contigious_sequence - torch.repeat_interleave(merge_nums_start, merge_nums)
        token_merge_member_index_in_patch = token_merge_member_start_index_in_patch + contigious_sequence_by_merge_nums
        hidden_states.index_add_(dim=1, index=token_index_by_patch[0, token_merge_member_start_index_in_patch],
                                 source=hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_member_index_in_patch]])
        hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_start_index_in_patch]] /= (merge_nums[None, :, None] + 1)
        return hidden_states, keep_mask

    @staticmethod
    def _compute_pruning_ratio(sparsity_list, cost, num_layers=28):
        list_length = len(sparsity_list)
        s = 1
        total_calcution = 0
        for i in range(list_length):
            s *= (1 - sparsity_list[i])
            total_calcution += s
        remain_calcution = num_layers * cost - total_calcution
        if remain_calcution < 0:
            raise ValueError("The cost is too small")
        if remain_calcution / ((num_layers - list_length) * s) > 1:
            return 0
        return 1 - (remain_calcution / ((num_layers - list_length) * s))


def official_patch_type(image_mask: torch.Tensor, per_frame: int) -> torch.Tensor:
    """The official ``patch_type``: text ``-1``, the visual tokens ``list(range(patch_num)) * n_frames``."""
    out = torch.full(image_mask.shape, TEXT_TOKEN, dtype=torch.long)
    out[image_mask] = torch.arange(int(image_mask.sum())) % per_frame
    return out[None]


def random_clip(seed: int, frames: int = 6, per: int = 8, dim: int = 16, pre: int = 3, post: int = 4):
    """A random sequence: ``pre`` text tokens, ``frames x per`` visual tokens (per-patch bases plus frame noise of
    varied size, so that similarities span the thresholds), ``post`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(per, dim, generator=g)
    scale = torch.rand(frames, per, 1, generator=g) * 1.5
    vis = (base[None] + scale * torch.randn(frames, per, dim, generator=g)).flatten(0, 1)
    h = torch.cat([torch.randn(pre, dim, generator=g), vis, torch.randn(post, dim, generator=g)])
    mask = torch.zeros(h.shape[0], dtype=torch.bool)
    mask[pre:pre + frames * per] = True
    return h[None], mask


def drive_both(seed: int, cost: float, frames: int = 6, per: int = 8, n_layers: int = 28):
    """The official module and tokenprune's stages on one random sequence through ``n_layers`` random "layers"
    (a per-token map for attention, one for the MLP), compared after every call: the same surviving tokens and
    hidden states <= 1e-5 (each call on the same input: no drift carried through the random maps). Returns
    ``(the pruner's memory, the official module)``."""
    h, image = random_clip(seed, frames, per)
    length, dim = h.shape[1], h.shape[2]
    g = torch.Generator().manual_seed(100 + seed)
    maps = [(torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)) for _ in range(2 * n_layers)]
    off = OfficialFrameFusion(cost=cost, num_layers=n_layers)
    off.prepare(official_patch_type(image, per), per, 3, 3 + frames * per - 1, frames * per, length)
    pe = [torch.zeros(1, length, 2), torch.zeros(1, length, 2)]
    mine = tp.create_pruner("framefusion", ratio=cost)
    memory = [{}]
    state = {"seq": h.clone(), "vis": image.clone(), "ids": torch.arange(length)}

    def step(stage, attn_full):
        seq, vis = state["seq"], state["vis"]
        pos = vis.nonzero().flatten()
        attn = None if attn_full is None else attn_full.mean(dim=(1, 2))[0][pos]
        red = mine.select(stage_inputs(seq[:, vis], stage, memory, ((1, per),) * frames if stage == 0 else None,
                                       attn, n_layers))
        new_vis = red.apply(seq[:, vis])
        keep = ~vis.clone()
        keep[pos[red.indices[0]]] = True
        full = seq.clone()
        full[:, pos[red.indices[0]]] = new_vis
        state.update(seq=full[:, keep], vis=vis[keep], ids=state["ids"][keep])

    def same(ref):
        assert torch.equal(off.ids[0], state["ids"]), f"kept tokens differ: {off.ids[0].tolist()} vs {state['ids'].tolist()}"
        torch.testing.assert_close(state["seq"], ref, atol=1e-5, rtol=0)
        state["seq"] = ref.clone()  # the next call on the same input

    ref, pe, _ = off.forward(h.clone(), pe, None)
    step(0, None)
    same(ref)
    for layer in range(n_layers - 1):  # (the official's call inside the last layer: left out, see the module)
        ref, state["seq"] = ref @ maps[2 * layer], state["seq"] @ maps[2 * layer]  # "attention"
        weights = None
        if off.finish_merging and not off.finish_pruning:
            weights = torch.rand(1, 3, 1, ref.shape[1], generator=g).softmax(-1)
        ref, pe, _ = off.forward(ref, pe, None, weights)
        step(layer + 1, weights)
        same(ref)
        ref = torch.tanh(ref @ maps[2 * layer + 1])  # "MLP"
        state["seq"] = torch.tanh(state["seq"] @ maps[2 * layer + 1])
    return memory[0], off


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cost", [0.5, 0.3, 0.2])
def test_equals_the_official_module_on_random_sequences(seed, cost):
    memory, off = drive_both(seed, cost)
    assert memory["sparsity"] == pytest.approx(off.sparsity_list)
    assert memory["merged"] == off.finish_merging and memory["pruned"] == off.finish_pruning


def test_the_random_runs_cover_every_branch():
    """What the runs above went through (6 frames x 8 patches = 48 visual tokens, 28 layers): cost 0.5 seed 0 --
    the budget branch at once (int(0.5 x 48) = 24 merged, nothing more); cost 0.3 seed 3 -- five merge steps (the
    layer-0 input, then inside layers 0..3), the last below 0.1, then the cut inside layer 4; cost 0.2 seed 0 --
    three steps, the cut inside layer 2."""
    memory, off = drive_both(0, 0.5)
    assert memory["sparsity"] == [] and memory["pruned"] and len(memory["patch"]) == 24
    memory, off = drive_both(3, 0.3)
    assert len(memory["sparsity"]) == 5 and memory["sparsity"][-1] < 0.1 and memory["pruned"]
    assert len(memory["patch"]) == 13
    memory, off = drive_both(0, 0.2)
    assert len(memory["sparsity"]) == 3 and memory["pruned"] and len(memory["patch"]) == 9


# -- every video family ------------------------------------------------------------------------------------------

def static_video(frames: int, side: int = 48, seed: int = 0) -> tp.Video:
    """Frames whose lower half stays still and whose upper half is new noise every frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = np.repeat(base[None], frames, 0).copy()
    out[:, : side // 2] = rng.integers(0, 255, (frames, side // 2, side, 3), dtype=np.uint8)
    return tp.Video.from_frames(out, fps=2.0)


def clip_for(family: str, seed: int = 0) -> tp.Video:
    return static_video(12 if family.startswith("qwen") else 6, seed=seed)


def official_prefill(lvlm, clip, cost: float) -> tuple[torch.Tensor, list[int]]:
    """The official FrameFusion decoder loop (``Qwen2DecoderLayer_merge_then_prune_by_cost_forward`` /
    ``Qwen2SdpaAttention_merge_then_prune_by_cost_forward``) on the tiny model's own layers, batch 1: first
    logits and the tokens each layer's attention saw."""
    batch = lvlm.prepare([clip], PROMPTS[:1])
    views = lvlm.encode_images(batch, PrunerNeeds())
    inputs = lvlm._assemble(batch, views, None, "keep", ["0"])[0]
    runner = lvlm.runner
    n_layers = len(runner.layers)
    grids = inputs.view_grids[0]
    image = inputs.image_mask[0] & inputs.mask[0]
    off = OfficialFrameFusion(cost=cost, num_layers=n_layers)
    length = inputs.embeds.shape[1]
    off.prepare(official_patch_type(image, grids[0][0] * grids[0][1]), grids[0][0] * grids[0][1], 0, 0,
                int(image.sum()), length)
    h = inputs.embeds
    pe = list(runner.model.rotary_emb(h, inputs.positions))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    counts = []
    for i, layer in enumerate(runner.layers):
        if i == 0:
            h, pe, mask = off.forward(h, pe, mask)
        counts.append(h.shape[1])
        residual = h
        x = layer.input_layernorm(h)
        attn_out, _ = layer.self_attn(hidden_states=x, position_embeddings=tuple(pe), attention_mask=mask)
        weights = None
        if off.finish_merging and not off.finish_pruning:  # the official scaled_dot_product_attention(num=1)
            from tokenprune.adapters.attention import record_attention
            with record_attention(layer.self_attn, rows="last") as rec:
                layer.self_attn(hidden_states=x, position_embeddings=tuple(pe), attention_mask=mask)
            weights = rec.maps[0][:, None]  # [1, 1(heads averaged), 1, L]
        h = residual + attn_out
        if i < n_layers - 1:  # (the call inside the last layer changes no output: left out, as tokenprune does)
            h, pe, mask = off.forward(h, pe, mask, weights)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = runner.lm_head(runner.model.norm(h[:, -1])).float()
    return logits, counts


def run(lvlm, clips, pruner, use_cache=True, ids=("a", "b"), prompts=PROMPTS):
    return lvlm.generate(list(clips), list(prompts[:len(clips)]), pruner=pruner, max_new_tokens=4, ignore_eos=True,
                         use_cache=use_cache, sample_ids=list(ids[:len(clips)]))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    clip = clip_for(family)
    n_layers = len(lvlm.runner.layers)
    # ratio 1.0 == unpruned
    ref = lvlm.generate([clip], PROMPTS[:1], max_new_tokens=4)
    full = lvlm.generate([clip], PROMPTS[:1], pruner=tp.create_pruner("framefusion", ratio=1.0), max_new_tokens=4)
    assert torch.equal(full.token_ids, ref.token_ids) and torch.equal(full.first_logits, ref.first_logits)

    p = tp.create_pruner("framefusion", ratio=0.5)
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = run(lvlm, [clip], p)
    finally:
        counter.close()
    stats = out.stats[0]
    got = [counter.lengths[i][0] for i in range(n_layers)]
    assert got == [stats.text_tokens + v for v in stats.visual_per_layer], (got, stats.visual_per_layer)
    assert stats.visual_per_layer[-1] < stats.visual_tokens_in  # it merged or cut something
    if family != "qwen3_vl":  # no official port to Qwen3-VL (DeepStack): the framework checks only
        logits, counts = official_prefill(lvlm, clip, 0.5)
        assert counts == got, (counts, got)
        torch.testing.assert_close(out.first_logits, logits, atol=1e-4, rtol=0)

    # cached == uncached; a batch of two == each alone
    clips = [clip, clip_for(family, seed=1)]
    cached = run(lvlm, clips, p)
    uncached = run(lvlm, clips, p, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(cached.first_logits, uncached.first_logits, atol=1e-5, rtol=0)
    for i in range(2):
        alone = run(lvlm, clips[i:i + 1], p, ids=("ab"[i],), prompts=PROMPTS[i:i + 1])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i])
        assert alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_an_image_sample_is_refused_in_one_line(family):
    with pytest.raises(OptionError, match="one view|different grids") as err:  # (OneVision: anyres base + crops)
        lvlm_for(family).generate([images(1)[0]], PROMPTS[:1], pruner=tp.create_pruner("framefusion"), max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_a_stage_error_inside_a_layer_leaves_the_model_clean():
    """ratio 0.3 on the 4-layer Qwen2-VL: merging spends the budget ("The cost is too small", raised by a stage
    inside a layer, as the official raises it); the one line comes out and no hook stays on the model."""
    lvlm = lvlm_for("qwen2_vl")
    clip = clip_for("qwen2_vl")
    ref = lvlm.generate([clip], PROMPTS[:1], max_new_tokens=2)
    with pytest.raises(OptionError, match="too small") as err:
        lvlm.generate([clip], PROMPTS[:1], pruner=tp.create_pruner("framefusion", ratio=0.3), max_new_tokens=2)
    assert "\n" not in str(err.value)
    assert all(not layer.post_attention_layernorm._forward_pre_hooks for layer in lvlm.runner.layers)
    again = lvlm.generate([clip], PROMPTS[:1], max_new_tokens=2)
    assert torch.equal(again.token_ids, ref.token_ids) and torch.equal(again.first_logits, ref.first_logits)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_teacher_forcing_equals_the_no_cache_reference(family, monkeypatch):
    """``runner.score`` (loglikelihood) teacher-forcing generate's greedy tokens through the cache after the in-LLM
    stages gives the no-cache reference's log-probabilities (which replays every stage, in-place merges included,
    per token); every token is greedy. A left-padded batch of two videos."""
    lvlm = lvlm_for(family)
    p = tp.create_pruner("framefusion", ratio=0.5)
    clips = [clip_for(family), clip_for(family, seed=1)]
    recorded = []
    logits = lvlm.runner._logits
    monkeypatch.setattr(lvlm.runner, "_logits", lambda h, device: recorded.append(logits(h, device)) or recorded[-1])
    gen = lvlm.generate(clips, PROMPTS, pruner=p, max_new_tokens=4, ignore_eos=True, use_cache=False,
                        sample_ids=["a", "b"])
    monkeypatch.undo()
    reference = torch.stack(recorded, 1).log_softmax(-1).gather(2, gen.token_ids[..., None])[..., 0]
    encoded = lvlm.encode(clips, PROMPTS, lvlm.vision_needs(p))
    policy = lvlm._assembly_policy(p, lvlm._position_policy(None, p, clips))
    inputs = lvlm._assemble(encoded.batch, encoded.views, p, policy, ["a", "b"], PROMPTS)[0]
    assert bool(inputs.mask[:, 0].logical_not().any())  # left padding in the batch
    res = lvlm.runner.score(inputs, gen.token_ids, torch.ones_like(gen.token_ids, dtype=torch.bool),
                            pruner=lvlm._in_llm(p), position_policy=lvlm._stage_policy(None, p, clips))
    torch.testing.assert_close(res.logprobs, reference, atol=1e-4, rtol=0)
    assert bool(res.greedy.all())
    torch.testing.assert_close(res.first_logits, gen.first_logits, atol=1e-5, rtol=0)


def test_the_framework_refuses_stages_it_cannot_run_in_one_line():
    """Layer 0 takes only a stage that reads nothing of the decoder; a stage inside a layer needs a pre-norm layer."""
    from torch import nn

    from tokenprune.adapters import decoder

    class Stages(type(tp.create_pruner("framefusion"))):
        def __init__(self, stages):
            super().__init__()
            self._stages = stages

        def llm_schedule(self, n_layers):
            return self._stages

    runner = lvlm_for("qwen2_vl").runner
    for bad in [(LLMStage(0, "previous", "last"),), (LLMStage(0, after_attention=True),),
                (LLMStage(1), LLMStage(1, "previous"))]:
        with pytest.raises(OptionError, match="stages need increasing layers") as err:
            runner.schedule(Stages(bad))
        assert "\n" not in str(err.value)
    assert runner.schedule(Stages((LLMStage(0), LLMStage(1, "previous", after_attention=True)))) is not None
    with pytest.raises(OptionError, match="pre-norm layer") as err:
        decoder._check_mid_layer(nn.Linear(2, 2), "framefusion", 0)
    assert "\n" not in str(err.value)
