"""``holov``: HoloV's crop-wise budget, as the official code (obananas/HoloV@1d2e65e) does it.

What is checked, against independent references:
1. hand-computed chunk layouts, chunk scores, allocations and output orders on tiny inputs (numbers in the
   comments): the remainder to the largest weights, a chunk kept whole in raster order with its excess lost,
   attention-descending order inside a partly kept chunk, the zero padding, 1-token chunks scored by their
   raw attention; the chunk count of the Qwen port's formula;
2. the official ``HoloV`` functions transcribed near-verbatim (``llava/model/utils.py`` L22-151, and
   ``qwen-model-HoloV/utils.py`` ``HoloV``, which also returns the kept positions) on random inputs:
   identical tokens and positions, batched;
3. the official pipelines on the tiny models' own tensors: LLaVA-1.5 (``encode_images``: eager CLS row of
   layer -2, head mean; the projector), LLaVA-NeXT (the ``spatial_unpad`` branch of
   ``prepare_inputs_labels_for_multimodal``: base + unpadded crops, newlines left out, one run) and
   Qwen2.5-VL (the port's column mean over every query row, ``view(N/4, 4).mean``, the ``num_patches``
   formula) == what the adapter + pruner place;
4. every family's tiny model (images, and videos where the family has them): ratio 1.0 == unpruned, the
   tokens each decoder layer receives (pre-hooks) == text + the budget, cached == uncached, batch == alone
   (``tests/video_checks.py``), at the default scope and at ``frame``;
5. the contract, ``pad=none`` (adaptive), position conventions, one-line errors.

Views of different shapes in one clip (LLaVA-NeXT / OneVision: base + high-res view) need the framework to
hand each view's scores (``PruningInputs.view_scores``, the change proposed with this method); until it does,
those tests are strict xfails that expect the framework's one-line refusal.
"""
from __future__ import annotations


import pytest
import torch

import tokenprune as tp
import tokenprune.methods.holov  # noqa: F401  (registers the pruner until methods/__init__ imports it)
from tokenprune.errors import OptionError
from tokenprune.methods.holov import auto_chunks, chunk_layout, holov_select
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs
from test_adapters import images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def holov(ratio: float, **kw):
    return tp.create_pruner("holov", ratio=ratio, **kw)


def cls_inputs(tokens: torch.Tensor, attn: torch.Tensor) -> PruningInputs:
    """A LLaVA-style view: ``attn`` ``[B, N]`` as the CLS row of a ``[B, 1, 1 + N]`` map."""
    b, n, _ = tokens.shape
    row = torch.cat([torch.zeros(b, 1), attn], 1)[:, None]
    return PruningInputs(tokens=tokens, grid=(1, n), vision_attention=row, vision_prefix=1)


# -- 1. by hand ----------------------------------------------------------------------------------------------
def test_chunk_layouts_and_the_qwen_chunk_formula():
    index, valid = chunk_layout(576, 16)
    assert index.shape == (16, 36) and bool(valid.all()) and index[1, 0] == 36  # 36 tokens, 1.5 rows of 24
    index, valid = chunk_layout(70, 16)  # 70 = 16 * 4 + 6: the first 6 chunks get 5 tokens
    assert valid.sum(-1).tolist() == [5] * 6 + [4] * 10 and index[6, :4].tolist() == [30, 31, 32, 33]
    index, valid = chunk_layout(5, 8)  # fewer tokens than chunks: 5 chunks of 1, the empty ones skipped
    assert index.flatten().tolist() == [0, 1, 2, 3, 4] and bool(valid.all())
    # max(1, int(((1024/576) * N) / K)): 16 / 8 / 5 at 64 / 128 / 192 of 576; 1 at K = N
    assert [auto_chunks(576, k) for k in (64, 128, 192, 576)] == [16, 8, 5, 1]
    assert [holov(r).chunks_for(576) for r in (64 / 576, 128 / 576, 192 / 576)] == [16, 8, 5]
    assert holov(0.5, num_chunks=16).chunks_for(576) == 16


