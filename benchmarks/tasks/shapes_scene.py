"""``shapes_scene``: a procedurally generated VQA task whose answers sit in small image details.

easy-VQA draws one large shape per image, so any method that keeps a quarter of the tokens still
sees it: at ratios 0.5 and 0.25 every pruner ties with the unpruned model. Here a 224 x 224 image
holds 3-5 *small* objects (22-38 px: two to nine of the 14-px patches each) in distinct cells of a 3 x 3
layout, and every question needs one or more of them:

========== ========================================================= =====================
kind       template                                                  answers
========== ========================================================= =====================
presence   ``is there a {colour} {shape}?``                          yes / no (near misses)
count      ``how many {shape}s are there?`` / ``{colour} shapes``    0 - 4
place      ``what color is the shape in the {place}?`` / ``shape``   a colour / a shape
relation   ``is the {c} {s} left of / above the {c'} {s'}?``         yes / no
========== ========================================================= =====================

Everything is seeded: scene ``i`` of a split is drawn from ``Random(f"{split}/{i}")``, so the test
set (:data:`TEST_SCENES` scenes, four questions each, >= 2,000 questions) is the same on every
machine and nothing is downloaded. Answers are balanced within each kind (yes/no 50/50, counts
spread over 0-3, colours and shapes uniform), so an image-blind rule that knows the answer prior of
each question type (:func:`blind_answer`) scores far below a model that reads the image. The train
split is generated on the fly by the same code with other seeds (``tokenprune.zoo.train_demo``).

Scoring is exact match of the normalised answer (as easy-VQA and VQAv2's official normalisation).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from .base import SHORT_ANSWER, Sample, Task, register_task

IMAGE_SIZE = 224
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
COLOURS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0),
           "black": (15, 15, 15)}
SHAPES = ("circle", "rectangle", "triangle")
PLACES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
          (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
KINDS = ("presence", "count", "place", "relation")
QUESTIONS_PER_SCENE = len(KINDS)
TEST_SCENES = 520  # x 4 kinds = 2,080 test questions
MIN_SIZE, MAX_SIZE = 22, 38


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its colour and shape names, its cell ``(row, col)``, its bounding box
    ``(x0, y0, x1, y1)`` in pixels."""

    colour: str
    shape: str
    cell: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    """A background colour and the objects on it (see :func:`make_scene`)."""

    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Scene":
        d = json.loads(text)
        return Scene(tuple(d["background"]), tuple(
            SceneObject(o["colour"], o["shape"], tuple(o["cell"]), tuple(o["box"])) for o in d["objects"]))


def make_scene(rng: random.Random) -> Scene:
    """3-5 objects in distinct cells, each of a random colour, shape and size, jittered in its cell."""
    n = rng.randint(3, 5)
    cells = rng.sample(sorted(PLACES), n)
    cell_px = IMAGE_SIZE / GRID
    objects = []
    for r, c in cells:
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        margin = 4
        x0 = int(c * cell_px) + rng.randint(margin, int(cell_px) - size - margin)
        y0 = int(r * cell_px) + rng.randint(margin, int(cell_px) - size - margin)
        objects.append(SceneObject(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), (r, c), (x0, y0, x0 + size, y0 + size)))
    background = tuple(rng.randint(228, 255) for _ in range(3))
    return Scene(background, tuple(objects))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "rectangle":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # an upward triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, COLOURS[obj.colour])
    return image


def object_masks(scene: Scene):
    """``[n_objects, IMAGE_SIZE, IMAGE_SIZE]`` bool numpy array: the pixels each object covers."""
    import numpy as np

    masks = []
    for obj in scene.objects:
        canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_object(ImageDraw.Draw(canvas), obj, 255)
        masks.append(np.asarray(canvas) > 0)
    return np.stack(masks)


def patch_objects(scene: Scene, patch: int = 14, min_cover: float = 0.25):
    """``[grid * grid]`` int numpy array: per patch (raster order), the index of the object covering at
    least ``min_cover`` of it, or -1 (background)."""
    import numpy as np

    masks = object_masks(scene)
    g = IMAGE_SIZE // patch
    cover = masks.reshape(len(masks), g, patch, g, patch).mean(axis=(2, 4)).reshape(len(masks), -1)
    best = cover.argmax(0)
    return np.where(cover.max(0) >= min_cover, best, -1)


def _plural(shape: str) -> str:
    return shape + "s"


