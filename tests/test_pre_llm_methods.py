"""DivPrune and FasterVLM: hand-computed selections and the official rules re-implemented (from the
official code, cited per test) on random inputs; both also run through every adapter contract test
in test_adapters.py."""
from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.pruner import PrunerNeeds, PruningInputs
from tokenprune.testing import synthetic_inputs

from test_adapters import PROMPTS, images, lvlm_for


def test_divprune_hand_computed():
    # a and b nearly coincide; d is farthest from its nearest neighbour (c, distance 1), so it goes first,
    # then a (distance 2 to d), then c (distance 1 to both) before b (0.01 from a).
    tokens = torch.tensor([[[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]]])
    assert tp.create_pruner("divprune", ratio=0.5)(PruningInputs(tokens=tokens, grid=(2, 2))).indices.tolist() == [[0, 3]]
    assert tp.create_pruner("divprune", ratio=0.75)(PruningInputs(tokens=tokens, grid=(2, 2))).indices.tolist() == [[0, 2, 3]]


def official_divprune(visual_feature_vectors, threshold_ratio):
    """vbdi/divprune LLaVA/llava/model/llava_arch.py DivPrune + pairwise_cosine_similarity (batch 1)."""
    image_feature_length = visual_feature_vectors.shape[0]
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        m2 = cosine_matrix if i == 0 else torch.index_select(cosine_matrix, 0, s[:i])
        scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :] if i == 0 else torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s.sort().values


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.3, 0.1])
def test_divprune_equals_official_rule_on_random_inputs(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, 70, 24, generator=g)
    red = tp.create_pruner("divprune", ratio=ratio)(PruningInputs(tokens=tokens, grid=(7, 10)))
    for b in range(3):
        assert red.indices[b].tolist() == official_divprune(tokens[b], ratio).tolist()


def test_fastervlm_hand_computed_and_without_cls():
    attn = torch.tensor([[[0.0, 0.1, 0.4, 0.2, 0.3]]])  # the CLS row over [CLS, 4 patches]
    inputs = PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(2, 2), vision_attention=attn, vision_prefix=1)
    assert tp.create_pruner("fastervlm", ratio=0.5)(inputs).indices.tolist() == [[1, 3]]
    assert tp.create_pruner("fastervlm").needs == PrunerNeeds(vision_attention_layer=-2, vision_attention_rows="prefix")
    # no CLS (Qwen): the attention each patch receives, averaged over queries: columns .35, .15, .25, .25
    full = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3], [0.5, 0.1, 0.2, 0.2]]])
    no_cls = PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(2, 2), vision_attention=full, vision_prefix=0)
    assert tp.create_pruner("fastervlm", ratio=0.5)(no_cls).indices.tolist() == [[0, 2]]


def test_fastervlm_equals_official_rule_in_the_model():
    """Theia-4869/FasterVLM clip_encoder.py feature_select: attentions[-2][:, :, 0, 1:], mean over heads, top-T."""
    lvlm = lvlm_for("llava")
    p = tp.create_pruner("fastervlm", ratio=0.25)
    batch = lvlm.prepare(images(), PROMPTS)
    tower = lvlm.model.model.vision_tower
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = old
    cls_attention = attentions[-2][:, :, 0, 1:].mean(dim=1)  # [B, 64]
    ref = cls_attention.topk(p.num_kept(64, (8, 8)), dim=1).indices.sort(dim=1).values
    views = lvlm.encode_images(batch, p.needs)
    red = p(PruningInputs(tokens=torch.stack([v.tokens for v in views]), grid=(8, 8), vision_prefix=1,
                          vision_attention=torch.stack([v.vision_attention for v in views])))
    assert red.indices.tolist() == ref.tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_official_position_conventions_of_pre_llm_methods(family):
    """Official LLaVA code renumbers positions (compact); the official Qwen ports keep M-RoPE positions."""
    lvlm = lvlm_for(family)
    p = tp.create_pruner("divprune", ratio=0.25)
    expected = "keep" if lvlm.mrope else "compact"
    assert p.default_position_policy(lvlm.mrope) == expected
    default = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2)
    explicit = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2, position_policy=expected)
    assert torch.equal(default.first_logits, explicit.first_logits)


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_divprune_is_global_over_the_views(family):
    """One budget over all the views of an image (the official LLaVA-NeXT handling), not one per view."""
    lvlm = lvlm_for(family)
    out = lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("divprune", ratio=0.3), max_new_tokens=1)
    st = out.stats[0]
    assert st.visual_tokens_kept == tp.keep_count(0.3, st.visual_tokens_in)