def test_hand_computed_allocation_cap_and_padding():
    # N = 8, K = 5, 3 chunks [0 1 2] [3 4 5] [6 7].
    # A: three identical tokens -> S off-diagonal 1, mean 1, var (0-1)^2 / 2 = .5 each (the zeroed diagonal);
    #    a = .10 .05 .30 (mean .15) -> score 150 * (1 + .09 * .5 / (.5 + 1e-6)) = 163.5.
    # B, C: orthogonal tokens -> S = 0, var = 0: score = mean(1e3 a) = 20 (a = .01 .02 .03), 180 (a = .15 .21).
    # w = 163.5, 20, 180 / 363.5 -> w * 5 = 2.249, 0.275, 2.476 -> floor 2, 0, 2; remaining 1 -> C (largest w): 3.
    # A keeps its top 2 by attention, descending: 2, 0. C (3 >= 2 tokens) is kept whole in raster order: 6, 7;
    # its excess token is lost, so one zero pad ends the output.
    e = torch.eye(6)
    tokens = torch.stack([e[0], 2 * e[0], 3 * e[0], e[1], e[2], e[3], e[4], e[5]])[None]
    attn = torch.tensor([[0.10, 0.05, 0.30, 0.01, 0.02, 0.03, 0.15, 0.21]])
    p = holov(5 / 8, num_chunks=3)
    red = p(cls_inputs(tokens, attn))
    assert red.indices.tolist() == [[0, 1, 2, 3, 4]]
    assert red.positions.tolist() == [[2, 0, 6, 7, 7]]  # the pad takes the last token's position
    torch.testing.assert_close(red.tokens[0], torch.cat([tokens[0, [2, 0, 6, 7]], torch.zeros(1, 6)]))
    torch.testing.assert_close(red.token_weights[0], torch.cat([torch.eye(8)[[2, 0, 6, 7]], torch.zeros(1, 8)]))
    torch.testing.assert_close(red.scores, attn)
    # the chunk scores themselves
    order, real, scores = holov_select(tokens, attn, 5, 3)
    torch.testing.assert_close(scores, torch.tensor([[150 * (1 + 0.09 * 0.5 / (0.5 + 1e-6)), 20.0, 180.0]]))
    assert real.tolist() == [[True, True, True, True, False]]


def test_one_token_chunks_score_their_raw_attention():
    # N = 5, 4 chunks: [0 1] [2] [3] [4]. Chunk 0 (two orthogonal tokens, var 0) scores 1e3 * mean(.01, .02) = 15;
    # the 1-token chunks score their raw attention .5, .3, .17 (official: no 1e3 scale). K = 3:
    # w * 3 = 2.818, .094, .056, .032 -> 2, 0, 0, 0; remaining 1 -> chunk 0: 3 >= 2, kept whole, one pad.
    tokens = torch.eye(5)[None]
    attn = torch.tensor([[0.01, 0.02, 0.5, 0.3, 0.17]])
    red = holov(3 / 5, num_chunks=4)(cls_inputs(tokens, attn))
    assert red.positions.tolist() == [[0, 1, 4]] and red.tokens[0, 2].abs().sum() == 0
    # all chunks of 1 token (N < chunks): the remainder goes to the largest weights, output in chunk order
    red = holov(0.5, num_chunks=6)(cls_inputs(torch.eye(4)[None], torch.tensor([[0.1, 0.3, 0.2, 0.4]])))
    assert red.positions.tolist() == [[1, 3]] and red.tokens[0].abs().sum(-1).tolist() == [1.0, 1.0]


def test_column_mean_without_cls_and_merged_patches():
    # No CLS (Qwen / SigLIP): the attention each patch receives, averaged over every query row, then over the
    # token's patches. 2 tokens x 2 patches; columns' means .1 .3 | .2 .4 -> tokens .2, .3.
    attn = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.1, 0.3, 0.2, 0.4], [0.1, 0.3, 0.2, 0.4], [0.1, 0.3, 0.2, 0.4]])[None]
    inputs = PruningInputs(tokens=torch.randn(1, 2, 3), grid=(1, 2), vision_attention=attn, patch_merge=2)
    torch.testing.assert_close(holov(0.5).view_scores(inputs), torch.tensor([[0.2, 0.3]]))
    # vision_received (frames pooled after the tower) is taken as it is
    inputs.vision_received = torch.tensor([[0.7, 0.1]])
    torch.testing.assert_close(holov(0.5).view_scores(inputs), torch.tensor([[0.7, 0.1]]))
    assert holov(0.5).needs.vision_attention_rows == "all"
    assert holov(0.5, score="cls").needs.vision_attention_rows == "prefix"


