"""timm-backboned LVLMs (timm ViT -> projector -> HF causal LM): FoPru reads the timm block's attention.

timm imports torchvision; beside the CPU torch wheel no working torchvision can be installed (the PyPI
wheels are CUDA-linked and break transformers' import, see docs/adapters.md), so this module runs
only where timm imports (a machine with a matching torch / torchvision pair). The shared exactness
suites (tests/test_adapters.py, ...) include the family there too, via ``tiny.FAMILIES``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.zoo import tiny

if not tiny._timm_importable():
    pytest.skip("timm does not import here (it needs a torchvision build matching this torch; see docs/adapters.md)",
                allow_module_level=True)

import tokenprune as tp  # noqa: E402
from tokenprune.adapters import wrap  # noqa: E402
from tokenprune.pruner import PrunerNeeds  # noqa: E402

PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, ((96, 96), (80, 112))[i % 2] + (3,), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=[0, 4], ids=["cls", "cls+4reg"])
def lvlm(request):
    return wrap(*tiny.tiny_timm_lvlm(reg_tokens=request.param))


def _reference_scores(attn: torch.Tensor, prefix: int, axis: str) -> torch.Tensor:
    """FoPru's rule on a [T, T] map, written out independently: CLS row, column or row mean, or the
    higher-variance of column / row."""
    if axis == "cls":
        return attn[0, prefix:]
    patches = attn[prefix:, prefix:]
    column, row = patches.mean(0), patches.mean(1)
    if axis == "column":
        return column
    if axis == "row":
        return row
    return column if column.var() >= row.var() else row


@pytest.mark.parametrize("layer", [-2, 0, -1])
@pytest.mark.parametrize("axis", ["auto", "column", "row", "cls"])
def test_fopru_selection_equals_reference_from_timm_attention(lvlm, layer, axis):
    """FoPru's kept tokens == the top-k of scores from the block's own (unfused timm) probabilities."""
    batch = lvlm.prepare(images(), PROMPTS)
    reference = lvlm.reference_vision_attention(batch, layer)
    prefix = lvlm.model.vision_tower.num_prefix_tokens
    p = tp.create_pruner("fopru_rank", ratio=0.25, vision_layer=layer, score_axis=axis)
    views = lvlm.encode_images(batch, p.needs)
    for view, ref in zip(views, reference):
        own = view.vision_attention
        assert (own - (ref[:prefix] if axis == "cls" else ref)).abs().max().item() <= 1e-5
        k = p.num_kept(view.tokens.shape[0], view.grid)
        expected = torch.topk(_reference_scores(ref, prefix, axis), k).indices.sort().values
        from tokenprune.pruner import PruningInputs

        red = p(PruningInputs(tokens=view.tokens[None], grid=view.grid, sample_ids=["x"],
                              vision_attention=view.vision_attention[None], vision_prefix=prefix))
        assert red.indices[0].tolist() == expected.tolist()


def test_fused_attention_is_never_turned_off(lvlm):
    """Scoring reads q/k off the block's qkv projection: every block keeps its fused kernel (timm's
    unfused path, the only one that calls ``attn_drop``, never runs)."""
    vit = lvlm.model.vision_tower
    assert all(b.attn.fused_attn for b in vit.blocks)
    unfused = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda *a: unfused.append(1)) for b in vit.blocks]
    try:
        lvlm.generate(images(), PROMPTS, pruner=tp.create_pruner("fopru_rank", ratio=0.25), max_new_tokens=2)
    finally:
        for h in handles:
            h.remove()
    assert not unfused and all(b.attn.fused_attn for b in vit.blocks)


@pytest.mark.parametrize("spec", ["fopru_rank", "fopru_row", "fastervlm", "random", "pool", "fastv:k=2", "divprune",
                                  "vispruner", "cdpruner", "visionzip", "pdrop:layers=1,2,3", "sparsevlm:layers=0,1,2",
                                  "dart:k=2"])
def test_every_pruner_runs_and_the_llm_receives_the_kept_tokens(lvlm, spec):
    p = tp.pruner_from_spec(spec, ratio=0.5)  # pdrop cannot reach 0.25 on a 4-layer decoder
    seen: list[int] = []
    handle = lvlm.runner.layers[-1].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                                              with_kwargs=True)
    try:
        out = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2)
    finally:
        handle.remove()
    text = lvlm.prepare(images(1), PROMPTS[:1])["input_ids"].shape[1] - 64
    assert out.stats[0].visual_tokens_in == 64
    assert seen[0] == text + out.stats[0].visual_per_layer[-1]  # counted inside the LLM
    assert out.stats[0].visual_per_layer[-1] < 64


def test_wrap_trained_parts():
    """``from_parts`` + ``TimmLVLMProcessor.from_timm``: a model assembled from a timm ViT, a projector
    and a causal LM wraps and answers like the built model."""
    from tokenprune.adapters.timm_modeling import TimmLVLMForConditionalGeneration, TimmLVLMProcessor

    model, processor = tiny.tiny_timm_lvlm()
    again = TimmLVLMForConditionalGeneration.from_parts(model.vision_tower, model.projector, model.language_model,
                                                        image_token_id=model.config.image_token_id).eval()
    proc = TimmLVLMProcessor.from_timm(model.vision_tower, processor.tokenizer, chat_template=processor.chat_template,
                                       mean=processor.mean, std=processor.std, crop_pct=processor.crop_pct)
    a = wrap(model, processor).generate(images(1), PROMPTS[:1], max_new_tokens=3)
    b = wrap(again, proc).generate(images(1), PROMPTS[:1], max_new_tokens=3)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.first_logits, b.first_logits)
    assert tp.list_models() and "timm_lvlm" in tp.list_models()


def test_vision_needs_beyond_the_feature_block(lvlm):
    """Scoring on the last block (after the feature block) runs it, without changing the features."""
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    plain = lvlm.encode_images(batch, PrunerNeeds())
    scored = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-1))
    assert torch.equal(plain[0].tokens, scored[0].tokens) and scored[0].vision_attention is not None
