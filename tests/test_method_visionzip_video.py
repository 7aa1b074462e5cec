"""``visionzip_video``: VisionZip per video frame, as HoliTom's port (cokeshao/HoliTom@e9b2972) runs it.

What is checked, against independent references:
1. hand-computed selections and merges on crafted frames (numbers in the comments), the per-frame counts
   of the official settings (``SPATIAL_TOKENS`` 20/30/40/50) and the ratio mapping;
2. the official rule re-implemented from ``visionzip/llava_arch.py`` (the inner ``visionzip``, one_token
   branch), ``LLaVA-NeXT/llava/model/llava_arch.py`` ``get_2dPool`` (bilinear) and
   ``siglip_encoder.py`` (``attn.mean(1).mean(1)``, ``raw_key_states.mean(1)``), run on raw random
   27x27 frames: identical dominant indices and merged tokens <= 1e-5 when the frame's queries attend
   alike and, with the adapter's ``vision_received``, on general maps; without it (a pooled map only)
   the score is the query-weighted column mean and the rest of the rule is identical;
3. the tiny LLaVA-OneVision: what the adapter + pruner place == the official rule on the model's own
   tensors (eager attention, ``k_proj`` keys, ``get_video_features``);
4. every video family's tiny model, a batch (video, video, image): ratio 1.0 == unpruned, tokens per decoder layer
   (pre-hooks) == the budget, cached == uncached, batch == each alone (``tests/video_checks.py``);
5. one-line errors: scope ``"clip"``, bad options.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.visionzip_video  # noqa: F401  (registers the pruner until methods/__init__ imports it)
from tokenprune.errors import OptionError
from tokenprune.methods.visionzip_video import received_attention
from tokenprune.pruner import PruningInputs
from test_adapters import images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def vzv(ratio: float, **kw):
    return tp.create_pruner("visionzip_video", ratio=ratio, **kw)


# -- 1. by hand --------------------------------------------------------------------------------------------
def test_hand_computed_one_contextual_token():
    # 2x3 frame, S = round(4/6 * 6) = 4: D = int(4 * 54/64) = int(3.375) = 3, C = 1.
    # Query rows alternate a, b: column mean (a + b) / 2 = [.1, .3, .05, .25, .2, .1] -> dominant 1, 3, 4;
    # the rest 0, 2, 5: step 3 // 1 = 3, target token 0; tokens 2 and 5 join it: t0 + (t2 + t5) / 2.
    a = torch.tensor([0.2, 0.4, 0.0, 0.2, 0.2, 0.0])
    b = torch.tensor([0.0, 0.2, 0.1, 0.3, 0.2, 0.2])
    attn = torch.stack([a, b, a, b, a, b])[None]
    tokens = torch.tensor([[[float(i), 1.0] for i in range(6)]])  # t_i = [i, 1]
    red = vzv(4 / 6)(PruningInputs(tokens=tokens, grid=(2, 3), vision_attention=attn, vision_keys=torch.randn(1, 6, 3)))
    torch.testing.assert_close(red.scores, torch.tensor([[0.1, 0.3, 0.05, 0.25, 0.2, 0.1]]))
    torch.testing.assert_close(red.tokens, torch.tensor([[[1.0, 1], [3, 1], [4, 1], [3.5, 2]]]))  # [0 + 7/2, 1 + 1]
    assert red.indices.tolist() == [[0, 1, 2, 3]] and red.positions.tolist() == [[1, 3, 4, 0]]
    torch.testing.assert_close(red.token_weights, torch.tensor([[[0, 1.0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0],
                                                                 [0, 0, 0, 0, 1, 0], [1, 0, 0.5, 0, 0, 0.5]]]))


def test_hand_computed_targets_by_key_similarity():
    # 3x3 frame, S = 7: D = int(7 * 54/64) = int(5.906) = 5, C = 2. Every query row = s, so the score is s:
    # dominant = tokens 0 (.9), 2 (.8), 4 (.7), 5 (.6), 7 (.5); the rest 1, 3, 6, 8 (R = 4): step 4 // 2 = 2,
    # targets 1 and 6 (keys [1, 0], [0, 1]); token 3 (key [.2, 1]) joins 6, token 8 (key [1, .3]) joins 1.
    s = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.05, 0.5, 0.3])
    keys = torch.tensor([[5.0, 5], [1, 0], [5, 5], [0.2, 1], [5, 5], [5, 5], [0, 1], [5, 5], [1, 0.3]])
    tokens = torch.tensor([[[float(i), float(i * i)] for i in range(9)]])  # t_i = [i, i^2]
    red = vzv(7 / 9)(PruningInputs(tokens=tokens, grid=(3, 3), vision_attention=s.expand(9, 9)[None],
                                   vision_keys=keys[None]))
    assert red.positions.tolist() == [[0, 2, 4, 5, 7, 1, 6]]
    # contextual: t1 + t8 = [9, 65], t6 + t3 = [9, 45]
    torch.testing.assert_close(red.tokens[0, 5:], torch.tensor([[9.0, 65], [9, 45]]))
    torch.testing.assert_close(red.tokens[0, :5], tokens[0, [0, 2, 4, 5, 7]])


def test_received_attention_counts_every_query_row_and_averages_merged_patches():
    # prefix 1 (CLS) + 2 tokens x 2 patches: T = 5. Rows: CLS [0, .1, .1, .1, .7], patches all [.2, .2, .2, .2, .2].
    # Patch columns' mean over the 5 rows: [.18, .18, .18, .30]; tokens = mean of their 2 patches: [.18, .24].
    # (Without the CLS row the two tokens would tie at .2.)
    attn = torch.full((1, 5, 5), 0.2)
    attn[0, 0] = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.7])
    inputs = PruningInputs(tokens=torch.zeros(1, 2, 3), grid=(1, 2), vision_attention=attn, vision_prefix=1,
                           patch_merge=2)
    torch.testing.assert_close(received_attention(inputs), torch.tensor([[0.18, 0.24]]))


@pytest.mark.parametrize("ratio, s, dominant, contextual", [
    (20 / 196, 20, 16, 4), (30 / 196, 30, 25, 5), (40 / 196, 40, 33, 7), (50 / 196, 50, 42, 8),  # the official S
    (0.10, 20, 16, 4), (0.15, 29, 24, 5), (0.20, 39, 32, 7), (0.25, 49, 41, 8)])  # the official labels as ratios
def test_per_frame_counts_of_the_official_settings(ratio, s, dominant, contextual):
    p = vzv(ratio)
    assert p.num_kept(196, (14, 14)) == s and p.split(s) == (dominant, contextual)
    frame = PruningInputs(tokens=torch.randn(1, 196, 4), grid=(14, 14), vision_attention=torch.rand(1, 196, 196),
                          vision_keys=torch.randn(1, 196, 5))
    assert p(frame).num_kept == s


def test_one_token_per_frame_is_all_contextual_and_ratio_one_is_the_frame():
    # S = 1: D = int(54/64) = 0, C = 1: every token merged into target 0 (the official at SPATIAL_TOKENS=1).
    tokens = torch.randn(2, 6, 4)
    inputs = PruningInputs(tokens=tokens, grid=(2, 3), vision_attention=torch.rand(2, 6, 6),
                           vision_keys=torch.randn(2, 6, 3))
    red = vzv(0.01)(inputs)
    torch.testing.assert_close(red.tokens[:, 0], tokens[:, 0] + tokens[:, 1:].mean(1))
    assert red.positions.tolist() == [[0], [0]]
    assert vzv(1.0)(inputs).indices.tolist() == [list(range(6))] * 2 and vzv(1.0)(inputs).tokens is None


# -- 2. the official rule ----------------------------------------------------------------------------------
def official_get_2dPool(image_feature: torch.Tensor, side: int, stride: int = 2) -> torch.Tensor:
    """HoliTom LLaVA-NeXT/llava/model/llava_arch.py ``get_2dPool``, ``mm_spatial_pool_mode="bilinear"`` (OneVision)."""
    num_frames, num_tokens, num_dim = image_feature.shape
    image_feature = image_feature.view(num_frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
    scaled_shape = [math.ceil(side / stride), math.ceil(side / stride)]
    image_feature = F.interpolate(image_feature, size=scaled_shape, mode="bilinear")
    return image_feature.permute(0, 2, 3, 1).reshape(num_frames, -1, num_dim)


def official_visionzip(hidden_states, attention, metric, dominant_num, contextual_num):
    """HoliTom visionzip/llava_arch.py, the inner ``visionzip`` of ``prepare_inputs_labels_for_multimodal``
    (``mm_newline_position="one_token"``, OneVision's); returns ``(tokens, dominant indices)``."""
    batch_size, seq_len, embed_dim = hidden_states.shape
    topk_indices = attention.topk(dominant_num, dim=1).indices
    all_indices = topk_indices
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
    metric_filtered = metric[mask].view(batch_size, seq_len - dominant_num, metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, (seq_len - dominant_num) // contextual_num)
    target_indices = torch.arange(0, seq_len - dominant_num, step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), topk_indices.sort(dim=1).values


def official_frames(raw_hidden, attn, raw_keys, side, spatial_tokens):
    """The official pipeline on raw frames: ``raw_hidden [F, s^2, D]`` (projected), ``attn [F, H, s^2, s^2]``,
    ``raw_keys [F, H, s^2, d]`` (siglip_encoder.py: ``attn_weights.mean(dim=1).mean(dim=1)``,
    ``raw_key_states.mean(1)``; llava_arch.py: each pooled by ``get_2dPool``, ``int(S * 54/64)`` dominant)."""
    attn_weights = attn.mean(dim=1).mean(dim=1)  # [F, s^2]
    metric = raw_keys.mean(1)  # [F, s^2, d]
    pooled = official_get_2dPool(raw_hidden, side)
    attention = official_get_2dPool(attn_weights.unsqueeze(-1), side).squeeze(-1)
    metric = official_get_2dPool(metric, side)
    dominant_num = int(spatial_tokens * (54 / 64))
    return official_visionzip(pooled, attention, metric, dominant_num, spatial_tokens - dominant_num)


def pooling_matrix(side: int) -> torch.Tensor:
    """``[p^2, s^2]``: the official ``get_2dPool`` applied to the identity (column q = the pooled one-hot q)."""
    return official_get_2dPool(torch.eye(side * side)[None], side)[0]  # one frame whose token q is the one-hot q


def adapter_view(raw_hidden, attn, raw_keys, side, received: bool = True) -> PruningInputs:
    """What the OneVision adapter hands the pruner for these frames: pooled tokens, the pooled map ``P A P^T``
    (head mean), pooled head-mean keys, and (``received``) each patch's attention received over the raw
    queries, pooled: ``P (A^T 1) / s^2``, written here as the adapter's formula, not the official code's."""
    p = pooling_matrix(side)
    head_mean = attn.mean(1)
    return PruningInputs(tokens=official_get_2dPool(raw_hidden, side), grid=(math.ceil(side / 2),) * 2,
                         vision_attention=p @ head_mean @ p.T, vision_keys=p @ raw_keys.mean(1),
                         vision_received=head_mean.mean(1) @ p.T if received else None)


def random_frames(seed: int, alike: bool = False, frames: int = 3, heads: int = 4, side: int = 27):
    """``(hidden [F, s^2, 16], head attention [F, H, s^2, s^2], keys [F, H, s^2, 8])`` of raw OneVision-like
    frames (27x27 SigLIP tokens -> 14x14); ``alike``: every query row of a frame attends the same way."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    hidden = torch.randn(frames, n, 16, generator=g)
    logits = 2 * torch.randn(frames, heads, 1 if alike else n, n, generator=g)
    attn = logits.softmax(-1).expand(-1, -1, n, -1)
    return hidden, attn, torch.randn(frames, heads, n, 8, generator=g)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spatial_tokens", [20, 30])
@pytest.mark.parametrize("alike", [True, False])
def test_equals_official_pipeline(seed, spatial_tokens, alike):
    """Frames whose queries attend alike, and general ones (the adapter's ``vision_received`` counts every raw
    query once, as the official score does)."""
    side = 27
    hidden, attn, keys = random_frames(seed, alike, side=side)
    ref, ref_dominant = official_frames(hidden, attn, keys, side, spatial_tokens)
    red = vzv(spatial_tokens / 196)(adapter_view(hidden, attn, keys, side))
    dominant = int(spatial_tokens * 54 / 64)
    assert torch.equal(red.positions[:, :dominant], ref_dominant)
    torch.testing.assert_close(red.tokens, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_without_received_attention_the_score_is_the_query_weighted_one_and_the_rest_the_official_rule(seed):
    """A pooled map alone (an adapter that gives no ``vision_received``): its column mean weights the raw queries."""
    side, spatial_tokens = 27, 30
    hidden, attn, keys = random_frames(seed, side=side)
    inputs = adapter_view(hidden, attn, keys, side, received=False)
    red = vzv(spatial_tokens / 196)(inputs)
    p = pooling_matrix(side)
    # ours: P (A^T c) / 196, c = P^T 1 the pooled weight of each raw query; the official: P (A^T 1) / 729
    c = p.sum(0)
    weighted = (p @ (attn.mean(1).transpose(1, 2) @ c)[..., None])[..., 0] / p.shape[0]
    torch.testing.assert_close(red.scores, weighted, rtol=1e-5, atol=1e-7)
    official_score = official_get_2dPool(attn.mean(1).mean(1)[..., None], side)[..., 0]
    assert not torch.allclose(red.scores, official_score)  # the documented difference is real
    dominant = int(spatial_tokens * 54 / 64)
    ref, ref_dominant = official_visionzip(inputs.tokens, red.scores, inputs.vision_keys, dominant,
                                           spatial_tokens - dominant)
    assert torch.equal(red.positions[:, :dominant], ref_dominant)
    torch.testing.assert_close(red.tokens, ref, rtol=0, atol=1e-5)


# -- 3. in the tiny OneVision --------------------------------------------------------------------------------
def test_onevision_places_the_official_rule_on_the_models_own_tensors():
    from tokenprune.adapters.common import attention_modules, eager_vision_attention
    from tokenprune.adapters.pre_llm import prune_views

    lvlm = lvlm_for("llava_onevision")
    cfg = lvlm.model.config
    clip = video(4, side=cfg.vision_config.image_size, seed=3)  # frames at the tower's size: no resize
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 5 -> pooled 3x3
    n = math.ceil(side / 2) ** 2
    pruner = vzv(8 / n)  # S = 8: D = int(8 * 54/64) = 6, C = 2
    batch = lvlm.prepare([clip], PROMPTS[:1])
    enc = lvlm.encode([clip], PROMPTS[:1], pruner.needs)
    kept = prune_views(enc.views, pruner, ["0"], lvlm.project_features)
    frames = [(v, k) for v, k in zip(enc.views, kept) if v.prunable]
    tower = lvlm.model.model.vision_tower
    pixels = batch["pixel_values_videos"][0]
    keys = []
    handle = attention_modules(tower)[-1].k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    try:
        with torch.no_grad():
            tower(pixels)
    finally:
        handle.remove()
    heads = cfg.vision_config.num_attention_heads
    raw_keys = keys[0].view(*keys[0].shape[:2], heads, -1).transpose(1, 2)  # [T, H, s^2, d]
    attn = eager_vision_attention(tower, pixels, -1)[:, None]  # [T, 1, s^2, s^2], head mean
    with torch.no_grad():
        pooled = lvlm.model.model.get_video_features(
            pixel_values_videos=batch["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output
    pooled = pooled.reshape(-1, pooled.shape[-1])[:-1].reshape(len(frames), n, -1).float()  # the newline dropped
    p = pooling_matrix(side)
    score = attn[:, 0].mean(1) @ p.T  # official: every raw query counted once, then pooled (P A^T 1 / s^2)
    ref, ref_dominant = official_visionzip(pooled, score, p @ raw_keys.mean(1), 6, 2)
    for f, (view, (seq, tokens, sources, _)) in enumerate(frames):
        assert torch.equal(seq, view.seq_index[:8])  # the frame's first 8 slots: [dominant; contextual]
        assert torch.equal(sources[:6], view.seq_index[ref_dominant[f]])
        assert (tokens.float() - ref[f]).abs().max().item() <= 1e-5


# -- 4. every video family ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_and_an_image_on_every_family(family):
    """A batch (video, another video, image): every view gets its own S (images too, see the docstring)."""
    check_pruner_on(lvlm_for(family), [video(), video(seed=1), images(1)[0]], [*PROMPTS, "describe the picture"],
                    "visionzip_video", new_tokens=4)


# -- 5. errors -------------------------------------------------------------------------------------------------
def test_clip_scope_and_bad_options_are_one_line():
    assert vzv(0.5).scope == "frame"
    for bad in [dict(scope="clip"), dict(dominant_share=0), dict(dominant_share=1.5), dict(vision_layer="x")]:
        with pytest.raises(OptionError) as err:
            vzv(0.5, **bad)
        assert "\n" not in str(err.value)