# -- 2. the official functions -------------------------------------------------------------------------------
def official_holov_llava(image_tokens, attention, num_patches, new_image_token_num, esp=1e-6):
    """obananas/HoloV@1d2e65e llava/model/utils.py ``HoloV`` L22-151 (comments trimmed)."""
    B, N, D = image_tokens.shape
    device = image_tokens.device
    alpha = 0.09
    pruned_image_tokens_list = []
    for b in range(B):
        image_token = image_tokens[b]
        image_attention = attention[b]
        patch_size = N // num_patches
        remainder = N % num_patches
        image_tokens_patches = []
        attention_patches = []
        start_idx = 0
        for p in range(num_patches):
            current_patch_size = patch_size + (1 if p < remainder else 0)
            end_idx = start_idx + current_patch_size
            if current_patch_size > 0:
                image_tokens_patches.append(image_token[start_idx:end_idx])
                attention_patches.append(image_attention[start_idx:end_idx])
            start_idx = end_idx
        patch_scores = []
        all_patches = []
        for p in range(len(image_tokens_patches)):
            patch_tokens = image_tokens_patches[p]
            patch_attn = attention_patches[p]
            current_patch_size = len(patch_tokens)
            if current_patch_size <= 1:
                patch_scores.append(patch_attn.mean() if len(patch_attn) > 0 else torch.tensor(0.0, device=device))
                all_patches.append(patch_tokens)
                continue
            with torch.no_grad():
                F_normalized = patch_tokens / (patch_tokens.norm(dim=1, keepdim=True) + esp)
                S = torch.mm(F_normalized, F_normalized.transpose(0, 1))
                eye_mask = 1 - torch.eye(current_patch_size, device=device)
                S_masked = S * eye_mask
                valid_entries = current_patch_size - 1
                mean_sim = S_masked.sum(dim=1) / valid_entries
                var_sim = ((S_masked - mean_sim.unsqueeze(1))**2).sum(dim=1) / valid_entries
                patch_attn_scaled = patch_attn * 1e3
                var_scaling = (torch.mean(torch.abs(patch_attn_scaled)) /
                               (torch.mean(torch.abs(var_sim)) + esp))
                var_sim_scaled = var_sim * var_scaling
                token_scores = patch_attn_scaled + alpha * var_sim_scaled
                patch_score = token_scores.mean()
                patch_scores.append(patch_score)
                all_patches.append(patch_tokens)
        patch_scores = torch.stack(patch_scores) if patch_scores else torch.zeros(0, device=device)
        if len(patch_scores) > 0:
            weights = (patch_scores) / ((patch_scores).sum() + esp)
            allocated = (weights * new_image_token_num).floor().long()
            remaining = new_image_token_num - allocated.sum()
            if remaining > 0 and len(weights) > 0:
                _, indices = torch.topk(weights, k=min(remaining.item(), len(weights)))
                for idx in indices[:remaining]:
                    allocated[idx] += 1
            new_patches = []
            for i, (patch, alloc) in enumerate(zip(all_patches, allocated)):
                patch_size = len(patch)
                if alloc <= 0:
                    continue
                elif alloc >= patch_size:
                    new_patches.append(patch)
                else:
                    patch_attn = attention_patches[i]
                    _, top_indices = torch.topk(patch_attn, k=min(alloc.item(), patch_size))
                    new_patches.append(patch[top_indices])
            if new_patches:
                new_image_tokens = torch.cat(new_patches, dim=0)
            else:
                new_image_tokens = torch.zeros((0, D), device=device)
        else:
            new_image_tokens = torch.zeros((0, D), device=device)
        actual_tokens = new_image_tokens.size(0)
        if actual_tokens < new_image_token_num:
            padding = torch.zeros((new_image_token_num - actual_tokens, D), device=device)
            new_image_tokens = torch.cat([new_image_tokens, padding], dim=0)
        elif actual_tokens > new_image_token_num:
            new_image_tokens = new_image_tokens[:new_image_token_num]
        pruned_image_tokens_list.append(new_image_tokens)
    return torch.stack(pruned_image_tokens_list, dim=0).to(image_tokens.dtype)


