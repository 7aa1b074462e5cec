"""Train the video demo's projector + LoRA on ``shapes_video`` (frozen DINOv2 and SmolLM2). Seeded, resumable.

    python -m tokenprune.zoo.train_demo_video --work runs/demo-video-train --train 2400 --val 300 \
        --steps 300 --bf16 --export tokenprune/zoo/weights/demo_video.safetensors

Questions come from ``shapes_video`` split ``"train"`` (``--train`` of them, one scene each); checkpoints
are chosen on split ``"val"`` (``--val``); the test split (the benchmark's) is never generated here.
Every frame is rendered at the model's frame size (:data:`~tokenprune.zoo.demo_video.FRAME_SIZE`),
preprocessed by the adapter's own frames preprocessor, and run through the frozen tower once: the
pooled per-frame features ``[T, 16, 384]`` (what the projector reads) are cached in ``--work``.

Two stages, as the image demo (:mod:`tokenprune.zoo.train_demo`):

1. **Alignment** (``--align-steps``, no LLM pass): every video token is regressed onto the word
   embeddings of what its cell of its frame shows at that moment -- the mean embedding of the colour and
   shape words of the actor covering most of the cell (its colour *at that frame*: a colour change
   shows), "background" elsewhere (clutter included). Labels come from the scene description
   (:func:`token_labels`), so every training video is labelled exactly. ``--place-weight`` adds the
   token's place words (:func:`place_vectors`); ``--place-loss-weight`` adds :func:`place_loss`, which
   asks each token with a place to be nearest its own halves target (the MSE alone leaves the place
   unlearnt), and ``--actor-weight`` weighs the tokens that show an actor in the MSE.
2. **Answer loss** through the frozen LLM (bf16 autocast with ``--bf16``) with rank-8 LoRA (started
   from the image demo's LoRA with ``--init-lora``: it already reads aligned tokens as words), plus
   ``--align-weight`` x the alignment loss. Of every ``--full-every`` steps all but one are *focal*
   (:func:`focal_tokens`): only the tokens that show an actor (targets and distractors, every frame:
   the evidence of :func:`~tokenprune.benchmarks.tasks.shapes_video.evidence` and what it must be told
   apart from), the line's cells for ``crossings``, and ``--focal-others`` random other tokens, at their
   full-sequence positions (as a pruned prompt) -- about half the tokens, so twice the questions.

Every ``--eval-every`` steps: first-answer-token accuracy per kind on the val questions (logged to
``--log``, default ``<work>/log.jsonl``), a checkpoint in ``--work`` (rerunning the same command resumes),
and, when val accuracy improved, the projector + LoRA exported (fp16). A checkpoint resumed with another
``--val`` (say, more questions for a less noisy choice) is first evaluated on the new val questions, and its
accuracy there is the bar a later step must beat to be exported.

``--device cuda`` trains on a GPU: the model moves there, the cached features (1.5 GB for 12,000 videos)
stay in host memory and travel a batch at a time; checkpoints and exports are the CPU run's format.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..benchmarks.tasks.base import SHORT_ANSWER
from ..benchmarks.tasks.shapes_video import (ACTOR_COLOURS, KINDS, SHAPES, VideoScene, _shows, actor_mask,
                                              make_question, render)
from .train_demo import add_lora, alignment_loss, answer_loss, optimiser_step, trained_tensors, word_vector

BACKGROUND = "background"


def questions(split: str, n: int, frames: int) -> list[tuple[VideoScene, object]]:
    """``[(scene, Question)]``: questions ``0..n-1`` of ``shapes_video`` split ``split`` (never "test" here)."""
    if split == "test":
        raise ValueError("the trainer never generates the test split")
    return [make_question(split, i, frames) for i in range(n)]


def frames_processor(processor):
    """The adapter's video preprocessor for this processor (``LlavaNextVideoLVLM.video_processor``'s rule)."""
    from ..media.processors.frames import FramesProcessor

    return FramesProcessor.from_image_processor(processor.image_processor, do_center_crop=True)


@torch.no_grad()
def pooled_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """``pixel_values_videos [V, T, 3, px, px]`` -> ``[V, T, m, 384]``: the tower's selected layer, CLS dropped,
    average-pooled by the model's ``vision_resampler`` -- exactly what ``get_video_features`` hands the projector."""
    cfg = model.config
    v, t = pixels.shape[:2]
    pixels = pixels.to(model.model.vision_tower.device)
    hidden = model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states
    feats = hidden[cfg.vision_feature_layer][:, 1:]
    pooled = model.model.vision_resampler(feats)
    return pooled.unflatten(0, (v, t))


