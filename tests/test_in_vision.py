"""The in-vision stage: a tower run block by block, cut between blocks, and what reaches the LLM.

A test-local pruner (``_Every2nd``) keeps the prefix and every second patch token after block 0 and
then merges neighbouring pairs between block 1's attention and MLP, so both hook points, selection,
merging and positions are exercised independently of any paper's method.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune import cost
from tokenprune.adapters.vision_blocks import apply_reduction, run_tower
from tokenprune.errors import OptionError
from tokenprune.in_vision import VisionHook, VisionReduction
from tokenprune.pruner import Stage, TokenPruner
from tokenprune.zoo.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Every2nd(TokenPruner):
    """Block 0 (after the block): keep the prefix and patch tokens 0, 2, 4, ...; block 1 (between
    attention and MLP): merge patch tokens pairwise (0+1, 2+3, ...), size-weighted. ``ratio=1.0``: no cut."""

    stage = Stage.IN_VISION
    position_policy = "compact"

    def __init__(self, ratio: float = 0.5):
        self.ratio = ratio

    def vision_hooks(self, n_blocks):
        return tuple(h for h in (VisionHook(0, "block"), VisionHook(1, "attention", keys=True)) if h.block < n_blocks)

    def select(self, state):
        if self.ratio == 1.0:
            return None
        b, t, p = state.hidden.shape[0], state.num_tokens, state.prefix
        patches = torch.arange(p, t)
        if state.block == 0:
            keep = torch.cat([torch.arange(p), patches[::2]])
            return VisionReduction.keep(keep.expand(b, -1), t)
        assert state.keys is not None and state.keys.shape[:2] == (b, t)
        slots = torch.cat([torch.arange(p), p + (patches - p) // 2])
        return VisionReduction(slots=slots.expand(b, -1).clone(), length=p + (t - p + 1) // 2)


def _images(n, size=64):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8)) for i in range(n)]


PROMPTS = ["What is it?", "Which colour?"]


def _llava(kind: str):
    """tiny LLaVA with a CLIP, SigLIP (no CLS, strategy 'full') or DINOv2 tower."""
    if kind == "clip":
        return tp.wrap(*tiny_llava())
    if kind == "siglip":
        model, proc = tiny_llava(vision=dict(model_type="siglip_vision_model"))
        model.config.vision_feature_select_strategy = "full"
        proc.vision_feature_select_strategy, proc.num_additional_image_tokens = "full", 0
        return tp.wrap(model, proc)
    model, proc = tiny_llava(vision=dict(model_type="dinov2", mlp_ratio=2))
    return tp.wrap(model, proc)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_uncut_tower_is_hugging_face_bit_for_bit(kind):
    lvlm = _llava(kind)
    tower = lvlm.model.model.vision_tower
    px = torch.randn(2, 3, 64, 64)
    prefix = 0 if kind == "siglip" else 1
    with torch.no_grad():
        ref = tower(px, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 1):
            run = run_tower(tower, px, _Every2nd(1.0), layer, prefix)
            assert torch.equal(run.features, ref[layer])
            assert len(run.blocks) == layer % (len(ref))


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_no_cut_gives_the_unpruned_logits(kind):
    lvlm = _llava(kind)
    images = _images(2)
    ref = lvlm.generate(images, PROMPTS, max_new_tokens=3)
    out = lvlm.generate(images, PROMPTS, pruner=_Every2nd(1.0), max_new_tokens=3)
    assert torch.equal(out.first_logits, ref.first_logits)
    assert torch.equal(out.token_ids, ref.token_ids)


def test_blocks_and_layers_receive_the_schedule():
    """Tokens each vision block and each decoder layer receive, counted by forward pre-hooks."""
    lvlm = _llava("clip")
    tower = lvlm.model.model.vision_tower
    seen: list[tuple[str, int]] = []
    hooks = []
    for i, layer in enumerate(tower.encoder.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.append((f"attn{i}", k["hidden_states"].shape[1])), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.append((f"mlp{i}", a[0].shape[1]))))
    decoder = lvlm.decoder()[0].layers
    llm: list[int] = []
    hooks += [layer.register_forward_pre_hook(lambda m, a, k: llm.append(k["hidden_states"].shape[1] if "hidden_states" in k else a[0].shape[1]),
                                              with_kwargs=True) for layer in decoder]
    try:
        out = lvlm.generate(_images(1), PROMPTS[:1], pruner=_Every2nd(), max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    # 64 patches + CLS; block 0 whole, then 1 + 32; block 1's attention on 33, its MLP on 1 + 16;
    # block 2 is never run (LLaVA reads hidden_states[-2], block 1's output)
    assert seen == [("attn0", 65), ("mlp0", 65), ("attn1", 33), ("mlp1", 17)]
    st = out.stats[0]
    assert st.vision_blocks == [((65, 65), (33, 17))]
    assert st.visual_tokens_in == 64 and st.visual_tokens_kept == 16 and st.visual_tokens_projected == 16
    assert llm[: len(decoder)] == [st.text_tokens + 16] * len(decoder)


def test_cached_matches_uncached_and_batch_matches_alone():
    lvlm = _llava("clip")
    images = _images(2)
    cached = lvlm.generate(images, PROMPTS, pruner=_Every2nd(), max_new_tokens=4, ignore_eos=True)
    uncached = lvlm.generate(images, PROMPTS, pruner=_Every2nd(), max_new_tokens=4, ignore_eos=True, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    for i in range(2):
        alone = lvlm.generate(images[i:i + 1], PROMPTS[i:i + 1], pruner=_Every2nd(), max_new_tokens=4, ignore_eos=True)
        assert torch.equal(alone.token_ids[0], cached.token_ids[i])
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=1e-5, atol=1e-5)


def test_merged_tokens_and_their_positions():
    """The LLM receives the size-weighted merges the tower made, at the positions the policy says."""
    lvlm = _llava("clip")
    enc = lvlm.encode(_images(1), PROMPTS[:1], lvlm.vision_needs(_Every2nd()))
    (view,) = enc.views
    assert view.tokens.shape[0] == 16 and view.seq_index.shape[0] == 64
    # token j covers patches 4j and 4j+2 (kept at block 0 as 2j and 2j+1, merged pairwise at block 1)
    assert view.vision_origin.tolist() == [4 * j for j in range(16)]
    expected_members = [p // 4 if p % 2 == 0 else -1 for p in range(64)]
    assert view.vision_members.tolist() == expected_members
    placed = lvlm._as_placed(view)
    assert torch.equal(placed[0], view.seq_index[:16]) and torch.equal(placed[2], view.seq_index[::4])


def test_apply_reduction_by_hand():
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    sizes = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    origin = torch.tensor([[-1, 0, 1, 2]])
    members = torch.tensor([[1, 2, 3]])
    red = VisionReduction(slots=torch.tensor([[0, 1, 1, -1]]), length=2)
    h, s, o, m = apply_reduction(red, hidden, sizes, origin, members)
    assert h.tolist() == [[[1.0], [(2.0 + 3 * 4.0) / 4]]]
    assert s.tolist() == [[1.0, 4.0]] and o.tolist() == [[-1, 0]] and m.tolist() == [[1, 1, -1]]
    h, s, *_ = apply_reduction(VisionReduction(red.slots, 2, weights=torch.ones(1, 4), reset_sizes=True),
                               hidden, sizes, origin, members)
    assert h.tolist() == [[[1.0], [3.0]]] and s.tolist() == [[1.0, 1.0]]


def test_vision_flops_count_each_block_as_run():
    spec = cost.VisionSpec(width=4, mlp=8, gated=False, layers=3, patch_in=2, projector=((4, 6),))
    w, m = 4, 8
    blocks = [((5, 5), (5, 3))]
    by_hand = 2.0 * (sum(4 * a * w * w + 2 * a * a * w + mm * w * m * 2 for a, mm in blocks[0]) + 4 * 2 * w + 3 * 4 * 6)
    assert cost.vision_flops(spec, [5], patches=4, visual_tokens=3, blocks=blocks) == by_hand
    whole = cost.vision_flops(spec, [5], patches=4, visual_tokens=4)
    assert whole == 2.0 * (3 * (4 * 5 * w * w + 5 * w * m * 2) + 3 * 2 * 25 * w + 4 * 2 * w + 4 * 4 * 6)


def test_fewer_vision_flops_than_unpruned():
    lvlm = _llava("clip")
    spec = lvlm.vision_spec()
    ref = lvlm.generate(_images(1), PROMPTS[:1], max_new_tokens=1)
    out = lvlm.generate(_images(1), PROMPTS[:1], pruner=_Every2nd(), max_new_tokens=1)
    full = cost.sample_cost(lvlm.model.config, spec, ref.stats[0]).vision
    cut = cost.sample_cost(lvlm.model.config, spec, out.stats[0]).vision
    assert cut < full


@pytest.mark.parametrize("zoo", ["tiny-qwen2-vl", "tiny-internvl"])
def test_other_families_refuse_in_one_line(zoo):
    lvlm = tp.load(zoo)
    with pytest.raises(OptionError, match="inside its vision tower") as err:
        lvlm.generate(_images(1), PROMPTS[:1], pruner=_Every2nd(), max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_llava_next_refuses_merges_inside_the_tower_in_one_line():
    """LLaVA-NeXT scatters each crop's survivors back to the stitched grid: a merged token has no cell there."""
    lvlm = tp.load("tiny-llava-next")
    with pytest.raises(OptionError, match="merges tokens inside the vision tower") as err:
        lvlm.generate(_images(1), PROMPTS[:1], pruner=_Every2nd(), max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_kept_maps_of_in_vision_cuts_for_sweeps_and_pictures():
    """What sweeps store and pictures draw: per patch, kept (the patch a token takes its position from)
    or merged into a kept token, from the views the tower's cut left."""
    from tokenprune.visualize.record import record_kept, view_sizes

    lvlm = _llava("clip")
    pruner = _Every2nd()
    enc = lvlm.encode(_images(1), PROMPTS[:1], lvlm.vision_needs(pruner))
    with record_kept(pruner) as rec:
        lvlm.generate(_images(1), PROMPTS[:1], pruner=pruner, encoded=enc, sample_ids=["s"], max_new_tokens=1)
    kept = rec.kept("s", view_sizes(enc.views, 0))
    assert kept.views == [64]
    assert np.nonzero(kept.stages[0])[0].tolist() == list(range(0, 64, 4))  # token j's origin: patch 4j
    assert np.nonzero(kept.merged)[0].tolist() == list(range(2, 64, 4))  # merged into it at block 1


# -- the in-vision methods end to end on the llava family ---------------------------------------

def _llava5(kind: str):
    """tiny LLaVA with a 5-block tower of ``kind`` (4 blocks run: LLaVA reads hidden_states[-2])."""
    vision = dict(num_hidden_layers=5)
    if kind == "clip":
        return tp.wrap(*tiny_llava(vision=vision))
    if kind == "dinov2":
        return tp.wrap(*tiny_llava(vision=dict(vision, model_type="dinov2", mlp_ratio=2)))
    model, proc = tiny_llava(vision=dict(vision, model_type="siglip_vision_model"))
    model.config.vision_feature_select_strategy = "full"
    proc.vision_feature_select_strategy, proc.num_additional_image_tokens = "full", 0
    return tp.wrap(model, proc)


def _block_counts(lvlm, run):
    """Tokens each vision block's attention and MLP received during ``run()``, by forward pre-hooks."""
    tower = lvlm.model.model.vision_tower
    layers = tower.encoder.layer if hasattr(tower.encoder, "layer") else tower.encoder.layers
    seen, hooks = [], []
    for i, layer in enumerate(layers):
        attn = layer.attention if hasattr(layer, "attention") else layer.self_attn
        hooks.append(attn.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.append((i, "attn", (a[0] if a else k["hidden_states"]).shape[1])), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, "mlp", a[0].shape[1]))))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, seen