def official_holov_qwen_positions(image_tokens, attention, num_patches, new_image_token_num, esp=1e-6):
    """obananas/HoloV@1d2e65e qwen-model-HoloV/utils.py ``HoloV``: the same rule (alpha 1, beta 0.09, power 1),
    returning the kept tokens' positions in the image (padding: -1); only the position bookkeeping is kept
    here, the scoring is the function above's line for line. ``attention`` ``[N]`` (batch 1, as the port)."""
    attention = attention.unsqueeze(0)
    N, D = image_tokens.shape[1:]
    device = image_tokens.device
    alpha, beta, power = 1, 0.09, 1
    image_token, image_attention = image_tokens[0], attention[0]
    patch_size, remainder = N // num_patches, N % num_patches
    image_tokens_patches, attention_patches, patch_start_indices, start_idx = [], [], [], 0
    for p in range(num_patches):
        current_patch_size = patch_size + (1 if p < remainder else 0)
        end_idx = start_idx + current_patch_size
        if current_patch_size > 0:
            image_tokens_patches.append(image_token[start_idx:end_idx])
            attention_patches.append(image_attention[start_idx:end_idx])
            patch_start_indices.append(start_idx)
        start_idx = end_idx
    patch_scores, all_patches, all_patch_indices = [], [], []
    for p in range(len(image_tokens_patches)):
        patch_tokens, patch_attn, patch_start = image_tokens_patches[p], attention_patches[p], patch_start_indices[p]
        current_patch_size = len(patch_tokens)
        patch_indices = torch.arange(patch_start, patch_start + current_patch_size, device=device)
        if current_patch_size <= 1:
            patch_scores.append(patch_attn.mean() if len(patch_attn) > 0 else torch.tensor(0.0, device=device))
            all_patches.append(patch_tokens)
            all_patch_indices.append(patch_indices)
            continue
        F_normalized = patch_tokens / (patch_tokens.norm(dim=1, keepdim=True) + esp)
        S = torch.mm(F_normalized, F_normalized.transpose(0, 1))
        S_masked = S * (1 - torch.eye(current_patch_size, device=device))
        valid_entries = current_patch_size - 1
        mean_sim = S_masked.sum(dim=1) / valid_entries
        var_sim = ((S_masked - mean_sim.unsqueeze(1))**2).sum(dim=1) / valid_entries
        patch_attn_scaled = patch_attn * 1e3
        var_scaling = (torch.mean(torch.abs(patch_attn_scaled)) / (torch.mean(torch.abs(var_sim)) + esp))
        token_scores = alpha * patch_attn_scaled + beta * (var_sim * var_scaling)
        patch_scores.append(token_scores.mean())
        all_patches.append(patch_tokens)
        all_patch_indices.append(patch_indices)
    patch_scores = torch.stack(patch_scores)
    weights = (patch_scores ** power) / ((patch_scores ** power).sum() + esp)
    allocated = (weights * new_image_token_num).floor().long()
    remaining = new_image_token_num - allocated.sum()
    if remaining > 0 and len(weights) > 0:
        _, indices = torch.topk(weights, k=min(remaining.item(), len(weights)))
        for idx in indices[:remaining]:
            allocated[idx] += 1
    final_positions = []
    for i, (patch, alloc, patch_indices) in enumerate(zip(all_patches, allocated, all_patch_indices)):
        if alloc <= 0:
            continue
        elif alloc >= len(patch):
            final_positions.append(patch_indices)
        else:
            _, top_indices = torch.topk(attention_patches[i], k=min(alloc.item(), len(patch)))
            final_positions.append(patch_indices[top_indices])
    final_positions = torch.cat(final_positions, dim=0)
    if final_positions.numel() < new_image_token_num:
        final_positions = torch.cat([final_positions, torch.full((new_image_token_num - final_positions.numel(),), -1)])
    return final_positions[:new_image_token_num]