# -- VisPruner --------------------------------------------------------------------------------------
def test_vispruner_hand_computed():
    # CLS attention ranks 0, 2 | 5, 3, 6, 4, 7, 1; 2 important (half of 4), 2 diverse from the rest.
    cls = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.08, 0.12, 0.09, 0.06])
    attn = torch.cat([torch.zeros(1), cls])[None, None, :]  # [1, 1, 1 + 8]: the CLS row
    f = {5: (1, 0), 6: (0, 1), 7: (0.6, 0.8), 3: (1, 0), 4: (0.8, 0.6), 1: (-1, 0), 0: (0, 0.5), 2: (0.3, 0.3)}
    features = torch.tensor([[f[i] for i in range(8)]], dtype=torch.float32)
    inputs = PruningInputs(tokens=torch.zeros(1, 8, 2), grid=(2, 4), vision_attention=attn, vision_prefix=1,
                           vision_features=features)
    # residual [5, 3, 6, 4, 7, 1] -> a = 5, 6, 7 vs b = 3, 4, 1: all a dropped (r = 4 > 3), residual [3, 4, 1];
    # then r = 1: a = 3 (max cos .8 with 4), 1 (-.8) vs b = 4: drop 3 -> [1, 4].
    assert tp.create_pruner("vispruner", ratio=0.5)(inputs).indices.tolist() == [[0, 1, 2, 4]]


def official_vispruner(image_features, cls_attention_heads, visual_token_num, important_ratio=0.5):
    """Theia-4869/VisPruner llava/model/llava_arch.py encode_images (the selection), unchanged."""
    B, N, C = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = cls_attention_heads.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]], dim=-1)
    selected = torch.cat([important_indices, residual_indices], dim=-1)
    return selected.sort(dim=-1).values


@pytest.mark.parametrize("seed", range(5))
def test_vispruner_equals_official_rule_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n, heads = 96, 4  # ratio 0.25: 24 kept, 12 important, residual 84 -> 12 in steps of 8 (even: no crash)
    features = torch.randn(2, n, 20, generator=g)
    cls_heads = torch.rand(2, heads, n, generator=g)
    attn = torch.cat([torch.zeros(2, 1), cls_heads.mean(1)], dim=1)[:, None, :]
    red = tp.create_pruner("vispruner", ratio=0.25)(PruningInputs(
        tokens=torch.zeros(2, n, 4), grid=(8, 12), vision_attention=attn, vision_prefix=1, vision_features=features))
    assert red.indices.tolist() == official_vispruner(features, cls_heads, 24).tolist()


def test_vispruner_odd_residual_does_not_crash():
    """The official loop fails when the residual count is odd; ours keeps the right number of tokens."""
    inputs = synthetic_inputs(grid=(5, 7), batch=2)  # 35 tokens, ratio 0.3: 11 kept, 5 important, 30 -> 6 residual
    red = tp.create_pruner("vispruner", ratio=0.3)(inputs)
    assert red.indices.shape == (2, 11)
    with pytest.raises(IndexError, match="shape mismatch"):
        official_vispruner(torch.randn(1, 35, 8), torch.rand(1, 2, 35), 12)  # residual 29: odd


