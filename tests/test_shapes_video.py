"""The generated ``shapes_video`` task: seeded, balanced, answers true to the scene and to the pixels.

Answers are recomputed here from each sample's scene JSON by an independent reading of it (plain dicts,
positions stepped frame by frame with reflections, no code of the task module), and the rendered
frames are checked against the scene at the objects' centres.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from tokenprune.benchmarks.tasks import get_task
from tokenprune.benchmarks.tasks.shapes_video import (
    ACTOR_COLOURS,
    KINDS,
    SHAPES,
    TEST_QUESTIONS,
    VideoScene,
    answer_prior,
    blind_answer,
    kind_of,
    make_question,
    render,
)
from tokenprune.errors import OptionError


@pytest.fixture(scope="module")
def test_rows():
    return get_task("shapes_video").load().rows


# -- an independent reading of a scene ----------------------------------------------------------------
def positions(actor: dict, frames: int) -> list[tuple[float, float]]:
    """Centres frame by frame, stepping the velocity and reflecting x at the bounce range."""
    (x, y), (vx, vy) = actor["start"], actor["velocity"]
    out = []
    for _ in range(frames):
        out.append((x, y))
        x, y = x + vx, y + vy
        if actor["bounce"] is not None:
            lo, hi = actor["bounce"]
            if x > hi:
                x, vx = 2 * hi - x, -vx
            elif x < lo:
                x, vx = 2 * lo - x, -vx
    return out


def shown(actor: dict, frames: int) -> list[bool]:
    return [any(a <= t < b for a, b in actor["visible"]) for t in range(frames)]


def colour_at(actor: dict, t: int) -> str:
    change = actor["change"]
    return change[1] if change is not None and t >= change[0] else actor["colour"]


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal ``[start, end)`` runs of True."""
    out, start = [], None
    for t, f in enumerate(flags + [False]):
        if f and start is None:
            start = t
        elif not f and start is not None:
            out.append((start, t))
            start = None
    return out


def the(actors: list[dict], frames: int, colour: str | None = None, shape: str | None = None) -> dict:
    """The one actor showing ``colour`` (at any frame it is shown) and of ``shape``; fails unless unique."""
    found = [a for a in actors if (shape is None or a["shape"] == shape)
             and (colour is None or any(colour_at(a, t) == colour for t, s in enumerate(shown(a, frames)) if s))]
    assert len(found) == 1, (colour, shape, len(found))
    return found[0]


