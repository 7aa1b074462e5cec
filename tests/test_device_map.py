"""Models dispatched with an accelerate ``device_map``: decoder layers (and more) offloaded to disk.

Through both ways a user gets one: ``tokenprune.load(path, device_map=..., offload_folder=...)``
on a saved checkpoint (transformers' ``from_pretrained``, which hooks every weight-owning submodule
of an offloaded layer) and on a zoo name (built in code, then :func:`tokenprune.adapters.devices.dispatch`,
whose hook on a decoder layer loads the whole layer). Either way the offloaded model must give the
plain model's tokens and first-token logits, with and without pruners -- including PyramidDrop,
which runs a layer's input norm and q/k projections outside the layer's forward. Everything runs
on the CPU: CPU + disk is the offload that can be checked here; several GPUs cannot.
"""
from __future__ import annotations

import functools
import time

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters import wrap
from tokenprune.adapters.devices import execution_device, run_as
from tokenprune.pruner import pruner_from_spec
from tokenprune.zoo import tiny

from test_adapters import PROMPTS, images, lvlm_for  # the plain models are the references

NEW_TOKENS = 6
LM = "model.language_model"
VISION = {"llava": ("model.vision_tower", "model.multi_modal_projector"), "qwen2_vl": ("model.visual",)}
ZOO_NAME = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}
# Tiny decoders have 4 layers: FastV prunes after layer 1 (k=2, its default), PyramidDrop before 1, 2, 3.
SPECS = [None, "fopru_rank:ratio=0.25", "fastv:ratio=0.25", "pdrop:ratio=0.5:layers=1,2,3"]


def offload_map(family: str, n_layers: int = 4, disk_layers=(1, 2)) -> dict[str, str]:
    """Vision tower, two middle decoder layers and the final norm on disk; the rest on the CPU."""
    tower, *rest = VISION[family]
    dm = {tower: "disk", **{m: "cpu" for m in rest}, f"{LM}.embed_tokens": "cpu", f"{LM}.norm": "disk",
          f"{LM}.rotary_emb": "cpu", "lm_head": "cpu"}
    dm.update({f"{LM}.layers.{i}": "disk" if i in disk_layers else "cpu" for i in range(n_layers)})
    return dm


def make(spec: str | None):
    return None if spec is None else pruner_from_spec(spec)


@functools.lru_cache(maxsize=None)
def reference(family: str, spec: str | None):
    return lvlm_for(family).generate(images(), PROMPTS, pruner=make(spec), max_new_tokens=NEW_TOKENS)


def assert_same(lvlm, family: str, spec: str | None) -> None:
    ref = reference(family, spec)
    out = lvlm.generate(images(), PROMPTS, pruner=make(spec), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.token_ids, ref.token_ids)
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-5
    assert [s.visual_per_layer for s in out.stats] == [s.visual_per_layer for s in ref.stats]