def cache_features(model, processor, scenes: list[VideoScene], size: int, path: Path, batch: int = 8) -> torch.Tensor:
    """``[N, T, m, 384]`` fp16 pooled features of every scene's frames, computed once and stored at ``path``."""
    if path.exists():
        return torch.load(path)
    fp = frames_processor(processor)
    out = []
    t0 = time.time()
    for i in range(0, len(scenes), batch):
        videos = [render(s, size) for s in scenes[i:i + batch]]
        pixels = fp(videos, return_tensors="pt")["pixel_values_videos"]
        out.append(pooled_features(model, pixels).to(torch.float16).cpu())
        if (i // batch) % 25 == 0:
            print(f"  features {i + len(videos)}/{len(scenes)} ({time.time() - t0:.0f} s)", flush=True)
    feats = torch.cat(out)
    torch.save(feats, path)
    return feats


def cell_cover(scene: VideoScene, size: int, cells: int) -> np.ndarray:
    """``[A, T, cells*cells]``: pixels of actor ``a`` in frame ``t`` inside each token cell (row-major), the
    pooled token grid (``cells`` per side; a cell is ``size / cells`` px)."""
    step = size // cells
    out = np.zeros((len(scene.actors), scene.frames, cells * cells), dtype=np.int64)
    for a, actor in enumerate(scene.actors):
        for t in range(scene.frames):
            m = actor_mask(actor, t, size)
            if m.any():
                out[a, t] = m[: step * cells, : step * cells].reshape(cells, step, cells, step).sum((1, 3)).flatten()
    return out


DESCRIPTIONS = [(c, s) for c in ACTOR_COLOURS for s in SHAPES]  # code i; code len() = background


def covering_actor(scene: VideoScene, size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """``(best [T, cells^2] actor index, shows_actor [T, cells^2] bool)``: a cell shows an actor when it holds at
    least a quarter of the actor's pixels in that frame (or is the cell with most of them); ``best`` is the
    actor with most pixels there (meaningful where ``shows_actor``)."""
    cover = cell_cover(scene, size, cells)  # [A, T, C]
    total = cover.sum(-1, keepdims=True)
    shows = (cover * 4 >= np.maximum(total, 1)) & (cover > 0)
    shows |= (cover == cover.max(-1, keepdims=True)) & (cover > 0)
    weight = np.where(shows, cover, 0)  # [A, T, C]
    return weight.argmax(0), weight.max(0) > 0


def target_words(embed: torch.nn.Module, tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The alignment targets' vocabulary: ``{word: [D]}`` for every colour, shape, "background" and the four
    place words, and the description table ``[len(DESCRIPTIONS) + 1, D]`` (row i the mean of description i's
    colour and shape, the last row "background") that :func:`token_labels`' codes index."""
    words = {w: word_vector(embed, tokenizer, w) for w in [*ACTOR_COLOURS, *SHAPES, BACKGROUND, "left", "right", "up", "down"]}
    table = torch.stack([(words[c] + words[s]) / 2 for c, s in DESCRIPTIONS] + [words[BACKGROUND]])
    return words, table


def token_labels(scene: VideoScene, size: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [T*cells^2] long, shows_actor [T*cells^2] bool)`` in token order (frame-major).

    A token shows an actor when the cell holds at least a quarter of the actor's pixels in that
    frame (or is the cell with most of them); its code is the description (colour at that frame,
    shape) of the actor with most pixels there, :data:`DESCRIPTIONS` index; else background.
    """
    best, any_actor = covering_actor(scene, size, cells)
    codes = np.full(best.shape, len(DESCRIPTIONS))
    for t in range(scene.frames):
        for c in np.nonzero(any_actor[t])[0]:
            a = scene.actors[best[t, c]]
            codes[t, c] = DESCRIPTIONS.index((a.colour_at(t), a.shape))
    return torch.from_numpy(codes.reshape(-1)), torch.from_numpy(any_actor.reshape(-1))


def token_places(scene: VideoScene, size: int, cells: int) -> torch.Tensor:
    """``[T*cells^2, 2]`` float: where each token's content is, in units of the frame's side, token order.

    A token showing an actor (:func:`token_labels`' rule) gets that actor's centre ``(x, y)`` at its frame;
    a token the ``crossings`` line runs through (and no actor) gets ``(line, its cell's centre y)``; every
    other token its cell's centre. Why: ``direction`` and ``crossings`` are about where the named object is, frame
    after frame; the LLM reads a token's place in its frame only through its sequence position, which
    a 135M model does not learn to decode from a few thousand videos. Saying the place in words (see
    ``--place-weight``) makes "left early, right late" a comparison of words.
    """
    best, any_actor = covering_actor(scene, size, cells)
    centre = (np.arange(cells) + 0.5) / cells
    out = np.stack(np.meshgrid(centre, centre, indexing="xy"), -1).reshape(1, cells * cells, 2)  # (x, y) row-major
    out = np.repeat(out, scene.frames, 0)
    if scene.line is not None:
        col = min(cells - 1, int(scene.line * cells))
        out[:, col::cells, 0] = scene.line
    for t in range(scene.frames):
        for c in np.nonzero(any_actor[t])[0]:
            out[t, c] = scene.actors[best[t, c]].centre(t)
    return torch.from_numpy(out.reshape(-1, 2)).float()


def place_vectors(places: torch.Tensor, words: dict[str, torch.Tensor], halves: bool = False,
                  x_split: torch.Tensor | float = 0.5) -> torch.Tensor:
    """``[..., 2]`` places (``nan``: none) -> ``[..., D]``: ``((1-x) left + x right + (1-y) up + y down) / 2``,
    zero where there is no place. The words are ``direction``'s answers, so "where it ends" and "which
    way it moves" share a vocabulary. ``halves``: x and y rounded to 0 / 1 first, so a token names one side
    (``left`` or ``right``, ``up`` or ``down``) as it names one colour; y splits at the middle, x at
    ``x_split`` (a float, or ``[..., 1]`` broadcast against ``places``: :func:`x_splits` gives each scene's
    line, so that in a ``crossings`` scene "left" / "right" say the side *of the line* and a crossing is a
    change of word)."""
    if halves:
        places = place_sides(places, x_split)
    x, y = places[..., :1], places[..., 1:]
    vec = ((1 - x) * words["left"] + x * words["right"] + (1 - y) * words["up"] + y * words["down"]) / 2
    return torch.nan_to_num(vec, nan=0.0)


def place_sides(places: torch.Tensor, x_split: torch.Tensor | float = 0.5) -> torch.Tensor:
    """``[..., 2]`` places (``nan``: none) -> ``[..., 2]`` sides, 0 / 1 (``nan`` kept): x is 1 at or right of
    ``x_split`` (a float or ``[..., 1]``), y is 1 at or below the middle."""
    x, y = places[..., :1], places[..., 1:]
    return torch.cat([torch.where(x.isnan(), x, (x >= x_split).to(x.dtype)),
                      torch.where(y.isnan(), y, (y >= 0.5).to(y.dtype))], -1)


def place_loss(projected: torch.Tensor, codes: torch.Tensor, sides: torch.Tensor, table: torch.Tensor,
               words: dict[str, torch.Tensor], place_weight: float = 1.0, scale: float = 50.0) -> torch.Tensor:
    """Cross-entropy, over the tokens that have a place, of which of the four halves targets (the token's
    description + ``place_weight`` x ``place_vectors`` of left / right x up / down) the projected token is
    nearest in cosine.

    ``projected`` ``[B, N, D]``, ``codes`` ``[B, N]`` (:func:`token_labels`), ``sides`` ``[B, N, 2]`` 0 / 1
    (:func:`place_sides`; ``nan``: no place, not counted), ``table`` the description table. Why, beside the
    MSE: the place words are a small part of a target (the description dominates its norm, and with
    ``--place-actors-only`` the ~83% of tokens that show no actor carry none), so the MSE leaves them unlearnt -- v9's aligned tokens name their x side 0.60 of the
    time (``place_probe.py``), although a linear probe on the same pooled features reads it 0.96. Asking for
    the right one of the four variants is the decision the reader makes. Zero when no token has a place.
    """
    has = ~sides[..., 0].isnan()
    if not has.any():
        return projected.sum() * 0.0
    p, side = projected[has].float(), sides[has].long()
    variants = halves_variants(table[codes[has]].float(), words, place_weight)
    logits = scale * torch.nn.functional.cosine_similarity(p.unsqueeze(1), variants, dim=-1)
    return torch.nn.functional.cross_entropy(logits, side[:, 0] * 2 + side[:, 1])


def halves_variants(base: torch.Tensor, words: dict[str, torch.Tensor], place_weight: float = 1.0) -> torch.Tensor:
    """``[M, D]`` descriptions -> ``[M, 4, D]``: each + ``place_weight`` x the place words of (left, up), (left,
    down), (right, up), (right, down) -- index ``2 * x side + y side`` (:func:`place_sides`)."""
    corners = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], device=base.device)
    return base.unsqueeze(1) + place_weight * place_vectors(corners, words).to(base.dtype)


def weighted_alignment_loss(projected: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`~tokenprune.zoo.train_demo.alignment_loss` with each token's squared error weighted by ``weight``
    ``[B, N]`` (normalised by its sum): ``projected`` / ``target`` ``[B, N, D]``."""
    err = ((projected.float() - target.float()) ** 2).mean(-1)
    return (err * weight).sum() / weight.sum() / target.float().var()


def x_splits(scenes: list[VideoScene]) -> torch.Tensor:
    """``[N, 1, 1]``: where each scene's left / right split is for ``place_vectors(..., halves=True)``: its
    ``crossings`` line if it has one, else the middle (0.5)."""
    return torch.tensor([0.5 if s.line is None else s.line for s in scenes]).view(-1, 1, 1)


AUX_MARGIN = 0.08  # a place this close to the middle (or to the line) is not asked about: too close to call


def aux_questions(scene: VideoScene) -> list[tuple[str, str, str]]:
    """``[(question, answer, kind)]``: one-frame reads of the scene that the temporal kinds are built from.

    Why: ``direction`` is "where at the start" against "where at the end", ``crossings`` is which side of
    the line, frame after frame, and ``count_flashes`` is in how many frames an object shows. Asked on
    their own (same scenes, same cached features), each needs one read of one place or a count of
    frames, so the LoRA can learn the reads before it must compose them. Only actors named by one
    colour and shape through the whole video are asked about (a colour changer is not), and no place
    within :data:`AUX_MARGIN` of the middle or the line. Kinds: ``aux_x``, ``aux_y``, ``aux_line``,
    ``aux_frames``.
    """
    shows = Counter(key for a in scene.actors for key in _shows(a))  # how many actors show each (colour, shape)
    out = []
    for a in scene.actors:
        if a.change is not None or shows[(a.colour, a.shape)] > 1:
            continue
        frames = [t for t in range(scene.frames) if a.is_visible(t)]
        if not frames:
            continue
        name = f"{a.colour} {a.shape}"
        for when, t in (("start", frames[0]), ("end", frames[-1])):
            x, y = a.centre(t)
            if abs(x - 0.5) >= AUX_MARGIN:
                out.append((f"is the {name} on the left or the right at the {when}?", "left" if x < 0.5 else "right",
                            "aux_x"))
            if abs(y - 0.5) >= AUX_MARGIN:
                out.append((f"is the {name} at the top or the bottom at the {when}?", "top" if y < 0.5 else "bottom",
                            "aux_y"))
            if scene.line is not None and abs(x - scene.line) >= AUX_MARGIN:
                out.append((f"is the {name} left or right of the line at the {when}?",
                            "left" if x < scene.line else "right", "aux_line"))
        if len(frames) < min(10, scene.frames):  # "10" would share its first token with "1"
            out.append((f"in how many frames is the {name} shown?", str(len(frames)), "aux_frames"))
    return out


def pick_aux(items: list[tuple[str, str, str]]) -> Callable[[random.Random], tuple[str, str, str]] | None:
    """A sampler over ``items`` that first draws a kind uniformly, then a question of it (``None`` if empty):
    a scene's static actors give many place questions, and a kind-first draw keeps the rarer ones
    (the line, frame counts) from being swamped."""
    if not items:
        return None
    by_kind: dict[str, list[tuple[str, str, str]]] = {}
    for it in items:
        by_kind.setdefault(it[2], []).append(it)
    kinds = sorted(by_kind)
    return lambda rng: rng.choice(by_kind[rng.choice(kinds)])


def line_tokens(scene: VideoScene, size: int, cells: int) -> torch.Tensor:
    """``[T*cells^2] bool``: the cells the ``crossings`` line runs through (all False without a line)."""
    out = torch.zeros(scene.frames, cells, cells, dtype=torch.bool)
    if scene.line is not None:
        out[:, :, min(cells - 1, int(scene.line * cells))] = True
    return out.flatten()


def focal_tokens(shows: torch.Tensor, line: torch.Tensor, n_others: int, rng: random.Random) -> torch.Tensor:
    """Sorted token indices: every token showing an actor, the line's tokens, and ``n_others`` random others.

    Why: the LLM pass over all ``T*16`` tokens is what a CPU step costs; the actors' tokens (the
    evidence and its distractors) hold every answer, so a step on them plus some background learns the
    same thing for about half the cost, and doubles as training on a pruned prompt (original positions)."""
    must = (shows | line).nonzero().flatten().tolist()
    rest = (~(shows | line)).nonzero().flatten().tolist()
    return torch.tensor(sorted(must + rng.sample(rest, min(n_others, len(rest)))))


class VideoBatcher:
    """``inputs_embeds`` / labels for (video tokens, question, answer) batches in the benchmark's chat format."""

    def __init__(self, model, processor):
        self.tok = processor.tokenizer
        self.processor = processor
        self.video_id = model.config.video_token_id
        self.embed = model.model.language_model.embed_tokens
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt with ONE ``<video>`` token (the processor expands it to every video token)."""
        if question not in self._cache:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question + SHORT_ANSWER}]}],
                add_generation_prompt=True, tokenize=False)
            self._cache[question] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[question]

    def __call__(self, projected: torch.Tensor, qs: list[str], answers: list[str] | None,
                 keep: list[torch.Tensor] | None = None):
        """``projected`` ``[B, N, D]`` video tokens; ``keep``: sorted token indices per sample (placed at their
        full-sequence positions). Returns embeds ``[B, L, D]``, mask, labels ``[B, L]``, positions ``[B, L]``,
        first-answer-token positions ``[B]`` (right padding), all on ``projected``'s device."""
        dev = projected.device
        rows, labels, positions, answer_pos = [], [], [], []
        n = projected.shape[1]
        for b, q in enumerate(qs):
            ids = self.prompt_ids(q)
            cut = ids.index(self.video_id)
            ans = self.tok(answers[b], add_special_tokens=False)["input_ids"] + [self.end] if answers else []
            pre, post = torch.tensor(ids[:cut]), torch.tensor(ids[cut + 1:] + ans)
            toks = torch.arange(n) if keep is None else keep[b]
            rows.append(torch.cat([self.embed(pre.to(dev)), projected[b, toks.to(dev)], self.embed(post.to(dev))]))
            positions.append(torch.cat([torch.arange(cut), cut + toks, cut + n + torch.arange(len(post))]))
            n_prompt = len(pre) + len(toks) + len(ids) - cut - 1
            lab = torch.full((rows[-1].shape[0],), -100)
            if answers:
                lab[n_prompt:] = torch.tensor(ans)
            labels.append(lab)
            answer_pos.append(n_prompt - 1)
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[1], device=dev)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        lab = torch.full((len(rows), length), -100)
        pos = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (r, l, p) in enumerate(zip(rows, labels, positions)):
            k = r.shape[0]
            embeds[b, :k], mask[b, :k], lab[b, :k], pos[b, :k] = r, 1, l, p
        return embeds, mask.to(dev), lab.to(dev), pos.to(dev), torch.tensor(answer_pos, device=dev)


@torch.no_grad()
def first_token_accuracy(model, batcher, feats, items, batch: int = 32) -> tuple[float, dict[str, float]]:
    """Share of ``items`` ``[(feature index, question, answer, kind)]`` whose greedy first answer token is the
    reference's, overall and per kind."""
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        dev = model.lm_head.weight.device
        # fp32 before the stack: under CPU bf16 autocast a stack of fp16 features is an error
        projected = model.model.multi_modal_projector(torch.stack([feats[c[0]].flatten(0, 1).float() for c in chunk]).to(dev))
        embeds, mask, _, pos, at = batcher(projected, [c[1] for c in chunk], None)
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        pred = model.lm_head(out[torch.arange(len(chunk)), at]).argmax(-1)
        gold = [batcher.tok(c[2], add_special_tokens=False)["input_ids"][0] for c in chunk]
        for c, p, g in zip(chunk, pred.tolist(), gold):
            hits.setdefault(c[3], []).append(p == g)
    per_kind = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), per_kind


def load_lora_only(model, path: Path) -> int:
    """Copy the LoRA pairs of an exported file (e.g. the image demo's) into peft's adapters; returns how many."""
    from safetensors.torch import load_file

    from .demo import split_trained

    _, lora = split_trained(load_file(str(path)))
    modules = dict(model.model.language_model.named_modules())
    with torch.no_grad():
        for name, (down, up) in lora.items():
            m = modules[name]
            m.lora_A["default"].weight.copy_(down)
            m.lora_B["default"].weight.copy_(up / m.scaling["default"])
    return len(lora)


def rules(n_test: int, frames: int, n_prior: int = 3000, single_frame: int = 0, batch: int = 8,
          out: Path | None = None) -> dict:
    """The two reference rules on the first ``n_test`` test questions (``frames`` frames), per kind.

    * image-blind: each template's most frequent answer over ``n_prior`` train questions
      (:func:`~tokenprune.benchmarks.tasks.shapes_video.answer_prior` / ``blind_answer``);
    * single-frame (``single_frame`` > 0: on the first that many test questions): the shipped demo
      shown only the middle frame ``T // 2``, repeated ``T`` times (the layout it was trained on: a static
      video of one moment), answered through the adapter's ``generate`` with the benchmark's prompt.
    """
    from ..benchmarks.tasks.metrics import normalize_exact
    from ..benchmarks.tasks.shapes_video import answer_prior, blind_answer
    from ..media import Video
    from .demo_video import FRAME_SIZE

    test = [make_question("test", i, frames) for i in range(n_test)]
    prior = answer_prior([(q.question, q.answer) for _, q in questions("train", n_prior, frames)])
    result: dict = {"n": n_test, "blind": {}, "single_frame": {}}
    for kind in KINDS + ("all",):
        rows = [q for _, q in test if kind in ("all", q.kind)]
        result["blind"][kind] = sum(blind_answer(q.question, prior) == q.answer for q in rows) / len(rows)
    if single_frame:
        import tokenprune as tp

        lvlm = tp.load("tokenprune-demo-video")
        hits: dict[str, list[bool]] = {}
        for i in range(0, single_frame, batch):
            chunk = test[i:i + batch]
            videos = []
            for scene, _ in chunk:
                f = render(scene, FRAME_SIZE)
                videos.append(Video.from_frames(np.repeat(f[frames // 2][None], frames, 0), fps=4.0))
            texts = lvlm.generate(videos, [q.question + SHORT_ANSWER for _, q in chunk], max_new_tokens=4).texts
            for (_, q), t in zip(chunk, texts):
                hits.setdefault(q.kind, []).append(normalize_exact(t.split("\n")[0]) == normalize_exact(q.answer))
            print(f"  single-frame {i + len(chunk)}/{single_frame}", flush=True)
        result["single_frame"] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        result["single_frame"]["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
        result["single_frame_n"] = single_frame
    print(json.dumps(result, indent=1))
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def description_loss(projected: torch.Tensor, codes: torch.Tensor, table: torch.Tensor,
                     background_weight: float = 0.2, scale: float = 20.0) -> torch.Tensor:
    """Cross-entropy of each token's scaled cosine similarity to every row of ``table`` (``[K + 1, D]``: the
    colour-shape descriptions, then background) against its label ``codes``; ``projected`` ``[B, N, D]``,
    ``codes`` ``[B, N]``. Background, ~85% of the tokens, weighs ``background_weight``.

    Why, beside the MSE of :func:`~tokenprune.zoo.train_demo.alignment_loss`: a regression onto the mean of a
    colour's and a shape's word embeddings is satisfied, for a token it cannot place, by the average of the
    candidates; it left shape at chance (``token_probe``) although a probe on the same features reads it.
    The cross-entropy pushes each token to its own description and away from the others'.
    """
    logits = scale * (torch.nn.functional.normalize(projected.float(), dim=-1)
                      @ torch.nn.functional.normalize(table.float(), dim=-1).T)
    weight = torch.ones(len(table), device=projected.device)
    weight[-1] = background_weight
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten(), weight=weight)


@torch.no_grad()
def token_probe(projected: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> dict[str, float]:
    """What the projected video tokens say, read as the alignment stage's words: each token's nearest (cosine)
    row of ``table`` (``[len(DESCRIPTIONS) + 1, D]``: every colour-shape description, then background) against
    its label ``codes`` (:func:`token_labels`). ``projected`` ``[N, T*m, D]``, ``codes`` ``[N, T*m]``.

    Returns, over the tokens showing an actor: ``description`` (colour and shape right), ``colour``, ``shape``,
    ``read_as_background``; and ``background`` (background tokens read as background). Why: the LLM can only
    answer from what the tokens carry; a shape at chance here caps every question that names a shape.
    """
    nearest = (torch.nn.functional.normalize(projected.float(), dim=-1)
               @ torch.nn.functional.normalize(table.float(), dim=-1).T).argmax(-1)
    bg = len(DESCRIPTIONS)
    shows = codes < bg
    pred, gold = nearest[shows].tolist(), codes[shows].tolist()
    part = lambda i, k: DESCRIPTIONS[i][k] if i < bg else BACKGROUND  # noqa: E731
    n = max(len(gold), 1)
    return {"actor_tokens": float(len(gold)),
            "description": sum(p == g for p, g in zip(pred, gold)) / n,
            "colour": sum(part(p, 0) == part(g, 0) for p, g in zip(pred, gold)) / n,
            "shape": sum(part(p, 1) == part(g, 1) for p, g in zip(pred, gold)) / n,
            "read_as_background": sum(p == bg for p in pred) / n,
            "background": float((nearest[~shows] == bg).float().mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo-video-train")
    parser.add_argument("--log", default=None, help="JSON lines log (default <work>/log.jsonl)")
    parser.add_argument("--train", type=int, default=2400, help="train questions (one scene each)")
    parser.add_argument("--val", type=int, default=300, help="val questions for checkpoint choice")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8, help="questions per full step")
    parser.add_argument("--batch-short", type=int, default=16, help="questions per focal step")
    parser.add_argument("--full-every", type=int, default=3)
    parser.add_argument("--focal-others", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--init-lora", default=None, help="start the LoRA from this exported file (the image demo's)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--align-steps", type=int, default=500)
    parser.add_argument("--align-batch", type=int, default=32)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--align-loss", choices=["mse", "mse+ce"], default="mse",
                        help="alignment objective: MSE to the word targets, or that plus description_loss")
    parser.add_argument("--place-halves", action="store_true",
                        help="place words by side (left or right, up or down of the middle), not mixed by x and y")
    parser.add_argument("--place-line-sides", action="store_true",
                        help="with --place-halves: left / right of the scene's crossings line where it has one "
                             "(x_splits), so crossings can be read as changes of word")
    parser.add_argument("--place-actors-only", action="store_true",
                        help="place words on the tokens that show an actor only (the others carry none)")
    parser.add_argument("--place-weight", type=float, default=0.0,
                        help="add this x the place words of token_places to every alignment target (0: none)")
    parser.add_argument("--place-loss-weight", type=float, default=0.0,
                        help="with --place-halves: add this x place_loss (which halves target a token with a place "
                             "is nearest) to the alignment objective")
    parser.add_argument("--actor-weight", type=float, default=1.0,
                        help="weight of the tokens that show an actor in the alignment MSE (1: every token alike)")
    parser.add_argument("--aux-share", type=float, default=0.0,
                        help="share of answer-stage questions swapped for one of the same scene's aux_questions")
    parser.add_argument("--aux-kinds", default=None,
                        help="comma-separated aux kinds to ask (default: all of aux_questions' kinds)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="LLM forward/backward and val under bf16 autocast")
    parser.add_argument("--device", default="cpu",
                        help="where the model trains (cpu, cuda, cuda:1); cached features stay in host memory and "
                             "travel a batch at a time")
    parser.add_argument("--export", default=None, help="write the best projector + LoRA here (safetensors, fp16)")
    parser.add_argument("--rules", type=int, default=0,
                        help="instead of training: the image-blind and single-frame rules on this many test questions")
    parser.add_argument("--single-frame", type=int, default=0, help="with --rules: test questions for the single-frame rule")
    parser.add_argument("--probe", action="store_true",
                        help="instead of training: token_probe of the --work checkpoint's projector on the cached val features")
    args = parser.parse_args(argv)
    if args.place_line_sides and not args.place_halves:
        parser.error("--place-line-sides splits the halves of --place-halves; add --place-halves")
    if args.place_loss_weight and not (args.place_halves and args.place_weight):
        parser.error("--place-loss-weight asks for the halves targets; add --place-halves and a --place-weight")
    if args.rules:
        rules(args.rules, args.frames, single_frame=args.single_frame, out=Path(args.log) if args.log else None)
        return

    from safetensors.torch import save_file

    from .demo_video import FRAME_SIZE, build_demo_video

    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else work / "log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch sees no CUDA device; use --device cpu")
    model, processor = build_demo_video(weights=None)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    add_lora(model.model.language_model, args.lora_rank, 2.0 * args.lora_rank)
    model.to(device)
    lora_params = [p for n, p in model.model.language_model.named_parameters() if "lora_" in n]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    size = FRAME_SIZE
    cells = size // 14 // model.config.spatial_pool_stride

    t0 = time.time()
    train = questions("train", args.train, args.frames)
    val = questions("val", args.val, args.frames)
    print(f"{len(train)} train / {len(val)} val questions generated ({time.time() - t0:.0f} s)", flush=True)
    tag = f"{size}px_{args.frames}f_{model.config.vision_config.num_hidden_layers}l"
    feats = cache_features(model, processor, [s for s, _ in train], size, work / f"features_train_{args.train}_{tag}.pt")
    val_feats = cache_features(model, processor, [s for s, _ in val], size, work / f"features_val_{args.val}_{tag}.pt")
    labels = [token_labels(s, size, cells) for s, _ in train]
    lines = [line_tokens(s, size, cells) for s, _ in train]
    codes = torch.stack([c for c, _ in labels]).to(device)  # [N, T*C]
    shows_actor = torch.stack([s for _, s in labels])  # [N, T*C] bool
    shows = shows_actor.to(device).float()  # 1 where a token shows an actor (--actor-weight)
    embed = model.model.language_model.embed_tokens
    words, table = target_words(embed, processor.tokenizer)  # table [16, D]
    print(f"labels: {float(shows.mean()):.3f} of tokens show an actor", flush=True)

    places = torch.stack([token_places(s, size, cells) for s, _ in train]) if args.place_weight else None
    if places is not None and args.place_actors_only:  # a background token's place would drown an actor's
        places[~shows_actor] = float("nan")
    places = places.to(device) if places is not None else None
    splits = x_splits([s for s, _ in train]).to(device) if args.place_line_sides else None
    aux_kinds = set(args.aux_kinds.split(",")) if args.aux_kinds else None

    def scene_aux(scene: VideoScene) -> list[tuple[str, str, str]]:
        return [x for x in aux_questions(scene) if aux_kinds is None or x[2] in aux_kinds]

    aux = [pick_aux(scene_aux(s)) for s, _ in train] if args.aux_share else None
    val_aux = []  # one aux question a val scene, seeded by its index: logged, never used to pick a checkpoint
    for i, (scene, _) in enumerate(val if args.aux_share else []):
        draw = pick_aux(scene_aux(scene))
        if draw is not None:
            val_aux.append((i, *draw(random.Random(i))))

    def split_at(idx: list[int]) -> torch.Tensor | float:
        """Where left / right split for videos ``idx``: their lines (``--place-line-sides``) or the middle."""
        return 0.5 if splits is None else splits[idx]

    def targets(idx: list[int]) -> torch.Tensor:
        """``[B, T*m, D]``: each token's description (+ ``--place-weight`` x its place words)."""
        out = table[codes[idx]]
        if places is not None:
            out = out + args.place_weight * place_vectors(places[idx], words, args.place_halves, split_at(idx))
        return out

    def align_objective(projected: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The alignment loss of ``--align-loss`` for ``projected`` ``[B, T*m, D]`` of training videos ``idx``
        (+ ``--place-loss-weight`` x :func:`place_loss`)."""
        if args.actor_weight == 1.0:
            loss = alignment_loss(projected, targets(idx))
        else:
            loss = weighted_alignment_loss(projected, targets(idx), 1.0 + (args.actor_weight - 1.0) * shows[idx])
        if args.align_loss == "mse+ce":
            loss = loss + description_loss(projected, codes[idx], table)
        if args.place_loss_weight:
            sides = place_sides(places[idx], split_at(idx))
            loss = loss + args.place_loss_weight * place_loss(projected, codes[idx], sides, table, words,
                                                                 args.place_weight)
        return loss

    def evaluate(step: int, loss: float, stage: str) -> float:
        projector.eval()
        items = [(i, q.question, q.answer, q.kind) for i, (_, q) in enumerate(val)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            acc, per_kind = first_token_accuracy(model, batcher, val_feats, items)
            aux_acc, aux_kind = first_token_accuracy(model, batcher, val_feats, val_aux) if args.aux_share else (None, {})
        projector.train()
        with log_path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "loss": loss, "val_first_token_acc": acc,
                                "per_kind": per_kind, "aux_acc": aux_acc, "aux_per_kind": aux_kind,
                                "time": time.strftime("%H:%M:%S")}) + "\n")
        print(f"eval step {step}: val first-token accuracy {acc:.3f} " +
              " ".join(f"{k} {v:.2f}" for k, v in {**per_kind, **aux_kind}.items()), flush=True)
        return acc

    batcher = VideoBatcher(model, processor)
    ckpt, aligned = work / "checkpoint.pt", work / "aligned.pt"
    if args.probe:
        source = ckpt if ckpt.exists() else aligned
        if not source.exists():
            raise SystemExit(f"--probe: {work} holds no aligned.pt or checkpoint.pt; run the training command "
                             "with this --work first")
        state = torch.load(source, map_location=device)
        if source == ckpt:
            model.load_state_dict(state["trainable"], strict=False)
        else:
            projector.load_state_dict(state)
        val_codes = torch.stack([token_labels(s, size, cells)[0] for s, _ in val])
        with torch.no_grad():
            result = token_probe(projector(val_feats.flatten(1, 2).to(device).float()), val_codes.to(device), table)
        print(json.dumps({"checkpoint": str(source), "step": state["step"] if source == ckpt else 0, **result}, indent=1))
        return
    if not ckpt.exists() and not aligned.exists():
        print(f"stage 1: aligning video tokens to word embeddings, {args.align_steps} steps", flush=True)
        opt = torch.optim.AdamW(projector.parameters(), lr=args.align_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.align_steps)))
        rng = random.Random(args.seed)
        for s in range(1, args.align_steps + 1):
            idx = rng.sample(range(len(train)), args.align_batch)
            loss = align_objective(projector(feats[idx].flatten(1, 2).to(device).float()), idx)
            optimiser_step(loss, opt, sched)
            if s % 100 == 0:
                print(f"align step {s}/{args.align_steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        torch.save(projector.state_dict(), aligned)
        if args.init_lora:
            print(f"LoRA started from {args.init_lora}: {load_lora_only(model, Path(args.init_lora))} pairs", flush=True)
        evaluate(0, float("nan"), "align")

    groups = [{"params": list(projector.parameters()), "lr": args.lr}, {"params": lora_params, "lr": args.lora_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    step, best = 0, -1.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], state["best"]
        print(f"resumed at step {step} (best val accuracy {best:.3f})", flush=True)
        if state.get("val") != args.val:  # a best from other val questions is no bar for these: measure anew
            print(f"the checkpoint's best was chosen on {state.get('val', 'unrecorded')} val questions, this run's "
                  f"on {args.val}: the resumed weights are the bar", flush=True)
            best = evaluate(step, float("nan"), "resume")
    else:
        projector.load_state_dict(torch.load(aligned, map_location=device))
        if args.init_lora:
            load_lora_only(model, Path(args.init_lora))

    def is_short(s: int) -> bool:
        return (s + 1) % args.full_every != 0

    def batch_size(s: int) -> int:
        return args.batch_short if is_short(s) else args.batch

    perms: dict[int, list[int]] = {}

    def item(n: int) -> int:
        """The n-th question of the run: epochs shuffled by seed + epoch (the same batches whatever the resume point)."""
        epoch, offset = divmod(n, len(train))
        if epoch not in perms:
            perms[epoch] = list(range(len(train)))
            random.Random(args.seed + epoch).shuffle(perms[epoch])
        return perms[epoch][offset]

    print(f"stage 2: answer loss (+ {args.align_weight} x alignment), {args.steps} steps; {args.full_every - 1} of "
          f"every {args.full_every} focal ({args.batch_short} questions), the others all tokens ({args.batch})", flush=True)
    consumed = sum(batch_size(s) for s in range(step))
    t1 = time.time()
    while step < args.steps:
        idx = [item(consumed + j) for j in range(batch_size(step))]
        consumed += len(idx)
        keep = None
        if is_short(step):
            rng = random.Random(args.seed * 1_000_003 + step)
            keep = [focal_tokens(labels[i][1], lines[i], args.focal_others, rng) for i in idx]
        qa = [(train[i][1].question, train[i][1].answer) for i in idx]
        if aux is not None:  # the same scene, a one-frame read instead of its question
            rng_aux = random.Random(args.seed * 7_000_003 + step)
            qa = [aux[i](rng_aux)[:2] if aux[i] and rng_aux.random() < args.aux_share else x for i, x in zip(idx, qa)]
        projected = projector(feats[idx].flatten(1, 2).to(device).float())  # [B, T*m, D]
        embeds, mask, lab, pos, _ = batcher(projected, [x[0] for x in qa], [x[1] for x in qa], keep)
        loss_answer = answer_loss(model, embeds, mask, lab, pos, args.bf16)
        loss = loss_answer + args.align_weight * align_objective(projected, idx)
        optimiser_step(loss, opt, sched, list(trainable.values()))
        step += 1
        if step % 5 == 0:
            print(f"step {step}/{args.steps} answer loss {loss_answer.item():.4f} total {loss.item():.4f} "
                  f"{(time.time() - t1) / 5:.1f} s/step", flush=True)
            t1 = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step, loss_answer.item(), "answer")
            improved = acc > best
            best = max(best, acc)
            torch.save({"trainable": {n: p.detach().clone() for n, p in trainable.items()}, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step, "best": best, "val": args.val}, ckpt)
            if improved and args.export:
                Path(args.export).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.to(torch.float16).cpu() for k, v in trained_tensors(model).items()}, args.export)
                print(f"  exported to {args.export}", flush=True)


if __name__ == "__main__":
    main()