def random_view(seed: int, b: int, n: int, temperature: float, d: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, N, D]`` (a shared component, so the chunks' similarity variances differ) and a CLS-like
    attention ``[B, N]`` (a softmax over CLS + patches; ``temperature`` sets how peaked, hence how often a chunk
    is capped and zeros are padded)."""
    g = torch.Generator().manual_seed(seed)
    shared = 2 * torch.randn(b, 1, d, generator=g) * torch.rand(b, n, 1, generator=g)
    tokens = torch.randn(b, n, d, generator=g) + shared
    attn = (temperature * torch.randn(b, n + 1, generator=g)).softmax(-1)[:, 1:]
    return tokens, attn


# (N, K, attention temperature): the official budgets; uneven chunks (576 in 5, 20 in 17, 9 in 5); 1-token chunks
# (20 in 17 and 9 in 5: N < 2 * chunks); small and large budgets
CASES = [(576, 64, 1.0), (576, 128, 2.0), (576, 192, 3.0), (70, 21, 1.5), (100, 7, 0.5), (20, 2, 1.0), (9, 3, 2.0),
         (12, 10, 4.0)]


@pytest.mark.parametrize("n, k, temperature", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_equals_official_on_random_inputs(n, k, temperature, seed):
    tokens, attn = random_view(seed, 3, n, temperature)
    p = holov(k / n)
    assert p.num_kept(n, (1, n)) == k
    chunks = p.chunks_for(n)
    red = p(cls_inputs(tokens, attn))
    ref = official_holov_llava(tokens, attn, chunks, k)
    assert (red.tokens - ref).abs().max().item() <= 1e-6
    for b in range(3):
        pos = official_holov_qwen_positions(tokens[b:b + 1], attn[b], chunks, k)
        assert red.positions[b].tolist() == torch.where(pos < 0, n - 1, pos).tolist()
        assert bool((red.tokens[b].abs().sum(-1) == 0).eq(pos < 0).all())  # the zero pads are the official ones


def test_the_random_cases_exercise_padding_partial_chunks_and_uneven_chunks():
    padded, partial = 0, 0
    for n, k, temperature in CASES:
        for seed in range(3):
            tokens, attn = random_view(seed, 3, n, temperature)
            order, real, _ = holov_select(tokens, attn, k, auto_chunks(n, k))
            padded += int((~real).any(-1).sum())
            # a partly kept chunk shows as a non-increasing step inside the output
            partial += int(((order[:, 1:] < order[:, :-1]) & real[:, 1:]).any(-1).sum())
    assert padded >= 5 and partial >= 5
    assert any(n % auto_chunks(n, k) for n, k, _ in CASES) and any(n < 2 * auto_chunks(n, k) for n, k, _ in CASES)


def test_official_fixed_16_chunks_at_any_budget():
    tokens, attn = random_view(7, 2, 576, 2.0)
    red = holov(128 / 576, num_chunks=16)(cls_inputs(tokens, attn))
    assert (red.tokens - official_holov_llava(tokens, attn, 16, 128)).abs().max().item() <= 1e-6


# -- 3. the official pipelines on the tiny models ------------------------------------------------------------
def eager_cls_rows(tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """HoloV ``clip_encoder.py`` ``feature_select`` + ``llava_arch.py`` ``encode_images``:
    ``attentions[select_layer][:, :, 0, 1:]``, ``.mean(dim=1)``, with eager attention."""
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = old
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1).float(), out.hidden_states[layer][:, 1:]


def placed(lvlm, visuals, pruner):
    """What the adapter + pruner place for one sample: ``(seq slots, tokens, position sources)`` of its views."""
    from tokenprune.adapters.pre_llm import prune_views

    enc = lvlm.encode(visuals, PROMPTS[:1], pruner.needs)
    kept = [k for v, k in zip(enc.views, prune_views(enc.views, pruner, ["0"], lvlm.project_features)) if v.prunable]
    views = [v for v in enc.views if v.prunable]
    seq, tokens, sources = (torch.cat([k[i] for k in kept]) for i in range(3))
    return views, seq, tokens.float(), sources


def test_llava_places_the_official_rule_on_the_models_own_tensors():
    lvlm = lvlm_for("llava")
    cfg = lvlm.model.config
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    attn, hidden = eager_cls_rows(lvlm.model.model.vision_tower, batch["pixel_values"], cfg.vision_feature_layer)
    with torch.no_grad():
        feats = lvlm.model.model.multi_modal_projector(hidden).float()  # [1, 64, D]
    n = feats.shape[1]
    p = holov(16 / 64)  # K = 16, chunks = int(1024/576 * 64 / 16) = 7
    ref = official_holov_llava(feats, attn, p.chunks_for(n), 16)[0]
    refpos = official_holov_qwen_positions(feats, attn[0], p.chunks_for(n), 16)
    views, seq, tokens, sources = placed(lvlm, images(1), p)
    assert torch.equal(seq, views[0].seq_index[:16])  # the first 16 placeholders, in the official order
    assert (tokens - ref).abs().max().item() <= 1e-5
    assert torch.equal(sources, views[0].seq_index[torch.where(refpos < 0, n - 1, refpos)])


def test_llava_next_places_the_official_one_run_over_base_and_unpadded_crops():
    """HoloV llava_arch.py L164-239, ``spatial_unpad`` + ``anyres``: the base view's and the crops' CLS rows and
    features, the crops stitched and unpadded, newlines left out, base + crops concatenated, one HoloV run."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    lvlm = lvlm_for("llava_next")
    cfg = lvlm.model.config
    image = images(2)[1]  # 80 x 112: unpadded rows
    batch = lvlm.prepare([image], PROMPTS[:1])
    attn, hidden = eager_cls_rows(lvlm.model.model.vision_tower, batch["pixel_values"][0], cfg.vision_feature_layer)
    with torch.no_grad():
        image_feature = lvlm.model.model.multi_modal_projector(hidden).float()  # [crops, s^2, D]
    image_attn = attn
    size = batch["image_sizes"][0].tolist()
    # -- transcribed (HF's (height, width) conventions for the grid shape and unpad_image)
    base_image_feature, base_image_attn = image_feature[0], image_attn[0]
    image_feature, image_attn = image_feature[1:], image_attn[1:]
    height = width = cfg.vision_config.image_size // cfg.vision_config.patch_size
    num_patch_height, num_patch_width = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints,
                                                                    cfg.vision_config.image_size)
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_attn = image_attn.view(num_patch_height, num_patch_width, height, width)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_attn = image_attn.permute(0, 2, 1, 3).contiguous().unsqueeze(0)
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_attn = image_attn.flatten(1, 2).flatten(2, 3)
    image_feature = unpad_image(image_feature, size)
    image_attn = unpad_image(image_attn, size)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    image_attn = image_attn.flatten(1, 2).squeeze(0)
    image_feature = torch.cat((base_image_feature, image_feature), dim=0)[None]
    image_attn = torch.cat((base_image_attn, image_attn), dim=0)[None]
    # --
    n = image_feature.shape[1]
    p = holov(0.25)
    k = p.num_kept(n, (1, n))
    ref = official_holov_llava(image_feature, image_attn, p.chunks_for(n), k)[0]
    refpos = official_holov_qwen_positions(image_feature, image_attn[0], p.chunks_for(n), k)
    views, seq, tokens, sources = placed(lvlm, [image], p)
    span = torch.cat([v.seq_index for v in views])  # base then high-res tokens (newlines are not views' tokens)
    assert n == span.numel() and torch.equal(seq, span[:k])
    assert (tokens - ref).abs().max().item() <= 1e-5
    assert torch.equal(sources, span[torch.where(refpos < 0, n - 1, refpos)])


