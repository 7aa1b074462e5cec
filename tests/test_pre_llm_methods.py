"""DivPrune and FasterVLM: hand-computed selections and the official rules re-implemented (from the
official code, cited per test) on random inputs; both also run through every adapter contract test
in test_adapters.py."""
from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.pruner import PrunerNeeds, PruningInputs

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
