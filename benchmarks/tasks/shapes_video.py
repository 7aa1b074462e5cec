"""``shapes_video``: a generated video task whose answers sit in brief, small events under static clutter.

Per-frame pruners spend the same budget on every frame; temporal ones drop what repeats and spend it
on change. So every frame here holds large, high-contrast, *static* clutter (checkerboards, stripes,
rings) -- what per-frame saliency picks -- while every answer depends on small plain shapes (about
a tenth of the frame's side) that move at constant speed, flash for one or two frames, or change
colour once. One question per video:

==================  ==================================================  ==========================
kind                template                                            answers (balanced)
==================  ==================================================  ==========================
``order``           ``which circle appears first, the red one or the    a colour (the first-named
                    blue one?``                                         one half the time)
``count_flashes``   ``how many times does the red circle flash?``       1 / 2 / 3
``direction``       ``which way does the red circle move?``             left / right / up / down
``crossings``       ``how many times does the red circle cross the      0 / 1 / 2 / 3
                    line?``
``final_state``     ``what color is the circle at the end?``            a colour (5)
``static_control``  ``what color is the circle?`` / ``what shape is     a colour / a shape
                    the red object?`` (a static object)
==================  ==================================================  ==========================

Every video also holds distractor shapes doing the same kinds of things (another object flashing a
different number of times, moving another way, changing colour at another time), so an answer needs
the named object, not just "something flashed".

**Scenes are resolution-free.** A scene (:class:`VideoScene`) is described in units of the frame's
side (positions in [0, 1], sizes and speeds as fractions) and rendered at any ``size`` -- the task
option that makes frames the model's own frame size, so its processor needs no resize (224 for
DINOv2 / CLIP-224, 384 for SigLIP-384, 40 for ``tiny-llava-onevision``). Questions and answers do not
depend on ``size``; they depend on ``frames`` (the number of frames rendered, every one shown to the
model; default 16, even, >= 10) only through the event times.

Frame timing is laid out in *slots* of two frames (``2k, 2k + 1``): a flash lies inside one slot,
two flashes of one object are at least one empty slot apart, and the two objects of an ``order``
question first appear in different slots -- so families that fold two frames into one token
(Qwen's temporal patch) still see every event apart.

Everything is seeded: question ``i`` of a split is drawn from ``Random(f"shapes_video/{split}/{i}")``,
kinds in turn (``KINDS[i % 6]``), so the test split (:data:`TEST_QUESTIONS`) is the same on every
machine; ``split="train"`` (or any other name) gives other questions from the same code. Each sample
carries its scene (``extra["scene"]``, JSON), the actors the answer is about (``extra["targets"]``)
and the frames shown (``extra["frame_indices"]``): enough to recompute the answer
(``tests/test_shapes_video.py`` does so independently of this module) and the evidence tokens
(:func:`evidence`, ``tokenprune evidence``). Scoring is exact match of the normalised answer, as
``shapes_scene``.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ...errors import OptionError
from .base import Sample, register_task
from .shapes_scene import ShortAnswerByKind

SIZE = 224  # default frame side (the demo's DINOv2-small)
FRAMES = 16
FPS = 4.0
TEST_QUESTIONS = 600  # 100 per kind

ACTOR_COLOURS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0),
                 "purple": (140, 40, 190)}
SHAPES = ("circle", "square", "triangle")
CLUTTER_COLOURS = {"cyan": (0, 200, 220), "orange": (255, 140, 0), "white": (255, 255, 255), "pink": (255, 110, 200)}
PATTERNS = ("checker", "stripes", "rings")
LINE_COLOUR = (0, 0, 0)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("order", "count_flashes", "direction", "crossings", "final_state", "static_control")

ACTOR_SIZE = (0.085, 0.11)  # side, as a fraction of the frame's (19-25 px of 224: about 2 x 2 patches of 14)
CLUTTER_SIZE = (0.17, 0.25)  # 38-56 px of 224: 3 x 3 to 4 x 4 patches of 14
CLUTTER_COUNT = (5, 7)  # a quarter to two fifths of the frame: more than a 15% per-frame budget
LINE_WIDTH = 0.014  # 3 px of 224
MIN_PIXELS = 3  # an actor is at least 3 x 3 px at any size


# ------------------------------------------------------------------------------------------------
# Scene description
@dataclass(frozen=True)
class Actor:
    """A small plain shape; everything in units of the frame's side, times in frames.

    Attributes:
        shape, colour: names (:data:`SHAPES`, :data:`ACTOR_COLOURS`); ``colour`` is the colour at frame 0.
        size: side of its box.
        start: its centre ``(x, y)`` at frame 0.
        velocity: ``(vx, vy)`` per frame (constant).
        bounce: ``(lo, hi)``: the centre's x is reflected into this range (constant-speed back and
            forth); ``None``: it moves in a straight line.
        visible: ``[start, end)`` frame windows it is drawn in.
        change: ``(frame, colour)``: its colour from that frame on; ``None``: it never changes.
        role: ``"target"`` (what a question is about) or ``"distractor"``; targets are drawn last.
    """

    shape: str
    colour: str
    size: float
    start: tuple[float, float]
    velocity: tuple[float, float] = (0.0, 0.0)
    bounce: tuple[float, float] | None = None
    visible: tuple[tuple[int, int], ...] = ()
    change: tuple[int, str] | None = None
    role: str = "distractor"

    def centre(self, t: int) -> tuple[float, float]:
        """Its centre at frame ``t`` (closed form: straight line, or reflected into ``bounce``)."""
        x = self.start[0] + self.velocity[0] * t
        y = self.start[1] + self.velocity[1] * t
        if self.bounce is not None:
            lo, hi = self.bounce
            period = 2 * (hi - lo)
            w = (x - lo) % period
            x = lo + (w if w <= hi - lo else period - w)
        return x, y

    def is_visible(self, t: int) -> bool:
        return any(a <= t < b for a, b in self.visible)

    def colour_at(self, t: int) -> str:
        return self.change[1] if self.change is not None and t >= self.change[0] else self.colour

    def colours(self) -> set[str]:
        """Every colour it shows."""
        return {self.colour} | ({self.change[1]} if self.change else set())


@dataclass(frozen=True)
class Clutter:
    """A static high-contrast pattern (``checker``, ``stripes``, ``rings``) of a colour and black in a square box."""

    pattern: str
    colour: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass(frozen=True)
class VideoScene:
    """``frames`` frames: a background, static clutter, an optional vertical line at ``x = line``, the actors."""

    frames: int
    background: tuple[int, int, int]
    clutter: tuple[Clutter, ...]
    actors: tuple[Actor, ...]
    line: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | dict) -> "VideoScene":
        d = json.loads(text) if isinstance(text, str) else text
        actors = tuple(Actor(a["shape"], a["colour"], a["size"], tuple(a["start"]), tuple(a["velocity"]),
                             None if a["bounce"] is None else tuple(a["bounce"]), tuple(tuple(w) for w in a["visible"]),
                             None if a["change"] is None else (int(a["change"][0]), a["change"][1]), a["role"])
                       for a in d["actors"])
        clutter = tuple(Clutter(c["pattern"], c["colour"], tuple(c["box"])) for c in d["clutter"])
        return VideoScene(int(d["frames"]), tuple(d["background"]), clutter, actors, d.get("line"))


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str
    targets: tuple[int, ...]  # indices into the scene's actors


# ------------------------------------------------------------------------------------------------
# Generation
def _r(x: float) -> float:
    return round(x, 4)


class _Retry(Exception):
    """A layout that did not fit: draw again (from the same generator, so still seeded)."""


@dataclass
class _Layout:
    frames: int
    rng: random.Random
    clutter: list[Clutter] = field(default_factory=list)
    line: float | None = None
    fixed: list[tuple[float, float, float, float]] = field(default_factory=list)  # static actors' boxes

    def free_spot(self, size: float, avoid_clutter: bool = True) -> tuple[float, float]:
        """A centre whose box stays in the frame and off clutter, the line and other static actors."""
        half = size / 2
        for _ in range(300):
            x, y = self.rng.uniform(half + 0.01, 1 - half - 0.01), self.rng.uniform(half + 0.01, 1 - half - 0.01)
            box = (x - half - 0.01, y - half - 0.01, x + half + 0.01, y + half + 0.01)
            blocked = [*self.fixed, *([c.box for c in self.clutter] if avoid_clutter else [])]
            if self.line is not None:
                blocked.append((self.line - LINE_WIDTH, 0, self.line + LINE_WIDTH, 1))
            if not any(_overlap(box, b) for b in blocked):
                self.fixed.append(box)
                return _r(x), _r(y)
        raise _Retry


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _clutter(rng: random.Random) -> list[Clutter]:
    out: list[Clutter] = []
    n = rng.randint(*CLUTTER_COUNT)
    for _ in range(400):
        if len(out) == n:
            break
        side = rng.uniform(*CLUTTER_SIZE)
        x0, y0 = rng.uniform(0.0, 1 - side), rng.uniform(0.0, 1 - side)
        box = (_r(x0), _r(y0), _r(x0 + side), _r(y0 + side))
        if not any(_overlap(box, c.box) for c in out):
            out.append(Clutter(rng.choice(PATTERNS), rng.choice(sorted(CLUTTER_COLOURS)), box))
    return out


def _slots(frames: int) -> int:
    return frames // 2


def _flash_windows(rng: random.Random, frames: int, n: int) -> tuple[tuple[int, int], ...]:
    """``n`` flashes of one or two frames, each inside its own slot, no two in adjacent slots."""
    for _ in range(200):
        slots = sorted(rng.sample(range(_slots(frames)), n))
        if all(b - a >= 2 for a, b in zip(slots, slots[1:])):
            break
    else:
        raise _Retry
    out = []
    for s in slots:
        if rng.random() < 0.5:
            out.append((2 * s, 2 * s + 2))
        else:
            f = 2 * s + rng.randint(0, 1)
            out.append((f, f + 1))
    return tuple(out)


def _size(rng: random.Random) -> float:
    return _r(rng.uniform(*ACTOR_SIZE))


def _mover(rng: random.Random, frames: int, direction: str, size: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Start and velocity of a straight constant-speed path in ``direction`` that stays in the frame."""
    dx, dy = DIRECTIONS[direction]
    travel = rng.uniform(0.3, 0.55)
    speed = travel / (frames - 1)
    half = size / 2 + 0.01
    along0 = rng.uniform(half, 1 - half - travel)  # the start along the axis of motion, for a +1 direction
    across = rng.uniform(half, 1 - half)
    if dx:
        x0 = along0 if dx > 0 else 1 - along0
        return (_r(x0), _r(across)), (_r(dx * speed), 0.0)
    y0 = along0 if dy > 0 else 1 - along0
    return (_r(across), _r(y0)), (0.0, _r(dy * speed))