METHOD_TOWERS = [("tome", "clip"), ("tome", "siglip"), ("tome", "dinov2"), ("flowcut", "clip"), ("flowcut", "dinov2")]


@pytest.mark.parametrize("name,kind", METHOD_TOWERS)
def test_in_vision_methods_no_op_equals_unpruned(name, kind):
    lvlm = _llava5(kind)
    ref = lvlm.generate(_images(2), PROMPTS, max_new_tokens=2)
    out = lvlm.generate(_images(2), PROMPTS, pruner=tp.create_pruner(name, ratio=1.0), max_new_tokens=2)
    assert torch.equal(out.first_logits, ref.first_logits) and torch.equal(out.token_ids, ref.token_ids)


@pytest.mark.parametrize("name,kind", METHOD_TOWERS)
def test_in_vision_methods_blocks_layers_cache_and_batch(name, kind):
    """Blocks and decoder layers receive the schedule (forward pre-hooks); cached == uncached; batch == alone."""
    lvlm = _llava5(kind)
    pruner = tp.create_pruner(name, ratio=0.25)
    prefix = 0 if kind == "siglip" else 1
    out, seen = _block_counts(lvlm, lambda: lvlm.generate(_images(1), PROMPTS[:1], pruner=pruner, max_new_tokens=1))
    target = 16  # keep_count(0.25, 64)
    if name == "tome":  # the solved per-block r, each block's MLP after its merge
        n, expected = 64, []
        for i, r in enumerate(pruner.schedule(64, 4)):
            expected += [(i, "attn", prefix + n), (i, "mlp", prefix + n - min(r, n // 2))]
            n -= min(r, n // 2)
    else:  # FlowCut on 4 blocks: rpl = 2 - block, cuts after blocks 0 (rpl 2) and 2 (rpl 0, to the target)
        cut = [c for (i, w, c) in seen if (i, w) == (1, "attn")][0]
        assert target + 1 <= cut <= 65  # block 0 cuts by the entropy rule: nothing when the CLS attention is flat
        expected = [(0, "attn", 65), (0, "mlp", 65), (1, "attn", cut), (1, "mlp", cut), (2, "attn", cut),
                    (2, "mlp", cut), (3, "attn", target + 1), (3, "mlp", target + 1)]
    assert seen == expected
    assert [c for _, w, c in seen if w == "attn"][-1] - prefix >= target
    st = out.stats[0]
    assert st.visual_tokens_kept == target and st.visual_per_layer == [target] * len(st.visual_per_layer)
    assert st.vision_blocks == [tuple((a, m) for (_, _, a), (_, _, m) in zip(seen[::2], seen[1::2]))]
    images = _images(2)
    cached = lvlm.generate(images, PROMPTS, pruner=pruner, max_new_tokens=3, ignore_eos=True)
    uncached = lvlm.generate(images, PROMPTS, pruner=pruner, max_new_tokens=3, ignore_eos=True, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    for i in range(2):
        alone = lvlm.generate(images[i:i + 1], PROMPTS[i:i + 1], pruner=pruner, max_new_tokens=3, ignore_eos=True)
        assert torch.equal(alone.token_ids[0], cached.token_ids[i])
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=1e-4, atol=1e-5)


def test_flowcut_refuses_a_cls_less_tower_in_one_line():
    lvlm = _llava5("siglip")
    with pytest.raises(OptionError) as err:
        lvlm.generate(_images(1), PROMPTS[:1], pruner=tp.create_pruner("flowcut", ratio=0.25), max_new_tokens=1)
    assert "CLS" in str(err.value) and "\n" not in str(err.value)