def answer_of(question: str, scene: dict) -> str:
    """The answer, from the question text and the scene JSON alone."""
    T, actors = scene["frames"], scene["actors"]
    if m := re.fullmatch(r"which (\w+) appears first, the (\w+) one or the (\w+) one\?", question):
        shape, c1, c2 = m.groups()
        assert [a["shape"] for a in actors].count(shape) == 2
        first = {c: shown(the(actors, T, c, shape), T).index(True) for c in (c1, c2)}
        assert first[c1] // 2 != first[c2] // 2  # first shown in different two-frame slots
        return min(first, key=first.get)
    if m := re.fullmatch(r"how many times does the (\w+) (\w+) flash\?", question):
        a = the(actors, T, *m.groups())
        flashes = runs(shown(a, T))
        for (s, e), nxt in zip(flashes, flashes[1:] + [None]):
            assert e - s <= 2 and s // 2 == (e - 1) // 2  # one or two frames, inside one slot
            if nxt is not None:
                assert nxt[0] // 2 - s // 2 >= 2  # an empty slot between two flashes
        return str(len(flashes))
    if m := re.fullmatch(r"which way does the (\w+) (\w+) move\?", question):
        a = the(actors, T, *m.groups())
        assert all(shown(a, T))
        (x0, y0), (x1, y1) = positions(a, T)[0], positions(a, T)[-1]
        dx, dy = x1 - x0, y1 - y0
        assert min(abs(dx), abs(dy)) < 1e-9 and max(abs(dx), abs(dy)) >= 0.25
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if m := re.fullmatch(r"how many times does the (\w+) (\w+) cross the line\?", question):
        a = the(actors, T, *m.groups())
        line = scene["line"]
        xs = [x for x, _ in positions(a, T)]
        margin = 0.3 * a["size"]
        assert abs(xs[0] - line) > margin and abs(xs[-1] - line) > margin  # clearly on one side at both ends
        lo, hi = a["bounce"]
        step = abs(a["velocity"][0])
        if lo < line < hi:
            assert line - lo > step + margin and hi - line > step + margin  # no crossing hidden inside a step
        sides = [x > line for x in xs]
        return str(sum(p != q for p, q in zip(sides, sides[1:])))
    if m := re.fullmatch(r"what color is the (\w+) at the end\?", question):
        a = the(actors, T, shape=m.group(1))
        assert a["change"] is not None and a["change"][0] > T // 2  # a single middle frame shows the old colour
        return colour_at(a, T - 1)
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        a = the(actors, T, shape=m.group(1))
        assert all(shown(a, T)) and a["change"] is None and a["velocity"] == [0.0, 0.0]
        return a["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        a = the(actors, T, colour=m.group(1))
        assert all(shown(a, T)) and a["change"] is None and a["velocity"] == [0.0, 0.0]
        return a["shape"]
    raise AssertionError(f"unparsed question {question!r}")


# -- tests ----------------------------------------------------------------------------------------------
def test_test_set_is_fixed_and_the_same_at_every_frame_size(test_rows):
    assert len(test_rows) == TEST_QUESTIONS
    again = get_task("shapes_video", size=40).load().rows
    assert again["question"] == test_rows["question"] and again["answer"] == test_rows["answer"]
    assert again["scene"] == test_rows["scene"]
    assert Counter(test_rows["kind"]) == {k: TEST_QUESTIONS // len(KINDS) for k in KINDS}
    assert test_rows["kind"][:6] == list(KINDS)  # kinds in turn: any prefix is balanced over kinds


def test_every_answer_recomputed_from_the_scene(test_rows):
    for q, a, kind, scene, targets in zip(*(test_rows[c] for c in ("question", "answer", "kind", "scene", "targets"))):
        d = json.loads(scene)
        assert answer_of(q, d) == a, q
        assert kind_of(q) == kind
        assert all(d["actors"][t]["role"] == "target" for t in targets)


def test_answers_balanced_within_each_kind(test_rows):
    by_kind: dict[str, Counter] = {}
    for k, a in zip(test_rows["kind"], test_rows["answer"]):
        by_kind.setdefault(k, Counter())[a] += 1
    assert set(by_kind["count_flashes"]) == {"1", "2", "3"} and max(by_kind["count_flashes"].values()) <= 34
    assert by_kind["direction"] == {d: 25 for d in ("left", "right", "up", "down")}
    assert by_kind["crossings"] == {str(n): 25 for n in range(4)}
    assert by_kind["final_state"] == {c: 20 for c in ACTOR_COLOURS}
    assert set(by_kind["static_control"]) == set(ACTOR_COLOURS) | set(SHAPES)
    assert max(by_kind["order"].values()) <= 0.3 * 100
    # order: the first-named colour is the answer half the time
    named_first = [re.search(r"the (\w+) one or", q).group(1) == a
                   for q, a, k in zip(test_rows["question"], test_rows["answer"], test_rows["kind"]) if k == "order"]
    assert sum(named_first) == 50


@pytest.mark.parametrize("index", range(0, TEST_QUESTIONS, 23))
def test_frames_true_to_the_scene(test_rows, index):
    """The target objects have their colour at their centre pixel in every frame they are shown (they are
    drawn last); where a static target is not shown, its colour is not there (unless another object of
    that colour is); the frames are the size asked for."""
    d = json.loads(test_rows["scene"][index])
    T = d["frames"]
    for size in (224, 64):
        frames = render(VideoScene.from_json(test_rows["scene"][index]), size)
        assert frames.shape == (T, size, size, 3) and frames.dtype == np.uint8
        for t_id in test_rows["targets"][index]:
            a = d["actors"][t_id]
            same_colour = [b for i, b in enumerate(d["actors"]) if i != t_id and b["colour"] == a["colour"]]
            for t, ((x, y), on) in enumerate(zip(positions(a, T), shown(a, T))):
                cx, cy = int(x * size), int(y * size)
                if a["shape"] == "triangle":
                    cy = int((y + 0.2 * a["size"]) * size)  # inside a triangle, below its box centre
                pixel = tuple(int(v) for v in frames[t, cy, cx])
                if on:
                    assert pixel == ACTOR_COLOURS[colour_at(a, t)], (index, t)
                elif a["velocity"] == [0.0, 0.0] and not same_colour:
                    assert pixel != ACTOR_COLOURS[a["colour"]], (index, t)


def test_samples_are_videos_at_the_model_frame_size():
    task = get_task("shapes_video", size=40, frames=12, fps=2)
    sample = next(iter(task.load(limit=1)))
    video = sample.image
    assert video.frames.shape == (12, 40, 40, 3) and video.fps == 2.0
    assert sample.extra["size"] == 40 and sample.extra["frame_indices"] == list(range(12))
    assert task.prompt(sample).startswith(sample.question) and task.prompt(sample).endswith("single word or phrase.")
    images = next(iter(get_task("shapes_video", as_images=True).load(limit=1))).image
    assert len(images) == 16 and images[0].size == (224, 224)


def test_options_are_checked():
    for bad in ({"frames": 9}, {"frames": 8}, {"size": 8}, {"fps": 0}):
        with pytest.raises(OptionError):
            get_task("shapes_video", **bad)


def test_other_frame_counts_keep_the_rules():
    for frames in (10, 32):
        for i in range(0, 60):
            scene, q = make_question("test", i, frames)
            assert answer_of(q.question, json.loads(scene.to_json())) == q.answer


def test_image_blind_rule_is_far_below_reading(test_rows):
    train = [(q.question, q.answer) for q in (make_question("train", i)[1] for i in range(1200))]
    prior = answer_prior(train)
    test = list(zip(test_rows["question"], test_rows["answer"]))
    blind = sum(blind_answer(q, prior) == a for q, a in test) / len(test)
    assert blind <= 0.35, blind


def test_train_and_test_questions_differ():
    test = {make_question("test", i)[0].to_json() for i in range(120)}
    train = {make_question("train", i)[0].to_json() for i in range(120)}
    assert not test & train


def test_clutter_defeats_per_frame_saliency_but_not_change():
    """VIDEO.md section 5's model-free prototype on this task: per-frame saliency (a token's pixel
    contrast) at a 15% budget per frame keeps the static clutter and misses the flashes; keeping the
    tokens that change most between frames (the same budget over the clip) sees them."""
    from tokenprune.visualize.evidence import grid_regions, question_evidence

    size, patch = 224, 14
    g = size // patch
    per_frame, temporal = [], []
    for i in [i for i in range(TEST_QUESTIONS) if KINDS[i % 6] == "count_flashes"][:24]:
        scene, q = make_question("test", i)
        frames = render(scene, size).astype(np.float32)
        T = len(frames)
        blocks = frames.reshape(T, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(T, g * g, -1)
        contrast = blocks.std(-1)  # [T, tokens]
        step = np.abs(np.diff(frames, axis=0))
        zero = np.zeros_like(frames[:1])
        change = np.maximum(np.concatenate([zero, step]), np.concatenate([step, zero]))  # to either neighbour
        change = change.reshape(T, g, patch, g, patch, 3).mean((2, 4, 5)).reshape(T, -1)
        k = int(0.15 * g * g)
        keep_frame = np.zeros((T, g * g), bool)
        np.put_along_axis(keep_frame, np.argsort(-contrast, 1, kind="stable")[:, :k], True, 1)
        keep_clip = np.zeros(T * g * g, bool)
        keep_clip[np.argsort(-(change.reshape(-1) + 1e-3 * contrast.reshape(-1)), kind="stable")[:k * T]] = True
        regions = grid_regions([(g, g)] * T, [(t,) for t in range(T)], size)
        ev = question_evidence(scene, q.kind, q.targets, regions, list(range(T)), size)
        per_frame.append(ev.score(keep_frame.reshape(-1).astype(float))["complete"])
        temporal.append(ev.score(keep_clip.astype(float))["complete"])
    assert np.mean(per_frame) <= 0.1 and np.mean(temporal) == 1.0, (np.mean(per_frame), np.mean(temporal))


def test_score_is_exact_match_and_aggregates_per_kind():
    task = get_task("shapes_video")
    sample = next(iter(task.load(limit=1)))
    assert task.score(f" {sample.answers[0].upper()}.", sample)["accuracy"] == 1.0
    assert task.score("maybe", sample)["accuracy"] == 0.0
    assert task.cut("red\nblue") == "red"
    rng = random.Random(0)
    scores = [{"accuracy": float(rng.random() < 0.5)} for _ in range(12)]
    samples = [type(sample)(str(i), None, "", ["x"], KINDS[i % 6]) for i in range(12)]
    out = task.aggregate(scores, samples)
    assert out["accuracy"] == sum(s["accuracy"] for s in scores) / 12
    assert out["accuracy_crossings"] == (scores[3]["accuracy"] + scores[9]["accuracy"]) / 2