def crossing_count(actor: Actor, frames: int, line: float) -> int:
    """How many times the actor's centre changes side of ``x = line`` from one frame to the next."""
    sides = [actor.centre(t)[0] > line for t in range(frames)]
    return sum(a != b for a, b in zip(sides, sides[1:]))


def _bouncer(rng: random.Random, frames: int, line: float, size: float, want: int | None) -> Actor | None:
    """A horizontal back-and-forth path (constant speed, reflected at ``lo`` and ``hi``) whose centre
    crosses ``x = line`` ``want`` times between frames (any number if ``None``).

    No crossing is hidden or half-made: both turning points lie more than one step plus a margin (0.3 of
    the object's size plus half the line) from the line, so the object never crosses twice within one
    step and always gets clearly to the other side before turning; the first and last frames are
    outside the margin, so no crossing is cut off by the video's ends.
    """
    half = size / 2 + 0.01
    margin = 0.3 * size + LINE_WIDTH / 2
    for _ in range(4000):
        speed = rng.uniform(0.3, 2.4) / (frames - 1)  # the whole path: 0.3 to 2.4 frame widths
        lo = rng.uniform(half, 1 - half - 0.25)
        hi = rng.uniform(lo + 0.25, 1 - half)
        if min(abs(line - lo), abs(hi - line)) <= margin + speed + 0.001:
            continue
        x0 = rng.uniform(lo, hi)
        v = speed if rng.random() < 0.5 else -speed
        actor = Actor("circle", "red", size, (_r(x0), 0.5), (_r(v), 0.0), (_r(lo), _r(hi)), ((0, frames),))
        if any(abs(actor.centre(t)[0] - line) < margin for t in (0, frames - 1)):
            continue
        if want is None or crossing_count(actor, frames, line) == want:
            return actor
    return None