# -- CDPruner ----------------------------------------------------------------------------------------
def test_dpp_greedy_map_hand_computed():
    # identity-like kernel with one strong item and two near-duplicates: 0 first (largest), then 2
    # (orthogonal to 0), never both duplicates 0 and 1 before 2.
    kernel = torch.tensor([[[4.0, 1.9, 0.0], [1.9, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    from tokenprune.methods.cdpruner import dpp_greedy_map

    assert dpp_greedy_map(kernel, 2).tolist() == [[0, 2]]
    assert dpp_greedy_map(kernel, 3).tolist() == [[0, 2, 1]]


def official_cdpruner(image_features, image_embeds, text_embeds, visual_token_num):
    """Theia-4869/CDPruner llava/model/llava_arch.py encode_images (after the projector), unchanged."""
    B, N, C = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values


@pytest.mark.parametrize("seed", range(5))
def test_cdpruner_equals_official_rule_on_random_inputs(seed):
    """Our relevance uses the LLM's embeddings of the prompt where the official code uses CLIP's: the
    same formula on the same inputs gives the same selection."""
    g = torch.Generator().manual_seed(seed)
    tokens, text = torch.randn(1, 60, 80, generator=g), torch.randn(1, 7, 80, generator=g)
    red = tp.create_pruner("cdpruner", ratio=0.3)(PruningInputs(
        tokens=tokens, grid=(6, 10), text_tokens=text, text_mask=torch.ones(1, 7, dtype=torch.bool)))
    assert red.indices.tolist() == official_cdpruner(tokens, tokens, text[0], 18).tolist()
    plain = tp.create_pruner("cdpruner", ratio=0.3, relevance="plain")(PruningInputs(
        tokens=tokens, grid=(6, 10), text_tokens=text, text_mask=torch.ones(1, 7, dtype=torch.bool)))
    assert plain.indices.tolist() == official_cdpruner(tokens, tokens, -text[0], 18).tolist()


# -- the inputs these methods read, on every family ------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl"])
def test_vision_features_are_what_the_projector_reads(family):
    lvlm = lvlm_for(family)
    batch = lvlm.prepare(images(), PROMPTS)
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds(vision_features=True)) if v.prunable]
    project = (lambda x: x) if lvlm.mrope else lvlm.model.model.multi_modal_projector
    with torch.no_grad():
        for v in views:
            assert (project(v.vision_features) - v.tokens).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pre_llm_text_is_the_prompt_after_the_image(family):
    lvlm = lvlm_for(family)
    p = tp.create_pruner("cdpruner", ratio=0.5)
    seen = []
    select = p.select
    p.select = lambda inputs: seen.append(inputs) or select(inputs)
    lvlm.generate(images(), PROMPTS, pruner=p, max_new_tokens=1)
    batch = lvlm.prepare(images(), PROMPTS)
    embeds = lvlm.runner.embed(batch["input_ids"])
    image = batch["input_ids"] == lvlm.model.config.image_token_id
    for inputs in seen:
        for i, sid in enumerate(inputs.sample_ids):
            b = int(str(sid).split("/")[0])
            last = image[b].nonzero().max()
            real = batch["attention_mask"][b].bool().nonzero().flatten()
            after = real[real > last]
            assert torch.equal(inputs.text_tokens[i][inputs.text_mask[i]], embeds[b, after])
            assert torch.equal(inputs.text_ids[i][inputs.text_mask[i]], batch["input_ids"][b, after])
            assert inputs.prompts[i] == PROMPTS[b]


# -- VisionZip ---------------------------------------------------------------------------------------
def test_visionzip_hand_computed():
    # 6 patches + CLS, 4 tokens: round(4 * 10 / 64) = 1 contextual, 3 dominant = CLS + patches 1, 3 (CLS
    # attention .3, .25); the rest 0, 2, 4, 5: one target (every 4th: token 0), the others merged into it.
    cls = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.20, 0.10])
    inputs = PruningInputs(tokens=torch.zeros(1, 6, 2), grid=(2, 3), vision_prefix=1,
                           vision_attention=torch.cat([torch.zeros(1), cls])[None, None, :],
                           vision_features=torch.tensor([[[float(i), 1.0] for i in range(6)]]),
                           vision_prefix_features=torch.tensor([[[100.0, 0.0]]]), vision_keys=torch.randn(1, 7, 4))
    red = tp.create_pruner("visionzip", ratio=4 / 6)(inputs)
    third = 1 / 3
    expected = torch.tensor([[[1, 0, 0, 0, 0, 0, 0],             # CLS
                              [0, 0, 1, 0, 0, 0, 0],             # patch 1
                              [0, 0, 0, 0, 1, 0, 0],             # patch 3
                              [0, 1, 0, third, 0, third, third]]])  # target 0 + mean(2, 4, 5)
    torch.testing.assert_close(red.feature_weights, expected.float())
    assert red.indices.tolist() == [[0, 1, 2, 3]] and red.positions.tolist() == [[0, 1, 3, 0]]