def test_qwen2_5_vl_places_the_official_ports_rule():
    """qwen-model-HoloV/modeling_qwen2_5_vl.py: attention received (head mean, then mean over every query row),
    ``view(N/4, 4).mean``, ``keep_num = int(N * prune_rate)``, ``num_patches = max(1, int((1024/576) N / K))``,
    original M-RoPE positions of the kept tokens (``adjust_ids``). Not reproduced: the port's scores stay in
    window order and its image slice starts one token early (see the method's docstring)."""
    lvlm = lvlm_for("qwen2_5_vl")
    p = holov(9 / 36, vision_layer=-1)  # the port scores at the last block; N = 36, K = int(36 * .25) = 9
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    amap = lvlm.reference_vision_attention(batch, -1)[0]  # [P, P] head mean, original patch order (eager)
    attention_scores = amap.mean(dim=0).view(-1, 4).mean(dim=1)[None]  # [1, N]
    views, seq, tokens, sources = placed(lvlm, images(1), p)
    feats = views[0].tokens.float()[None]
    n = feats.shape[1]
    keep_num = int(n * 0.25)
    num_patches = max(1, int(((1024 / 576) * n) / keep_num))
    assert p.chunks_for(n) == num_patches and p.num_kept(n, (6, 6)) == keep_num
    ref = official_holov_llava(feats, attention_scores, num_patches, keep_num)[0]
    refpos = official_holov_qwen_positions(feats, attention_scores[0], num_patches, keep_num)
    assert (tokens - ref).abs().max().item() <= 1e-5
    assert torch.equal(sources, views[0].seq_index[torch.where(refpos < 0, n - 1, refpos)])
    assert tp.create_pruner("holov").default_position_policy(mrope=True) == "keep"
    assert tp.create_pruner("holov").default_position_policy(mrope=False) == "compact"


