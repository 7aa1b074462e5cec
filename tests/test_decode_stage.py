"""The decoding stage: a pruner's :class:`~tokenprune.pruner.DecodePlan` cuts chosen layers' KV caches after
prefill, numbers generated tokens per layer, or selects per step what later layers attend to.

Two test-local pruners exercise it independently of any paper's method: ``_TwoStagesAndCut`` (in-LLM
stages before layers 2 and 3, then a cut of layers 1-2's caches to the final set) and ``_PickPerStep``
(no prefill cut; from layer 2 on, each decode step attends to the text, every generated token and the 2
visual tokens layer 1's attention liked best, and to everything on odd steps). Each is checked against
the no-cache reference (which re-runs the whole sequence every step, applying the plan as attention masks
and position ids, and selecting with its own attention), against positions computed by hand, and against
the unpruned model (so the plan really changes what decoding sees).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.errors import OptionError
from tokenprune.pruner import DecodePlan, LLMStage, PrunerNeeds, Reduction, Stage, TokenPruner
from tokenprune.zoo.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]
STEPS = 5


class _TwoStagesAndCut(TokenPruner):
    """Before layer 2 keep the visual tokens at even places; before layer 3 the first half of those.
    Decoding: ``cut`` layers' caches cut to the final set, generated tokens numbered by ``positions``."""

    stage = Stage.IN_LLM
    extra_stages = (Stage.DECODE,)

    def __init__(self, ratio: float = 0.5, cut: tuple[int, ...] = (1, 2), positions: str = "cache_length"):
        self.ratio, self.cut, self.positions = ratio, cut, positions

    @property
    def needs(self):
        return PrunerNeeds(llm_stages=(LLMStage(layer=2), LLMStage(layer=3)))

    def select(self, inputs):
        n = inputs.num_tokens
        idx = torch.arange(0, n, 2) if inputs.stage == 0 else torch.arange((n + 1) // 2)
        return Reduction(indices=idx.expand(inputs.batch_size, -1))

    def decode_plan(self, n_layers):
        return DecodePlan(cut_layers=self.cut, positions=self.positions)


class _PickPerStep(TokenPruner):
    """From layer ``layer`` on, even steps attend to non-visual entries and the 2 visual entries with the
    most attention at layer ``layer - 1``; odd steps to everything (``None``)."""

    stage = Stage.DECODE

    def __init__(self, ratio: float = 0.5, layer: int = 2):
        self.ratio, self.layer = ratio, layer
        self.states = []

    def decode_plan(self, n_layers):
        return DecodePlan(select_layer=self.layer)

    def decode_select(self, state):
        self.states.append(state)
        state.memory["calls"] = state.memory.get("calls", 0) + 1
        assert state.memory["calls"] == state.step + 1  # one call per step, memory kept between steps
        if state.step % 2:
            return None
        score = state.attention.masked_fill(~state.visual, -1.0)
        top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :2]
        return (~state.visual).scatter(1, top, True)

    def select(self, inputs):
        raise AssertionError("a decode-only pruner is never asked to select tokens")


@functools.lru_cache(maxsize=None)
def _llava():
    return tp.wrap(*tiny_llava())


def _images(n=2):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(n)]


def _run(lvlm, pruner, use_cache=True, n=2, steps=STEPS):
    """``(output, [B, steps, V] logits of every step)``: every LM-head call recorded (prefill, then each step)."""
    logits = []
    hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
    try:
        out = lvlm.generate(_images(n), PROMPTS[:n], pruner=pruner, max_new_tokens=steps, ignore_eos=True,
                            use_cache=use_cache)
    finally:
        hook.remove()
    return out, torch.stack(logits, 1)


def _runner_result(lvlm, pruner, n=2, steps=2):
    """The decoder's own result (``cache_tokens``) for the batch, through the adapter's assembly."""
    enc = lvlm.encode(_images(n), PROMPTS[:n], lvlm.vision_needs(pruner))
    inputs = lvlm._assemble(enc.batch, enc.views, None, "keep", [str(i) for i in range(n)])[0]
    return inputs, lvlm.runner.generate(inputs, steps, pruner=pruner, ignore_eos=True)