def official_visionzip(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """dvlab-research/VisionZip visionzip/clip_encoder.py CLIPVisionTower_VisionZip.forward (batched branch)."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
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
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


@pytest.mark.parametrize("seed", range(5))
def test_visionzip_equals_official_rule_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n, heads = 96, 4
    hidden = torch.randn(2, 1 + n, 12, generator=g)
    attn = torch.randn(2, heads, 1 + n, 1 + n, generator=g).softmax(-1)
    metric = torch.randn(2, 1 + n, 6, generator=g)
    red = tp.create_pruner("visionzip", ratio=64 / n)(PruningInputs(
        tokens=torch.zeros(2, n, 4), grid=(8, 12), vision_prefix=1, vision_attention=attn.mean(1)[:, :1],
        vision_features=hidden[:, 1:], vision_prefix_features=hidden[:, :1], vision_keys=metric))
    ours = red.feature_weights @ hidden  # what goes through the projector
    ref = official_visionzip(attn, hidden, metric, dominant_num=53, contextual_num=10)  # main.py: 54 - 1, 10
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_vision_keys_are_the_layers_head_averaged_keys(family):
    lvlm = lvlm_for(family)
    batch = lvlm.prepare(images(), PROMPTS)
    views = [v for v in lvlm.encode_images(batch, tp.create_pruner("visionzip").needs) if v.prunable]
    tower = lvlm.model.model.vision_tower
    with torch.no_grad():
        hs = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    layer = (tower.encoder.layers if family == "llava" else tower.encoder.layer)[-2]
    norm = layer.layer_norm1 if family == "llava" else layer.layernorm_before
    attn = layer.self_attn if family == "llava" else layer.attention
    with torch.no_grad():
        keys = attn.k_proj(norm(hs[-3]))  # the input of layer -2
    keys = keys.unflatten(-1, (-1, attn.head_dim)).mean(2)  # [views, T, d]
    if family == "internvl":  # merge order and 2x2 groups, as the adapter lays tokens out
        side = round((keys.shape[1] - 1) ** 0.5)
        i, j = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
        groups = torch.stack([2 * i * side + 2 * j, 2 * i * side + 2 * j + 1, (2 * i + 1) * side + 2 * j,
                              (2 * i + 1) * side + 2 * j + 1], -1).reshape(-1, 4)
        keys = torch.cat([keys[:, :1], keys[:, 1 + groups].mean(2)], 1)
    for v, k in zip(views, keys):
        assert (v.vision_keys - k).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP whose vision width matches tiny-llava's tower, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from tokenprune.zoo.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         pad_token_id=0, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        projection_dim=8)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_cdpruner_with_a_clip_checkpoint_is_the_official_relevance(tiny_clip):
    """cdpruner:clip=CHECKPOINT: CLIP image embeddings of the model's own layer -2 features vs the CLIP
    text embedding of the prompt (77-token chunks), negated -- official_cdpruner on the same embeddings."""
    from tokenprune.methods.cdpruner import clip_text_embeds, load_clip

    lvlm = lvlm_for("llava")
    p = tp.create_pruner("cdpruner", ratio=0.25, clip=tiny_clip)
    assert p.needs == PrunerNeeds(text=True, vision_features=True)
    batch = lvlm.prepare(images(), PROMPTS)
    views = lvlm.encode_images(batch, p.needs)
    model, tok = load_clip(tiny_clip)
    for b, v in enumerate(views):
        inputs = PruningInputs(tokens=v.tokens[None], grid=v.grid, vision_features=v.vision_features[None],
                               prompts=[PROMPTS[b]])
        with torch.no_grad():
            image_embeds = model.visual_projection(model.vision_model.post_layernorm(v.vision_features[None]))
            text_embeds = clip_text_embeds(model, tok, PROMPTS[b])
        ref = official_cdpruner(v.tokens[None], image_embeds, text_embeds, p.num_kept(64, (8, 8)))
        assert p(inputs).indices.tolist() == ref.tolist()
    out = lvlm.generate(images(), PROMPTS, pruner=p, max_new_tokens=2)  # end to end, prompts passed through
    assert [s.visual_tokens_kept for s in out.stats] == [16, 16]


def test_cdpruner_clip_checkpoint_errors_are_one_line(tiny_clip, tmp_path):
    lvlm = lvlm_for("qwen2_vl")  # merger outputs are 64 wide, the checkpoint's vision tower 32
    with pytest.raises(tp.OptionError, match="vision width 32"):
        lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("cdpruner", clip=tiny_clip), max_new_tokens=1)
    with pytest.raises(tp.TokenpruneError, match="cannot load the CLIP checkpoint"):
        lvlm_for("llava").generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("cdpruner", clip=str(tmp_path / "nope")),
                                   max_new_tokens=1)