# -- 4. every family -----------------------------------------------------------------------------------------
SAME_SHAPE_FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"]


@pytest.mark.parametrize("family", SAME_SHAPE_FAMILIES)
def test_images_on_every_family_at_the_default_scope(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "holov", new_tokens=4)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_base_and_high_res_views_as_one_run(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "holov", new_tokens=4)


@pytest.mark.parametrize("family", ["llava_next", "internvl", "llava_onevision"])
def test_multi_view_families_per_view(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "holov", new_tokens=4, scope="frame")


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_and_an_image_on_every_video_family(family):
    """One run per sample over its frames (OneVision / NeXT-Video: the adapter's ``vision_received``), and per
    frame; with ``pad=none`` (an adaptive count) the layers get what the method reports."""
    lvlm = lvlm_for(family)
    visuals, prompts = [video(), video(seed=1), images(1)[0]], [*PROMPTS, "describe the picture"]
    check_pruner_on(lvlm, visuals, prompts, "holov", new_tokens=3, scope="frame")
    check_pruner_on(lvlm, visuals[:2], prompts[:2], "holov", new_tokens=3)  # a video's frames: one shape


def test_pad_none_gives_the_llm_only_the_real_tokens():
    from test_adapters import LayerInputCounter

    lvlm = lvlm_for("llava")
    ratio = 0.6
    _, _, padded, _ = placed(lvlm, images(1), holov(ratio))
    real = int((padded.abs().sum(-1) > 0).sum())
    n_text = lvlm.prepare(images(1), PROMPTS[:1])["input_ids"].shape[1] - 64
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate(images(1), PROMPTS[:1], pruner=holov(ratio, pad="none"), max_new_tokens=1)
    finally:
        counter.close()
    assert out.stats[0].visual_tokens_kept == real
    assert all(lengths[0] == n_text + real for lengths in counter.lengths.values())
    zeros = lvlm.generate(images(1), PROMPTS[:1], pruner=holov(ratio), max_new_tokens=1)
    assert zeros.stats[0].visual_tokens_kept == tp.keep_count(ratio, 64) >= real


# -- 5. contract, options, errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(ratio):
    check_pruner_contract(holov(ratio), synthetic_inputs(grid=(6, 8)))
    check_pruner_contract(holov(ratio), synthetic_inputs(grid=(5, 7), patch_merge=4, vision_prefix=0, seed=3))
    check_pruner_contract(holov(ratio, score="column", num_chunks=3), synthetic_inputs(grid=(4, 6), seed=1))


def test_pad_none_is_adaptive_and_ratio_one_is_the_view():
    e = torch.eye(6)
    tokens = torch.stack([e[0], 2 * e[0], 3 * e[0], e[1], e[2], e[3], e[4], e[5]])[None]
    attn = torch.tensor([[0.10, 0.05, 0.30, 0.01, 0.02, 0.03, 0.15, 0.21]])
    p = holov(5 / 8, num_chunks=3, pad="none")
    assert p.adaptive and not holov(0.5).adaptive
    red = p(cls_inputs(tokens, attn))
    assert red.positions.tolist() == [[2, 0, 6, 7]] and red.indices.tolist() == [[0, 1, 2, 3]]
    inputs = synthetic_inputs()
    full = holov(1.0)(inputs)
    assert full.tokens is None and full.indices.tolist() == [list(range(48))] * 3
    with pytest.raises(OptionError, match="one per batch"):
        holov(0.25, pad="none")(synthetic_inputs(grid=(6, 8), seed=5))


@pytest.mark.parametrize("bad", [dict(num_chunks=0), dict(num_chunks="many"), dict(num_chunks=2.5), dict(alpha=-1),
                                 dict(alpha="x"), dict(pad="ones"), dict(score="row"), dict(vision_layer="x")])
def test_bad_options_are_one_line(bad):
    with pytest.raises(OptionError) as err:
        holov(0.5, **bad)
    assert "\n" not in str(err.value)


def test_cls_score_without_cls_is_one_line_and_scopes():
    no_cls = synthetic_inputs(vision_prefix=0)
    with pytest.raises(OptionError, match="CLS") as err:
        holov(0.5, score="cls")(no_cls)
    assert "\n" not in str(err.value)
    assert holov(0.5).scope == "clip" and holov(0.5, scope="frame").scope == "frame"
    assert tp.create_pruner("holov").needs.vision_attention_layer == -2