def _distractor(lay: _Layout, behaviour: str, shape: str, colour: str, size: float) -> Actor:
    """A distractor of ``behaviour``: static, mover, flasher, changer."""
    rng, frames = lay.rng, lay.frames
    every = ((0, frames),)
    if behaviour == "mover":
        start, vel = _mover(rng, frames, rng.choice(sorted(DIRECTIONS)), size)
        return Actor(shape, colour, size, start, vel, None, every)
    if behaviour == "flasher":
        return Actor(shape, colour, size, lay.free_spot(size), visible=_flash_windows(rng, frames, rng.randint(1, 3)))
    if behaviour == "changer":
        other = rng.choice([c for c in sorted(ACTOR_COLOURS) if c != colour])
        return Actor(shape, colour, size, lay.free_spot(size), visible=every,
                     change=(rng.randint(2, frames - 2), other))
    return Actor(shape, colour, size, lay.free_spot(size), visible=every)


def _pick_distinct(rng: random.Random, taken: set[tuple[str, str]], shapes: Sequence[str] = SHAPES,
                   colours: Sequence[str] = tuple(ACTOR_COLOURS)) -> tuple[str, str]:
    options = [(s, c) for s in shapes for c in colours if (c, s) not in taken]
    if not options:
        raise _Retry
    return rng.choice(sorted(options))