def assert_offloaded(lvlm, disk_layers=(1, 2)) -> None:
    """Offloaded weights sit on ``meta`` between calls, so the test fails if nothing was offloaded."""
    layers = lvlm.runner.layers
    for i, layer in enumerate(layers):
        on_meta = layer.self_attn.q_proj.weight.device.type == "meta"
        assert on_meta == (i in disk_layers), i
    assert next(lvlm.model.parameters()).device.type == "meta"  # the vision tower is offloaded too
    assert lvlm.device == torch.device("cpu")  # the input embeddings' execution device, not meta


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{family: folder}`` with each tiny reference model saved by ``save_pretrained``."""
    folders = {}
    for family in VISION:
        folder = tmp_path_factory.mktemp(f"{family}-ckpt")
        lvlm_for(family).model.save_pretrained(folder)
        if family == "llava":  # Qwen's processor cannot be saved without a video processor (torchvision)
            lvlm_for(family).processor.save_pretrained(folder)
        folders[family] = folder
    return folders


@functools.lru_cache(maxsize=None)
def _loaded(path: str, family: str, offload: str):
    return tp.load(path, device_map=offload_map(family), offload_folder=offload)


@pytest.fixture
def from_pretrained(saved, tmp_path_factory, monkeypatch):
    def load(family: str):
        if family != "llava":
            from transformers import AutoProcessor

            monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *a, **k: lvlm_for(family).processor)
        return _loaded(str(saved[family]), family, str(saved[family] / "offload"))

    return load


@pytest.mark.parametrize("family", VISION)
@pytest.mark.parametrize("spec", SPECS)
def test_from_pretrained_offload_matches_plain_model(from_pretrained, family, spec):
    lvlm = from_pretrained(family)
    assert_offloaded(lvlm)
    # transformers' dispatch: a loading hook on each weight-owning submodule of an offloaded layer
    q_proj = lvlm.runner.layers[1].self_attn.q_proj
    assert q_proj._hf_hook.offload and not lvlm.runner.layers[1]._hf_hook.offload
    assert_same(lvlm, family, spec)


@functools.lru_cache(maxsize=None)
def _zoo(family: str, offload: str):
    return tp.load(ZOO_NAME[family], device_map=offload_map(family), offload_folder=offload)


@pytest.mark.parametrize("family", VISION)
@pytest.mark.parametrize("spec", SPECS)
def test_zoo_offload_matches_plain_model(family, spec, tmp_path_factory):
    lvlm = _zoo(family, str(tmp_path_factory.getbasetemp() / f"zoo-offload-{family}"))
    assert_offloaded(lvlm)
    # our dispatch: the decoder layer's hook loads the whole layer, its submodules have no hook
    layer = lvlm.runner.layers[1]
    assert layer._hf_hook.offload and layer._hf_hook.place_submodules
    assert not hasattr(layer.self_attn.q_proj, "_hf_hook")
    assert_same(lvlm, family, spec)


def test_auto_device_map_with_a_small_memory_budget_offloads_and_matches(tmp_path):
    lvlm = tp.load("tiny-qwen2-vl", device_map="auto", max_memory={"cpu": 200_000}, offload_folder=str(tmp_path))
    assert "disk" in lvlm.model.hf_device_map.values()
    assert lvlm.runner.layers[-1].self_attn.q_proj.weight.device.type == "meta"
    for spec in (None, "pdrop:ratio=0.5:layers=1,2,3"):
        assert_same(lvlm, "qwen2_vl", spec)


def test_tied_lm_head_stays_tied_and_right(monkeypatch, tmp_path):
    build = tiny.tiny_llava

    def tied_llava():
        model, processor = build(text=dict(tie_word_embeddings=True))
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        return model, processor

    plain = wrap(*tied_llava())
    ref = plain.generate(images(), PROMPTS, max_new_tokens=NEW_TOKENS)
    monkeypatch.setattr(tiny, "tiny_llava", tied_llava)
    dm = offload_map("llava")
    dm["lm_head"] = "disk"  # tied to the embeddings on the CPU: accelerate keeps the two one weight
    lvlm = tp.load("tiny-llava", device_map=dm, offload_folder=str(tmp_path))
    head, emb = lvlm.model.lm_head.weight, lvlm.model.model.language_model.embed_tokens.weight
    assert head is emb and emb.device.type == "cpu"
    out = lvlm.generate(images(), PROMPTS, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.token_ids, ref.token_ids)
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device_map, kwargs, match", [
    ("everywhere", {}, "bad device_map: 'everywhere'"),
    ({f"{LM}.layerz": "cpu", "": "cpu"}, {}, "no module or weight named 'model.language_model.layerz'"),
    ({"model.vision_tower": "cpu"}, {}, "does not give any device"),
    ({"": "disk"}, {}, "give offload_folder"),
    ({"": "gpu7"}, {}, "'' is mapped to 'gpu7'"),
    ({"": "cpu"}, {}, None),
])
def test_device_map_errors_are_one_line(device_map, kwargs, match):
    if match is None:
        assert tp.load("tiny-llava", device_map=device_map).device == torch.device("cpu")
        return
    with pytest.raises(tp.TokenpruneError, match=match) as err:
        tp.load("tiny-llava", device_map=device_map, **kwargs)
    assert "\n" not in str(err.value)


def test_run_as_is_a_plain_call_without_hooks_and_loads_offloaded_weights_with_them(tmp_path):
    from accelerate import cpu_offload

    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = linear(x)
    assert torch.equal(run_as(linear, lambda t: linear(t), x), expected)
    cpu_offload(linear, execution_device="cpu")
    assert linear.weight.device.type == "meta" and execution_device(linear) == torch.device("cpu")
    # outside the forward the weights are meta; under the hook's protocol they are there
    got = run_as(linear, lambda t: torch.nn.functional.linear(t, linear.weight, linear.bias), x)
    assert torch.allclose(got, expected) and linear.weight.device.type == "meta"


def test_demo_with_layers_on_disk(monkeypatch, tmp_path):
    """The trained demo (30 layers, LM head tied to the embeddings) with two layers on disk."""
    from tokenprune.zoo import demo

    t0 = time.perf_counter()
    model, processor = demo.build_demo()
    plain = wrap(model, processor)
    specs = [None, "fopru_rank:ratio=0.25", "fastv:ratio=0.25"]
    imgs, prompts = images(1), PROMPTS[:1]
    refs = [plain.generate(imgs, prompts, pruner=make(s), max_new_tokens=3) for s in specs]
    n = len(plain.runner.layers)
    dm = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{LM}.embed_tokens": "cpu",
          f"{LM}.norm": "cpu", f"{LM}.rotary_emb": "cpu", "lm_head": "cpu",
          **{f"{LM}.layers.{i}": "disk" if i in (1, n - 1) else "cpu" for i in range(n)}}
    monkeypatch.setattr(demo, "build_demo", lambda: (model, processor))  # the zoo path, without a second build
    lvlm = tp.load("tokenprune-demo", device_map=dm, offload_folder=str(tmp_path))
    assert lvlm.runner.layers[n - 1].mlp.down_proj.weight.device.type == "meta"
    assert lvlm.model.lm_head.weight is lvlm.model.model.language_model.embed_tokens.weight
    for spec, ref in zip(specs, refs):
        out = lvlm.generate(imgs, prompts, pruner=make(spec), max_new_tokens=3)
        assert torch.equal(out.token_ids, ref.token_ids), spec
        assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-5, spec
    print(f"demo test: {time.perf_counter() - t0:.1f} s")
