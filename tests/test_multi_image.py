"""Multi-image prompts on LLaVA-1.5 and LLaVA-NeXT (one sample = a list of PIL images).

What is checked, per family, against independent references:
1. the views' tokens, placed at their ``seq_index``, are exactly the image embeddings Hugging Face's own
   forward feeds its language model (captured by a pre-hook), each image's views carry its index
   0..n-1 in prompt order, and together they cover every image token once;
2. unpruned logits == HF forward on the same processor tensors, tokens == HF ``generate``, for 2 and 3
   images (different sizes: LLaVA-NeXT tiles each on its own crop grid), with and without ``<image>``
   placeholders in the prompt; each image's views carry its own vision attention (eager reference);
3. every built-in pruner on a batch of (multi-image sample, single-image sample): ratio 1.0 == unpruned,
   tokens entering each decoder layer == text + budget, cached == uncached, batch == each sample alone;
   at the method's default scope and at every other scope it is defined at;
4. placeholders that do not match the images are one-line :class:`tokenprune.OptionError` s;
   :func:`~tokenprune.adapters.llava.image_spans` on hand-written ids.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from test_adapters import lvlm_for
from tokenprune.adapters.llava import image_spans
from tokenprune.pruner import PrunerNeeds, Stage
from tokenprune.zoo import tiny
from video_checks import BUILTIN_PRUNERS, check_counts, check_pruner_on, check_unpruned_matches_hf, hf_inputs

FAMILY_NAMES = ["llava", "llava_next"]
# LLaVA-NeXT's tiny pinpoints are 32x64, 64x32, 64x64: these sizes take 1x2, 2x2 and 2x1 crop grids and
# unpad to different high-res grids; the single image below is square.
SIZES = [(40, 90), (96, 96), (90, 40)]


def pictures(sizes, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in sizes]


def sample(n: int, placeholders: bool) -> tuple[list[Image.Image], str]:
    """``n`` images (distinct sizes) and a prompt that places them (``<image>`` each) or not (all first)."""
    images = pictures(SIZES[:n], seed=n)
    if placeholders:
        return images, "compare " + " and ".join(["<image>"] * n) + " : what is in the image ?"
    return images, "how many dog are there ? answer using a single word"


def single() -> tuple[Image.Image, str]:
    return pictures([(64, 64)], seed=7)[0], "what is in the image ?"


CASES = [(n, ph) for n in (2, 3) for ph in (False, True)]


def _llm_embeds(lvlm, batch) -> torch.Tensor:
    """``inputs_embeds`` ``[B, L, D]`` that HF's own forward hands its language model."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = lvlm.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lvlm.model(**hf_inputs(batch))
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_views_are_hugging_face_image_embeddings_in_order(family):
    lvlm = lvlm_for(family)
    (imgs3, p3), (imgs2, p2), (img1, p1) = sample(3, True), sample(2, False), single()
    batch = lvlm.prepare([imgs3, img1, imgs2], [p3, p1, p2])
    views = lvlm.encode_images(batch, PrunerNeeds())
    ref = _llm_embeds(lvlm, batch)
    image_pos = batch["input_ids"] == lvlm.model.config.image_token_id
    for b, n in enumerate([3, 1, 2]):
        mine = [v for v in views if v.sample == b]
        prunable = [v.image for v in mine if v.prunable]
        per_image = 2 if family == "llava_next" else 1  # NeXT: base view + high-res view per image
        assert prunable == [j for j in range(n) for _ in range(per_image)]
        assert [v.image for v in mine] == sorted(v.image for v in mine)
        # image j's tokens all come before image j + 1's
        for j in range(n - 1):
            end = max(int(v.seq_index.max()) for v in mine if v.image == j)
            assert end < min(int(v.seq_index.min()) for v in mine if v.image == j + 1)
        placed = torch.cat([v.seq_index for v in mine])
        assert sorted(placed.tolist()) == image_pos[b].nonzero().flatten().tolist()  # each image token once
        got = torch.cat([v.tokens for v in mine])
        torch.testing.assert_close(got, ref[b, placed], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vision_attention_per_image_equals_eager_reference(family):
    """Each image's views carry that image's own vision attention (eager ``output_attentions``)."""
    lvlm = lvlm_for(family)
    (imgs3, p3), (img1, p1) = sample(3, True), single()
    batch = lvlm.prepare([img1, imgs3], [p1, p3])
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2)) if v.prunable]
    reference = tiny.eager_vision_attention(lvlm, batch, -2)  # one [T, T] per view, image after image
    assert len(reference) == len(views) == 4 * (2 if family == "llava_next" else 1)
    for view, ref in zip(views, reference):
        assert view.vision_attention.shape == ref.shape
        assert (view.vision_attention - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unpruned_matches_hugging_face(family):
    lvlm = lvlm_for(family)
    visuals, prompts = zip(*[sample(n, ph) for n, ph in CASES])
    check_unpruned_matches_hf(lvlm, list(visuals), list(prompts))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name", BUILTIN_PRUNERS)
def test_pruner_on_multi_image_batch(family, name):
    lvlm = lvlm_for(family)
    (imgs, prompt), (img1, p1) = sample(3, True), single()
    check_pruner_on(lvlm, [imgs, img1], [prompt, p1], name)
    check_counts(lvlm, *sample(2, False), name)  # the other layout: 2 images, none placed


def _other_scopes() -> list[tuple[str, str]]:
    """``(pruner, scope)`` for each pre-LLM built-in defined at a scope besides its default one."""
    out = []
    for name in BUILTIN_PRUNERS:
        p = tp.create_pruner(name, ratio=0.5)
        if p.stage is Stage.PRE_LLM:
            out += [(name, s) for s in type(p).scopes if s != p.scope]
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name,scope", _other_scopes())
def test_pruner_at_other_scope_on_multi_image_batch(family, name, scope):
    """``scope="clip"``: all images of the prompt (every view of each) are one set with one budget;
    ``"frame"``: each view its own."""
    lvlm = lvlm_for(family)
    (imgs, prompt), (img1, p1) = sample(3, True), single()
    check_pruner_on(lvlm, [imgs, img1], [prompt, p1], name, scope=scope)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("chat_template", [True, False])
def test_placeholders_must_match_images(family, chat_template):
    lvlm = lvlm_for(family)
    imgs, _ = sample(3, False)
    with pytest.raises(tp.OptionError) as err:
        lvlm.generate([imgs], ["compare <image> and <image> ."], max_new_tokens=1, chat_template=chat_template)
    message = str(err.value)
    assert "\n" not in message and "3 images" in message and "2 '<image>'" in message


def test_image_spans_hand_computed():
    ids = torch.tensor([[0, 5, 5, 1, 5, 5, 5, 2],
                        [0, 0, 0, 0, 3, 5, 5, 2]])
    spans = image_spans(ids, 5, [2, 3, 2])
    assert [(b, j, s.tolist()) for b, j, s in spans] == [(0, 0, [1, 2]), (0, 1, [4, 5, 6]), (1, 0, [5, 6])]
    with pytest.raises(tp.OptionError, match="7 image tokens but the 2 images need 6"):
        image_spans(ids, 5, [3, 3])
    with pytest.raises(tp.OptionError, match="span samples 0 and 1"):
        image_spans(ids, 5, [2, 4, 1])