def _shows(actor: Actor) -> set[tuple[str, str]]:
    return {(c, actor.shape) for c in actor.colours()}


def _make(kind: str, rng: random.Random, frames: int, slot: int) -> tuple[VideoScene, Question]:
    """One scene and its question; ``slot`` picks the answer (cycled over a kind's answers: balanced)."""
    lay = _Layout(frames, rng, _clutter(rng))
    every = ((0, frames),)
    colours = sorted(ACTOR_COLOURS)
    targets: list[Actor] = []
    distractors: list[Actor] = []
    behaviours = ["static", "mover", "flasher", "changer"]

    if kind == "order":
        shape = rng.choice(SHAPES)
        first, second = rng.sample(colours, 2)
        a, b = sorted(rng.sample(range(_slots(frames) - 1), 2))  # first shown in two different slots
        windows = []
        for s in (a, b):
            start = 2 * s + rng.randint(0, 1)
            windows.append(((start, min(frames, start + rng.randint(2, 4))),))
        targets = [Actor(shape, first, _size(rng), lay.free_spot(0.11), visible=windows[0], role="target"),
                   Actor(shape, second, _size(rng), lay.free_spot(0.11), visible=windows[1], role="target")]
        named_first = slot % 2 == 0  # the answer is the first-named colour half the time
        a_, b_ = (first, second) if named_first else (second, first)
        q = f"which {shape} appears first, the {a_} one or the {b_} one?"
        answer = first
        for _ in range(2):
            s, c = _pick_distinct(rng, set(), [x for x in SHAPES if x != shape])
            distractors.append(_distractor(lay, rng.choice(behaviours), s, c, _size(rng)))
        order = [0, 1]
    elif kind == "count_flashes":
        n = (1, 2, 3)[slot % 3]
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        targets = [Actor(shape, colour, _size(rng), lay.free_spot(0.11), visible=_flash_windows(rng, frames, n),
                         role="target")]
        s, c = _pick_distinct(rng, {(colour, shape)})  # another flasher, another count
        m = rng.choice([k for k in (1, 2, 3) if k != n])
        distractors.append(Actor(s, c, _size(rng), lay.free_spot(0.11), visible=_flash_windows(rng, frames, m)))
        s, c = _pick_distinct(rng, {(colour, shape)})
        distractors.append(_distractor(lay, rng.choice(["static", "mover", "changer"]), s, c, _size(rng)))
        q, answer, order = f"how many times does the {colour} {shape} flash?", str(n), [0]
    elif kind == "direction":
        d = sorted(DIRECTIONS)[slot % 4]
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        size = _size(rng)
        start, vel = _mover(rng, frames, d, size)
        targets = [Actor(shape, colour, size, start, vel, None, every, role="target")]
        s, c = _pick_distinct(rng, {(colour, shape)})
        size2 = _size(rng)
        start2, vel2 = _mover(rng, frames, rng.choice([x for x in sorted(DIRECTIONS) if x != d]), size2)
        distractors.append(Actor(s, c, size2, start2, vel2, None, every))
        s, c = _pick_distinct(rng, {(colour, shape)})
        distractors.append(_distractor(lay, rng.choice(["static", "flasher", "changer"]), s, c, _size(rng)))
        q, answer, order = f"which way does the {colour} {shape} move?", d, [0]
    elif kind == "crossings":
        n = (0, 1, 2, 3)[slot % 4]
        lay.line = _r(rng.uniform(0.35, 0.65))
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        size = _size(rng)
        path = _bouncer(rng, frames, lay.line, size, n)
        if path is None:
            raise _Retry
        y = _r(rng.uniform(size / 2 + 0.01, 1 - size / 2 - 0.01))
        targets = [replace(path, shape=shape, colour=colour, start=(path.start[0], y), role="target")]
        if rng.random() < 0.5:  # a second object going back and forth, its own number of crossings
            s, c = _pick_distinct(rng, {(colour, shape)})
            size2 = _size(rng)
            other = _bouncer(rng, frames, lay.line, size2, None)
            if other is not None:
                y2 = _r(rng.uniform(size2 / 2 + 0.01, 1 - size2 / 2 - 0.01))
                distractors.append(replace(other, shape=s, colour=c, start=(other.start[0], y2)))
        s, c = _pick_distinct(rng, {(colour, shape)})
        distractors.append(_distractor(lay, rng.choice(["static", "flasher", "changer"]), s, c, _size(rng)))
        q, answer, order = f"how many times does the {colour} {shape} cross the line?", str(n), [0]
    elif kind == "final_state":
        final = colours[slot % len(colours)]
        initial = rng.choice([c for c in colours if c != final])
        shape = rng.choice(SHAPES)
        size = _size(rng)
        at = rng.randint(frames // 2 + 1, frames - 3)  # after the middle frame: a single middle frame misleads
        if rng.random() < 0.5:
            start, vel = lay.free_spot(size), (0.0, 0.0)
        else:
            start, vel = _mover(rng, frames, rng.choice(sorted(DIRECTIONS)), size)
        targets = [Actor(shape, initial, size, start, vel, None, every, (at, final), role="target")]
        others = [x for x in SHAPES if x != shape]
        s, c = rng.choice(others), rng.choice(colours)  # another object changing colour, at another time
        other_at = rng.choice([f for f in range(2, frames - 1) if f != at])
        distractors.append(Actor(s, c, _size(rng), lay.free_spot(0.11), visible=every,
                                 change=(other_at, rng.choice([x for x in colours if x != c]))))
        s, c = rng.choice(others), rng.choice(colours)
        distractors.append(_distractor(lay, rng.choice(["static", "mover", "flasher"]), s, c, _size(rng)))
        q, answer, order = f"what color is the {shape} at the end?", final, [0]
    elif kind == "static_control":
        by_colour = slot % 2 == 0
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        if by_colour:  # "what color is the circle?": the shape is unique
            colour = colours[(slot // 2) % len(colours)]
            q, answer = f"what color is the {shape}?", colour
            pool = [(s, c) for s in SHAPES if s != shape for c in colours]
        else:  # "what shape is the red object?": the colour is unique, also among colours shown later
            shape = SHAPES[(slot // 2) % len(SHAPES)]
            q, answer = f"what shape is the {colour} object?", shape
            pool = [(s, c) for s in SHAPES for c in colours if c != colour]
        targets = [Actor(shape, colour, _size(rng), lay.free_spot(0.11), visible=every, role="target")]
        for _ in range(2):
            s, c = rng.choice(sorted(pool))
            behaviour = rng.choice(behaviours)
            d = _distractor(lay, behaviour, s, c, _size(rng))
            if not by_colour and d.change is not None and d.change[1] == colour:
                d = replace(d, change=(d.change[0], rng.choice([x for x in colours if x not in (colour, c)])))
            distractors.append(d)
        order = [0]
    else:
        raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(KINDS)}")

    actors = tuple(distractors + targets)  # targets drawn last: nothing hides them
    target_ids = tuple(len(distractors) + i for i in order)
    scene = VideoScene(frames, tuple(rng.randint(228, 255) for _ in range(3)), tuple(lay.clutter), actors, lay.line)
    _check_unique(scene, kind, target_ids)
    return scene, Question(kind, q, answer, target_ids)


def _check_unique(scene: VideoScene, kind: str, targets: tuple[int, ...]) -> None:
    """The question names its object(s) unambiguously; otherwise draw again."""
    others = [a for i, a in enumerate(scene.actors) if i not in targets]
    t = scene.actors[targets[0]]
    if kind in ("order", "final_state"):
        if any(a.shape == t.shape for a in others):
            raise _Retry
    elif kind in ("count_flashes", "direction", "crossings"):
        if any((t.colour, t.shape) in _shows(a) for a in others):
            raise _Retry


def make_question(split: str, index: int, frames: int = FRAMES) -> tuple[VideoScene, Question]:
    """Question ``index`` of ``split`` (kind ``KINDS[index % 6]``) and its scene, for ``frames`` frames."""
    _check_frames(frames)
    kind = KINDS[index % len(KINDS)]
    rng = random.Random(f"shapes_video/{split}/{index}" + ("" if frames == FRAMES else f"/{frames}"))
    for _ in range(100):
        try:
            return _make(kind, rng, frames, index // len(KINDS))
        except _Retry:
            continue
    raise RuntimeError(f"shapes_video: no layout found for question {index} of {split}")  # pragma: no cover


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or frames < 10 or frames % 2:
        raise OptionError(f"shapes_video: frames must be an even number >= 10 (events sit in slots of two frames, "
                          f"three flashes need five slots), got {frames!r}")


# ------------------------------------------------------------------------------------------------
# Rendering
def _px(v: float, size: int) -> int:
    return int(round(v * size))


def actor_box(actor: Actor, t: int, size: int) -> tuple[int, int, int, int]:
    """The actor's box at frame ``t`` in pixels of a ``size``-px frame, ``(x0, y0, x1, y1)`` (x1, y1 exclusive)."""
    side = max(MIN_PIXELS, _px(actor.size, size))
    cx, cy = actor.centre(t)
    x0, y0 = int(round(cx * size - side / 2)), int(round(cy * size - side / 2))
    return x0, y0, x0 + side, y0 + side


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # an upward triangle filling its box
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def _draw_clutter(draw: ImageDraw.ImageDraw, c: Clutter, size: int) -> None:
    x0, y0, x1, y1 = (_px(v, size) for v in c.box)
    colour, black = CLUTTER_COLOURS[c.colour], (0, 0, 0)
    cell = max(1, round(0.03 * size))  # 7 px of 224
    if c.pattern == "checker":
        for i, y in enumerate(range(y0, y1, cell)):
            for j, x in enumerate(range(x0, x1, cell)):
                draw.rectangle((x, y, min(x + cell, x1) - 1, min(y + cell, y1) - 1), fill=colour if (i + j) % 2 else black)
    elif c.pattern == "stripes":
        for j, x in enumerate(range(x0, x1, cell)):
            draw.rectangle((x, y0, min(x + cell, x1) - 1, y1 - 1), fill=colour if j % 2 else black)
    else:  # concentric rings
        r = 0
        while x0 + r < x1 - r - 1 and y0 + r < y1 - r - 1:
            draw.ellipse((x0 + r, y0 + r, x1 - 1 - r, y1 - 1 - r), fill=black if (r // cell) % 2 == 0 else colour)
            r += cell


def render(scene: VideoScene, size: int = SIZE) -> np.ndarray:
    """The scene's frames, ``[frames, size, size, 3]`` uint8."""
    base = Image.new("RGB", (size, size), tuple(scene.background))
    draw = ImageDraw.Draw(base)
    for c in scene.clutter:
        _draw_clutter(draw, c, size)
    if scene.line is not None:
        w = max(1, _px(LINE_WIDTH, size))
        x = int(round(scene.line * size - w / 2))
        draw.rectangle((x, 0, x + w - 1, size - 1), fill=LINE_COLOUR)
    out = np.empty((scene.frames, size, size, 3), dtype=np.uint8)
    for t in range(scene.frames):
        frame = base.copy()
        d = ImageDraw.Draw(frame)
        for a in scene.actors:  # distractors first, targets last (the scene's order)
            if a.is_visible(t):
                _draw_shape(d, a.shape, actor_box(a, t, size), ACTOR_COLOURS[a.colour_at(t)])
        out[t] = np.asarray(frame)
    return out


def actor_mask(actor: Actor, t: int, size: int) -> np.ndarray:
    """``[size, size]`` bool: the pixels the actor covers at frame ``t`` (all False when it is not shown)."""
    canvas = Image.new("L", (size, size), 0)
    if actor.is_visible(t):
        _draw_shape(ImageDraw.Draw(canvas), actor.shape, actor_box(actor, t, size), 255)
    return np.asarray(canvas) > 0


# ------------------------------------------------------------------------------------------------
# Evidence: which objects in which frames each answer depends on
def evidence(scene: VideoScene, kind: str, targets: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """The events a question's answer depends on: ``[(actor index, frames)]``; the answer needs at
    least one token of every event, and the evidence tokens are those covering the actor in those frames.

    * ``order``: each of the two objects in every frame it is shown (two events);
    * ``count_flashes``: each flash of the object (one event per flash);
    * ``direction``: the object in the first half and in the second half of the video (two events);
    * ``crossings``: each run of frames the object spends on one side of the line (crossings + 1 events);
    * ``final_state``: the object from its colour change on (one event);
    * ``static_control``: the object in every frame (one event; any one frame holds the answer).

    The line of ``crossings`` is static scenery, like the clutter, and is not counted.
    """
    T = scene.frames
    a = scene.actors[targets[0]]
    shown = tuple(t for t in range(T) if a.is_visible(t))
    if kind == "order":
        return [(i, tuple(t for t in range(T) if scene.actors[i].is_visible(t))) for i in targets]
    if kind == "count_flashes":
        return [(targets[0], tuple(range(s, e))) for s, e in a.visible]
    if kind == "direction":
        return [(targets[0], shown[: len(shown) // 2]), (targets[0], shown[len(shown) // 2:])]
    if kind == "crossings":
        runs: list[list[int]] = []
        for t in range(T):
            side = a.centre(t)[0] > scene.line
            if runs and (a.centre(runs[-1][-1])[0] > scene.line) == side:
                runs[-1].append(t)
            else:
                runs.append([t])
        return [(targets[0], tuple(r)) for r in runs]
    if kind == "final_state":
        return [(targets[0], tuple(range(a.change[0], T)))]
    if kind == "static_control":
        return [(targets[0], shown)]
    raise ValueError(f"unknown question kind {kind!r}")


# ------------------------------------------------------------------------------------------------
# Answer priors (image-blind rules)
def kind_of(question: str) -> str:
    """The kind of a generated question."""
    if question.startswith("which way"):
        return "direction"
    if question.startswith("which"):
        return "order"
    if question.endswith("flash?"):
        return "count_flashes"
    if question.endswith("cross the line?"):
        return "crossings"
    if question.endswith("at the end?"):
        return "final_state"
    return "static_control"


def template_of(question: str) -> str:
    """The question with its colour and shape words replaced by slots."""
    words = []
    for w in question.rstrip("?").split():
        words.append("<colour>" if w in ACTOR_COLOURS else "<shape>" if w in SHAPES else w)
    return " ".join(words)


def answer_prior(questions: Sequence[tuple[str, str]]) -> dict[str, str]:
    """``{template: most frequent answer}`` over ``(question, answer)`` pairs (a train split)."""
    counts: dict[str, Counter] = {}
    for q, a in questions:
        counts.setdefault(template_of(q), Counter())[a] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def blind_answer(question: str, prior: dict[str, str]) -> str:
    """An image-blind rule: the most frequent train answer of the question's template."""
    return prior.get(template_of(question), "1")


# ------------------------------------------------------------------------------------------------
@register_task("shapes_video")
class ShapesVideo(ShortAnswerByKind):
    """Small shapes that move, flash and change colour under static clutter; six question kinds
    (generated, seeded, offline). Exact match; per-kind accuracies beside the headline.

    Args:
        size: frame side in pixels (default 224): give the model's own frame size, so its processor
            does not resize (``tiny-llava-onevision``: 40; LLaVA-OneVision: 384; the demo: 224).
        frames: frames rendered, every one shown to the model (even, >= 10; default 16).
        fps: the frame rate the frames stand for (default 4: a 4-second video).
        as_images: hand the frames as a list of PIL images (a multi-image prompt) instead of a Video.
        split: which questions (``"test"``, the fixed split; ``"train"`` or any other name: others).
    """

    dataset_path = "generated"
    split = "test"
    headline = "accuracy"
    kinds = KINDS
    max_new_tokens = 4
    until = ("\n",)

    def __init__(self, dataset_path: str | None = None, revision: str | None = None, size: int = SIZE,
                 frames: int = FRAMES, fps: float = FPS, as_images: bool = False, split: str | None = None):
        super().__init__(dataset_path, revision)
        if not isinstance(size, int) or size < 16:
            raise OptionError(f"shapes_video: size must be a frame side in pixels >= 16, got {size!r}")
        _check_frames(frames)
        if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
            raise OptionError(f"shapes_video: fps must be a positive number, got {fps!r}")
        self.size, self.frames, self.fps, self.as_images = size, frames, float(fps), bool(as_images)
        if split is not None:
            self.split = str(split)

    def load_rows(self, data_dir=None, config=None, split=None):
        import datasets

        split = split or self.split
        rows: dict[str, list] = {"question": [], "answer": [], "kind": [], "scene": [], "targets": []}
        for i in range(TEST_QUESTIONS):
            scene, q = make_question(split, i, self.frames)
            rows["question"].append(q.question)
            rows["answer"].append(q.answer)
            rows["kind"].append(q.kind)
            rows["scene"].append(scene.to_json())
            rows["targets"].append(list(q.targets))
        return datasets.Dataset.from_dict(rows)

    def row_image(self, row):
        return row["scene"]

    def load_visual(self, row):
        from ...media import Video

        frames = render(VideoScene.from_json(row["scene"]), self.size)
        if self.as_images:
            return [Image.fromarray(f) for f in frames]
        return Video.from_frames(frames, fps=self.fps)

    def row_id(self, row, index):
        return f"{self.split}-{index}"

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], category=row["kind"],
                      extra={"scene": row["scene"], "targets": list(row["targets"]), "size": self.size,
                             "frame_indices": list(range(self.frames))})



__all__ = ["Actor", "Clutter", "KINDS", "Question", "ShapesVideo", "VideoScene", "actor_box", "actor_mask",
           "answer_prior", "blind_answer", "crossing_count", "evidence", "kind_of", "make_question", "render",
           "template_of"]