@pytest.mark.parametrize("positions", ["cache_length", "continue"])
def test_cut_cached_equals_the_recomputing_reference(positions):
    lvlm = _llava()
    p = _TwoStagesAndCut(positions=positions)
    cached, step_logits = _run(lvlm, p)
    uncached, ref_logits = _run(lvlm, p, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(step_logits, ref_logits, rtol=0, atol=1e-4)
    # the cut is real: without it (same stages) decoding sees more and the later logits move
    _, uncut = _run(lvlm, _TwoStagesAndCut(cut=(), positions=positions))
    torch.testing.assert_close(uncut[:, 0], step_logits[:, 0], rtol=0, atol=1e-5)  # prefill is untouched
    assert (uncut[:, 1:] - step_logits[:, 1:]).abs().max() > 1e-3


def test_cut_leaves_each_layer_the_final_set():
    lvlm = _llava()
    inputs, res = _runner_result(lvlm, _TwoStagesAndCut())
    n_text = (inputs.mask & ~inputs.image_mask).sum(1)
    n_vis = (inputs.image_mask & inputs.mask).sum(1)
    final = n_text + ((n_vis + 1) // 2 + 1) // 2  # the even places, then the first half of them
    assert res.prefill_tokens[:, 3].tolist() == final.tolist()
    # layer 0 keeps its whole cache; 1 (full at prefill) and 2 (stage 1's layout) are cut to the final set
    assert res.cache_tokens.tolist() == [[a, f, f, f] for a, f in zip(inputs.mask.sum(1).tolist(), final.tolist())]
    _, uncut = _runner_result(lvlm, _TwoStagesAndCut(cut=()))
    assert uncut.cache_tokens.tolist() == uncut.prefill_tokens.tolist()


@pytest.mark.parametrize("positions", ["cache_length", "continue"])
def test_decode_positions_per_layer_by_hand(positions):
    """The rotary position each layer gives the generated tokens, read from the layers' inputs."""
    lvlm = _llava()
    runner = lvlm.runner
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def grab(i, module, args, kwargs):
        cos = kwargs["position_embeddings"][0]
        if cos.shape[1] == 1:  # decode steps only
            seen[i].append(cos[:, 0])

    hooks = [layer.register_forward_pre_hook(functools.partial(grab, i), with_kwargs=True)
             for i, layer in enumerate(runner.layers)]
    try:
        inputs, res = _runner_result(lvlm, _TwoStagesAndCut(positions=positions), steps=3)
    finally:
        for h in hooks:
            h.remove()
    full = inputs.mask.sum(1)  # real prompt tokens; positions 0..full-1 (keep policy, no gaps before the stages)
    final = res.cache_tokens[:, 3]
    if positions == "cache_length":  # each layer's cache length when the token arrives
        first = [full, final, final, final]
    else:  # one past the layer group's last position: the text is last and kept, so the full length
        first = [full, full, full, full]
    for i in range(4):
        for step, cos in enumerate(seen[i]):
            pos = (first[i] + step)[:, None]
            expected = runner.model.rotary_emb(cos[:, None], pos)[0][:, 0]
            torch.testing.assert_close(cos, expected, rtol=0, atol=1e-6)
        assert len(seen[i]) == 2


def test_cut_batch_equals_alone():
    lvlm = _llava()
    p = _TwoStagesAndCut()
    both, step_logits = _run(lvlm, p)
    for i in range(2):
        logits = []
        hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
        try:
            alone = lvlm.generate(_images(2)[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=STEPS,
                                  ignore_eos=True)
        finally:
            hook.remove()
        assert torch.equal(alone.token_ids[0], both.token_ids[i])
        torch.testing.assert_close(torch.stack(logits, 1)[0], step_logits[i], rtol=0, atol=1e-4)


def test_score_with_a_plan_equals_generated_logits():
    """The runner's teacher forcing (one forward over the continuation, and step by step for selections)
    against the cached decoder's per-step logits, on the decoder directly (no tokenizer round trip)."""
    lvlm = _llava()
    for p in (_TwoStagesAndCut(), _PickPerStep()):
        enc = lvlm.encode(_images(2), PROMPTS, lvlm.vision_needs(p))
        inputs = lvlm._assemble(enc.batch, enc.views, None, "keep", ["0", "1"])[0]
        logits = []
        hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
        try:
            res = lvlm.runner.generate(inputs, STEPS, pruner=p, ignore_eos=True)
        finally:
            hook.remove()
        step_logits = torch.stack(logits, 1)
        targets = res.tokens
        scored = lvlm.runner.score(inputs, targets, torch.ones_like(targets, dtype=torch.bool), pruner=p)
        expected = step_logits.log_softmax(-1).gather(2, targets[..., None])[..., 0]
        torch.testing.assert_close(scored.logprobs, expected, rtol=0, atol=1e-4)


def test_per_step_selection_cached_equals_the_reference():
    lvlm = _llava()
    p = _PickPerStep()
    cached, step_logits = _run(lvlm, p)
    n_cached = len(p.states)
    uncached, ref_logits = _run(lvlm, p, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(step_logits, ref_logits, rtol=0, atol=1e-4)
    # the reference selected on its own attention, step for step what the cache saw
    cached_states, ref_states = p.states[:n_cached], p.states[n_cached:]
    assert [s.step for s in cached_states] == [s.step for s in ref_states] == list(range(STEPS - 1))
    for a, b in zip(cached_states, ref_states):
        assert torch.equal(a.visual, b.visual) and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-5)
    n_visual = 64
    assert all(int(s.visual[0].sum()) == n_visual and s.attention.shape == s.mask.shape for s in cached_states)
    # it really restricts attention: the unpruned model's even-step logits differ
    _, plain = _run(lvlm, None)
    torch.testing.assert_close(plain[:, 0], step_logits[:, 0], rtol=0, atol=1e-5)
    assert (plain[:, 1] - step_logits[:, 1]).abs().max() > 1e-3


def test_plans_that_do_not_fit_are_one_line_errors():
    lvlm = _llava()
    bad = [
        (_TwoStagesAndCut(cut=(7,)), "this decoder has 4 layers"),
        (_PickPerStep(layer=4), "use a layer in 1..3"),
        (_PickPerStep(layer=0), "use a layer in 1..3"),
    ]

    class _SelectAfterStage(_TwoStagesAndCut):
        def decode_plan(self, n_layers):
            return DecodePlan(select_layer=2)

    bad.append((_SelectAfterStage(), "must share one cached layout"))
    for pruner, message in bad:
        with pytest.raises(OptionError, match=message) as err:
            lvlm.generate(_images(1), PROMPTS[:1], pruner=pruner, max_new_tokens=2)
        assert "\n" not in str(err.value)


def test_decode_plugin_example_in_docs_runs():
    """docs/pruners.md's decoding-stage example (once the section is in): cached == the reference."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "pruners.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'register_pruner("decode_focus")' in b]
    if not blocks:
        pytest.skip("docs/pruners.md has no decoding-stage section yet")
    exec(blocks[0], {})
    lvlm = _llava()
    p = tp.create_pruner("decode_focus", ratio=0.3, layer=3)
    cached, a = _run(lvlm, p)
    uncached, b = _run(lvlm, p, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
