"""The generated ``shapes_scene`` task: seeded, balanced, answers true to the drawn image."""
from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from tokenprune.benchmarks.tasks import get_task
from tokenprune.benchmarks.tasks.shapes_scene import (
    COLOURS,
    IMAGE_SIZE,
    KINDS,
    PLACES,
    SHAPES,
    Scene,
    SceneObject,
    answer_prior,
    blind_answer,
    kind_of,
    patch_objects,
    render,
    scene_questions,
)


@pytest.fixture(scope="module")
def test_rows():
    return get_task("shapes_scene").load().rows


def test_test_set_is_fixed_and_large(test_rows):
    assert len(test_rows) >= 2000
    again = get_task("shapes_scene").load().rows
    assert again["question"] == test_rows["question"] and again["answer"] == test_rows["answer"]
    assert again["scene"][:50] == test_rows["scene"][:50]
    assert len(set(test_rows["scene"])) == len(test_rows) // len(KINDS)


def test_answers_balanced_within_each_kind(test_rows):
    by_kind: dict[str, Counter] = {}
    for k, a in zip(test_rows["kind"], test_rows["answer"]):
        by_kind.setdefault(k, Counter())[a] += 1
    for k in ("presence", "relation"):
        share = by_kind[k]["yes"] / sum(by_kind[k].values())
        assert 0.4 <= share <= 0.6, (k, share)
    counts = by_kind["count"]
    assert all(counts[str(n)] >= 0.05 * sum(counts.values()) for n in range(4)), counts
    assert max(counts.values()) <= 0.45 * sum(counts.values())
    assert set(by_kind["place"]) == set(COLOURS) | set(SHAPES)


def _rgb_at(image, x: float, y: float) -> tuple[int, int, int]:
    return image.getpixel((int(x), int(y)))


def _parse_object(words: str) -> tuple[str, str]:
    colour, shape = words.split()
    return colour, shape


@pytest.mark.parametrize("index", range(0, 520, 37))
def test_answers_true_to_the_pixels(test_rows, index):
    """Every answer recomputed independently: from the rendered pixels where possible (object colours
    at their centres), and box centres (not cells) for places and relations."""
    scene = Scene.from_json(test_rows["scene"][index * 4])
    image = render(scene)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    for obj in scene.objects:  # what is drawn is what the scene says
        cx, cy = obj.centre
        if obj.shape == "triangle":
            cy = obj.box[1] + 0.7 * (obj.box[3] - obj.box[1])  # inside a triangle, below its centre
        assert _rgb_at(image, cx, cy) == COLOURS[obj.colour]
    for j in range(4):
        q, a, kind = (test_rows[c][index * 4 + j] for c in ("question", "answer", "kind"))
        assert kind_of(q) == kind or (kind == "relation" and kind_of(q) == "presence")
        if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
            assert a == ("yes" if any((o.colour, o.shape) == m.groups() for o in scene.objects) else "no")
        elif m := re.fullmatch(r"how many (\w+)s are there\?", q):
            assert a == str(sum(o.shape == m.group(1) for o in scene.objects))
        elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
            assert a == str(sum(o.colour == m.group(1) for o in scene.objects))
        elif m := re.fullmatch(r"what (?:color is the shape|shape is) in the (.+)\?", q):
            third = IMAGE_SIZE / 3
            row_col = {v: k for k, v in PLACES.items()}[m.group(1)]
            there = [o for o in scene.objects if (int(o.centre[1] // third), int(o.centre[0] // third)) == row_col]
            assert len(there) == 1
            assert a == (there[0].colour if q.startswith("what color") else there[0].shape)
        elif m := re.fullmatch(r"is the (\w+ \w+) (left of|above) the (\w+ \w+)\?", q):
            (first,), (second,) = ([o for o in scene.objects if (o.colour, o.shape) == _parse_object(w)]
                                   for w in (m.group(1), m.group(3)))
            axis = 0 if m.group(2) == "left of" else 1
            assert a == ("yes" if first.centre[axis] < second.centre[axis] else "no")
        else:
            pytest.fail(f"unparsed question {q!r}")


def test_patch_objects_hand_computed():
    """A 28-px square at (14, 28): exactly patches (row 2, cols 1-2) and (row 3, cols 1-2) of 14 px."""
    scene = Scene((240, 240, 240), (SceneObject("red", "rectangle", (0, 0), (14, 28, 42, 56)),))
    owner = patch_objects(scene).reshape(16, 16)
    assert sorted(zip(*np.nonzero(owner == 0))) == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert (owner[owner != 0] == -1).all()


def test_image_blind_rule_is_far_below_reading(test_rows):
    train = [(q, a) for i in range(1500) for _, q, a in scene_questions("train", i)[1]]
    prior = answer_prior(train)
    test = list(zip(test_rows["question"], test_rows["answer"]))
    blind = sum(blind_answer(q, prior) == a for q, a in test) / len(test)
    assert 0.35 <= blind <= 0.5, blind


def test_train_and_test_scenes_differ():
    test = {scene_questions("test", i)[0].to_json() for i in range(200)}
    train = {scene_questions("train", i)[0].to_json() for i in range(200)}
    assert not test & train


def test_score_is_exact_match():
    task = get_task("shapes_scene")
    sample = next(iter(task.load(limit=1)))
    assert task.score(f" {sample.answers[0].upper()}.", sample)["accuracy"] == 1.0
    assert task.score("maybe", sample)["accuracy"] == 0.0
    rng = random.Random(0)
    scores = [{"accuracy": float(rng.random() < 0.5)} for _ in range(8)]
    samples = [type(sample)(str(i), None, "", ["x"], KINDS[i % 4]) for i in range(8)]
    out = task.aggregate(scores, samples)
    assert out["accuracy"] == sum(s["accuracy"] for s in scores) / 8
    assert out["accuracy_count"] == (scores[1]["accuracy"] + scores[5]["accuracy"]) / 2