def _describe(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One ``(question, answer)`` of ``kind`` about ``scene``; answers balanced within the kind."""
    objs = scene.objects
    if kind == "presence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
            return f"is there a {colour} {shape}?", "yes"
        # A near miss: a colour or a shape that is in the image, in a combination that is not.
        near = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                and any(o.colour == c or o.shape == s for o in objs)]
        colour, shape = rng.choice(near)
        return f"is there a {colour} {shape}?", "no"
    if kind == "count":
        target = rng.choice((0, 1, 2, 3))  # spread the answers; 4 and 5 come when a scene forces them
        options = [(f"how many {_plural(s)} are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
        options += [(f"how many {c} shapes are there?", sum(o.colour == c for o in objs)) for c in COLOURS]
        best = min(abs(n - target) for _, n in options)
        question, n = rng.choice([(q, n) for q, n in options if abs(n - target) == best])
        return question, str(n)
    if kind == "place":
        obj = rng.choice(objs)
        where = PLACES[obj.cell]
        if rng.random() < 0.5:
            return f"what color is the shape in the {where}?", obj.colour
        return f"what shape is in the {where}?", obj.shape
    if kind == "relation":
        unique = [o for o in objs if sum(_describe(p) == _describe(o) for p in objs) == 1]
        pairs = [(a, b) for a in unique for b in unique if a is not b and (a.cell[1] != b.cell[1] or a.cell[0] != b.cell[0])]
        if not pairs:  # every object shares its description with another: ask about presence instead
            return ask(scene, "presence", rng)
        a, b = rng.choice(pairs)
        axes = [ax for ax in ("left", "above") if (a.cell[1] != b.cell[1] if ax == "left" else a.cell[0] != b.cell[0])]
        axis = rng.choice(axes)
        truth = a.cell[1] < b.cell[1] if axis == "left" else a.cell[0] < b.cell[0]
        want = rng.random() < 0.5
        if truth != want:  # swap the pair so the answer is the one drawn: yes/no stay 50/50
            a, b, truth = b, a, not truth
        relation = "left of" if axis == "left" else "above"
        return f"is the {_describe(a)} {relation} the {_describe(b)}?", "yes" if truth else "no"
    raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(KINDS)}")


def scene_questions(split: str, index: int) -> tuple[Scene, list[tuple[str, str, str]]]:
    """Scene ``index`` of ``split`` and its questions ``[(kind, question, answer)]``, one per kind."""
    rng = random.Random(f"shapes_scene/{split}/{index}")
    scene = make_scene(rng)
    return scene, [(kind, *ask(scene, kind, rng)) for kind in KINDS]


def kind_of(question: str) -> str:
    """The question kind of a generated question (for image-blind rules and per-kind reports)."""
    if question.startswith("how many"):
        return "count"
    if question.startswith("what"):
        return "place"
    if " left of " in question or " above " in question:
        return "relation"
    return "presence"


def blind_answer(question: str, prior: dict[str, str]) -> str:
    """An image-blind rule: the most frequent answer of the question's template in ``prior``
    (``{template: answer}``, see :func:`answer_prior`)."""
    return prior.get(template_of(question), "yes")


def template_of(question: str) -> str:
    """The question with its colour / shape / place words replaced by slots."""
    words = []
    for w in question.rstrip("?").split():
        base = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        words.append("<colour>" if w in COLOURS else "<shape>" if base in SHAPES else w)
    text = " ".join(words)
    for place in sorted(PLACES.values(), key=len, reverse=True):
        text = text.replace(f"the {place}", "the <place>")
    return text


def answer_prior(questions: list[tuple[str, str]]) -> dict[str, str]:
    """``{template: most frequent answer}`` over ``(question, answer)`` pairs (a train split)."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for q, a in questions:
        counts.setdefault(template_of(q), Counter())[a] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


class ShortAnswerByKind(Task):
    """A generated task's scoring: a short answer, exact match, accuracy overall and per question kind
    (``Sample.category`` among :attr:`kinds`); shared by ``shapes_scene`` and ``shapes_video``."""

    kinds: tuple[str, ...] = ()

    def prompt(self, sample):
        return sample.question + SHORT_ANSWER

    def score(self, prediction, sample):
        from .metrics import normalize_exact

        return {"accuracy": float(normalize_exact(prediction) == normalize_exact(sample.answers[0]))}

    def aggregate(self, scores, samples):
        out = {"accuracy": sum(s["accuracy"] for s in scores) / max(len(scores), 1)}
        for kind in self.kinds:
            mine = [s["accuracy"] for s, x in zip(scores, samples) if x.category == kind]
            if mine:
                out[f"accuracy_{kind}"] = sum(mine) / len(mine)
        return out


@register_task("shapes_scene")
class ShapesScene(ShortAnswerByKind):
    """Several small shapes per image; presence, counting, place and relation questions (generated,
    seeded, offline). Exact match; per-kind accuracies are reported beside the headline."""

    dataset_path = "generated"
    split = "test"
    headline = "accuracy"
    kinds = KINDS
    max_new_tokens = 4

    def load_rows(self, data_dir=None, config=None, split=None):
        import datasets

        split = split or self.split
        rows: dict[str, list] = {"question": [], "answer": [], "kind": [], "scene": []}
        for i in range(TEST_SCENES):
            scene, questions = scene_questions(split, i)
            for kind, q, a in questions:
                rows["question"].append(q)
                rows["answer"].append(a)
                rows["kind"].append(kind)
                rows["scene"].append(scene.to_json())
        return datasets.Dataset.from_dict(rows)

    def row_image(self, row):
        return render(Scene.from_json(row["scene"]))

    def row_id(self, row, index):
        return f"{self.split}-{index}"

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], category=row["kind"],
                      extra={"scene": row["scene"]})

