"""``PrunableLVLM.loglikelihood``: teacher-forced continuations on the pruned prefill (multiple choice).

Checked against independent computations, on the tiny random models of every family:
1. unpruned: the Hugging Face model's own forward over prompt + continuation (log-softmax gather), 1e-4;
2. with a pruner: the first continuation token's log-probability is the generate path's first-token
   logits (same prefill), and a continuation that *is* the greedy answer scores as greedy at every
   token, in-LLM multi-stage pruners (per layer-group cache layouts) included;
3. continuations sharing one prompt (one prefill) == each scored alone; a batch == samples alone.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import wrap
from tokenprune.errors import OptionError
from tokenprune.zoo import tiny

FAMILIES = {name: getattr(tiny, f"tiny_{name}") for name in tiny.FAMILIES}
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]
CONTINUATIONS = ["a red circle on grey", "two"]


@functools.lru_cache(maxsize=None)
def lvlm_for(family: str):
    model, processor = FAMILIES[family]()
    return wrap(model, processor)


def images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(96, 96), (80, 112)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_matches_hugging_face_forward(family):
    lvlm = lvlm_for(family)
    imgs = images(1)
    out = lvlm.loglikelihood(imgs, PROMPTS[:1], CONTINUATIONS[:1])
    batch = lvlm.prepare(imgs, PROMPTS[:1])
    cont = lvlm.tokenizer(CONTINUATIONS[0], add_special_tokens=False)["input_ids"]
    n = batch["input_ids"].shape[1]
    full = {}
    for k, v in batch.items():  # per-token inputs grow by the continuation (text: token type 0)
        if torch.is_tensor(v) and v.shape == batch["input_ids"].shape:
            tail = torch.tensor([cont]) if k == "input_ids" else torch.full((1, len(cont)), int(k == "attention_mask"))
            v = torch.cat([v, tail.to(v.dtype)], 1)
        full[k] = v
    with torch.no_grad():
        logits = lvlm.model(**full).logits[0].float()
    ref = logits[n - 1: n - 1 + len(cont)].log_softmax(-1).gather(1, torch.tensor(cont)[:, None])[:, 0]
    assert len(cont) > 1
    assert torch.allclose(torch.tensor(out.token_logprobs[0]), ref, atol=1e-4), (out.token_logprobs[0], ref.tolist())
    assert out.logprobs[0] == pytest.approx(float(ref.sum()), abs=1e-4)
    greedy = bool((logits[n - 1: n - 1 + len(cont)].argmax(-1) == torch.tensor(cont)).all())
    assert out.greedy[0] == greedy
    assert out.stats[0].new_tokens == len(cont) and out.stats[0].visual_tokens_kept == out.stats[0].visual_tokens_in


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["fopru_rank", "visionzip", "fastv", "pdrop:layers=1,2,3"])
def test_pruned_first_token_is_generate_first_logits(family, name):
    lvlm = lvlm_for(family)
    p = tp.pruner_from_spec(name, ratio=0.5)
    gen = lvlm.generate(images(), PROMPTS, pruner=p, max_new_tokens=1, sample_ids=["a", "b"])
    out = lvlm.loglikelihood(images(), PROMPTS, CONTINUATIONS, pruner=p, sample_ids=["a", "b"])
    for i, c in enumerate(CONTINUATIONS):
        first = lvlm.tokenizer(c, add_special_tokens=False)["input_ids"][0]
        assert out.token_logprobs[i][0] == pytest.approx(float(gen.first_logits[i].log_softmax(-1)[first]), abs=1e-6)
        assert out.stats[i].visual_tokens_kept == gen.stats[i].visual_tokens_kept < gen.stats[i].visual_tokens_in
        assert out.stats[i].tokens_per_layer == gen.stats[i].tokens_per_layer


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("name", [None, "fopru_rank", "fastv", "pdrop:layers=1,2,3", "sparsevlm:layers=0,1,2", "dart"])
def test_teacher_forcing_equals_the_no_cache_reference(family, name, monkeypatch):
    """Teacher-forcing generate's greedy tokens through the cache (every layer group's own layout
    and positions: FastV 2 groups, PDrop one per stage, renumbered under "compact") gives the
    log-probabilities of the no-cache reference, which re-runs the whole pruned sequence per token;
    every token is greedy; a wrong token is not. A left-padded batch of two."""
    lvlm = lvlm_for(family)
    p = None if name is None else tp.pruner_from_spec(name, ratio=0.5)
    imgs = images()
    recorded = []
    logits = lvlm.runner._logits
    monkeypatch.setattr(lvlm.runner, "_logits", lambda h, device: recorded.append(logits(h, device)) or recorded[-1])
    gen = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=6, ignore_eos=True, use_cache=False, sample_ids=["a", "b"])
    monkeypatch.undo()
    reference = torch.stack(recorded, 1).log_softmax(-1).gather(2, gen.token_ids[..., None])[..., 0]  # [2, 6]
    encoded = lvlm.encode(imgs, PROMPTS, lvlm.vision_needs(p))
    in_llm = p if p is not None and p.stage is tp.Stage.IN_LLM else None
    policy = p.default_position_policy(lvlm.mrope) if p is not None else "keep"
    inputs = lvlm._assemble(encoded.batch, encoded.views, p, "keep" if in_llm is not None else policy, ["a", "b"], PROMPTS)[0]
    targets = gen.token_ids
    assert bool(inputs.mask[:, 0].logical_not().any())  # left padding in the batch
    res = lvlm.runner.score(inputs, targets, torch.ones_like(targets, dtype=torch.bool), pruner=in_llm,
                            position_policy=policy)
    assert torch.allclose(res.logprobs, reference, atol=1e-4), (res.logprobs, reference)
    assert bool(res.greedy.all()), res.greedy
    assert torch.allclose(res.first_logits, gen.first_logits, atol=1e-5)
    wrong = targets.clone()
    wrong[:, 3] = (wrong[:, 3] + 1) % lvlm.model.config.get_text_config().vocab_size
    res2 = lvlm.runner.score(inputs, wrong, torch.ones_like(wrong, dtype=torch.bool), pruner=in_llm, position_policy=policy)
    assert not bool(res2.greedy[:, 3].any()) and bool((res2.logprobs[:, 3] < res.logprobs[:, 3]).all())
    assert torch.allclose(res2.logprobs[:, :3], res.logprobs[:, :3], atol=1e-6)


@pytest.mark.parametrize("name", [None, "fopru_rank", "fastv"])
def test_shared_prefill_and_batch_equal_alone(name):
    lvlm = lvlm_for("llava")
    p = None if name is None else tp.create_pruner(name, ratio=0.5)
    img = images(1)[0]
    choices = ["red", "a blue square", "no"]
    shared = lvlm.loglikelihood([img] * 3, [PROMPTS[0]] * 3, choices, pruner=p, sample_ids=["q"] * 3)
    for i, c in enumerate(choices):
        alone = lvlm.loglikelihood([img], [PROMPTS[0]], [c], pruner=p, sample_ids=["q"])
        assert shared.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-5)
        assert shared.greedy[i] == alone.greedy[0]
    imgs = images()
    both = lvlm.loglikelihood(imgs, PROMPTS, CONTINUATIONS, pruner=p, sample_ids=["a", "b"])
    for i in range(2):
        alone = lvlm.loglikelihood(imgs[i:i + 1], PROMPTS[i:i + 1], CONTINUATIONS[i:i + 1], pruner=p, sample_ids=[["a", "b"][i]])
        assert both.token_logprobs[i] == pytest.approx(alone.token_logprobs[0], abs=1e-4)
    assert both.results == list(zip(both.logprobs, both.greedy))


def test_image_placeholder_places_the_image():
    from tokenprune.adapters.common import chat_prompts, user_content

    assert user_content("what ?") == [{"type": "image"}, {"type": "text", "text": "what ?"}]
    assert user_content("<image>\nwhat ?") == user_content("what ?")
    assert user_content("Look: <image> what ?") == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                                     {"type": "text", "text": "what ?"}]
    with pytest.raises(OptionError, match="one image"):
        user_content("<image> and <image>")
    lvlm = lvlm_for("llava")
    (first,), (after,) = chat_prompts(lvlm.processor, ["what ?"]), chat_prompts(lvlm.processor, ["Look: <image> what ?"])
    assert first.index("<image>") < first.index("what ?")
    assert after.index("Look:") < after.index("<image>") < after.index("what ?") and after.count("<image>") == 1
    out = lvlm.generate(images(1), ["Look: <image> what ?"], max_new_tokens=2)
    assert out.stats[0].visual_tokens_in > 0


def test_clear_errors():
    lvlm = lvlm_for("llava")
    with pytest.raises(OptionError, match="one of each"):
        lvlm.loglikelihood(images(2), PROMPTS, ["x"])
    with pytest.raises(OptionError, match="no tokens"):
        lvlm.loglikelihood(images(1), PROMPTS[:1], [""])
