"""Train the demo model's projector on easy-VQA (frozen DINOv2 and SmolLM2). Seeded and resumable.

    python -m tokenprune.zoo.train_demo --work runs/demo-train --steps 700 \
        --export tokenprune/zoo/weights/demo_projector.safetensors

DINOv2 features of every image are computed once and cached in ``--work``. Each step feeds a
batch of (image features -> projector -> 256 tokens, question) prompts, in exactly the chat format
the benchmark uses, through the frozen LLM; the loss is on the answer tokens only. Every
``--eval-every`` steps: first-answer-token accuracy on questions about held-out train images, a checkpoint
(projector, optimizer, step) in ``--work``, and -- when accuracy improved -- the projector exported.
Rerunning the same command resumes from the last checkpoint.

Two stages, because a frozen 30-layer LLM passes back too weak a signal to 256 image tokens for
CPU-sized training runs (answer loss alone sat at the answer prior for 200 steps):

1. **Alignment** (``--align-steps``, no LLM pass, seconds per hundred steps): every patch token is
   regressed onto word embeddings of what the patch shows -- the mean embedding of the shape's
   colour and type words on patches the shape covers, the embedding of "background" elsewhere.
   Colour and type are read off the pixels (easy-VQA draws one flat-coloured shape from a fixed
   palette on a pale background), so every image is labelled and the image tokens stay *local*:
   only the tokens on the shape carry its description, which is what makes pruning matter.
2. **Answer loss** through the frozen LLM (with LoRA), plus ``--align-weight`` x the alignment
   loss so the tokens stay local while the projector learns what the LLM needs. Three steps in
   four are *focal* (:func:`focal_subset`: 48 of the 256 image tokens, at their full-sequence
   positions, for 3x the questions at half the cost); every fourth sees all 256 tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from PIL import Image

from ..benchmarks.tasks.base import SHORT_ANSWER
from ..benchmarks.tasks.shapes_scene import kind_of, patch_objects


def easy_vqa_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, Path]]:
    """``[(question, answer, image_id)]`` and ``{image_id: png path}`` of easy-VQA's ``split``."""
    from .convert import package_file

    root = package_file("easy_vqa", "data")
    questions = [tuple(q) for q in json.loads((root / split / "questions.json").read_text())]
    images = {int(p.stem): p for p in (root / split / "images").glob("*.png")}
    return questions, images


@torch.no_grad()
def cache_features(model, processor, images: dict, path: Path, batch: int = 64) -> dict[int, torch.Tensor]:
    """DINOv2 features ``[256, 384]`` (fp16) of every image at the demo's feature layer, cached on disk.

    ``images``: ``{image id: png path, or a callable returning a PIL image}`` (generated scenes)."""
    if path.exists():
        return torch.load(path)
    from .demo import FEATURE_LAYER

    feats: dict[int, torch.Tensor] = {}
    ids = sorted(images)
    t0 = time.time()
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        pils = [images[j]() if callable(images[j]) else Image.open(images[j]).convert("RGB") for j in chunk]
        pixels = processor.image_processor(pils, return_tensors="pt")
        hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[FEATURE_LAYER]
        for j, h in zip(chunk, hidden[:, 1:]):
            feats[j] = h.to(torch.float16).clone()
        print(f"  features {i + len(chunk)}/{len(ids)} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(feats, path)
    return feats


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}
SHAPES = ("circle", "rectangle", "triangle")


def patch_labels(png: Path, grid: int = 16) -> tuple[str, str, torch.Tensor]:
    """``(colour, shape, on_shape [grid*grid] bool)`` of an easy-VQA image, read off its pixels.

    The shape is every pixel with a channel below 200 (backgrounds are pale, every channel >= 230);
    its colour is the palette entry nearest its median pixel; its type follows from how much of
    its bounding box it fills (triangle ~0.5, circle ~pi/4, rectangle 1). A patch is on the shape
    when at least half of its pixels are.
    """
    import numpy as np

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int64)
    shape_mask = pixels.min(-1) < 200
    rgb = np.median(pixels[shape_mask], axis=0)
    colour = min(COLOURS, key=lambda c: float(((rgb - np.array(COLOURS[c])) ** 2).sum()))
    ys, xs = np.nonzero(shape_mask)
    fill = shape_mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "triangle" if fill < 0.7 else "circle" if fill < 0.95 else "rectangle"
    size = shape_mask.shape[0] // grid
    cover = torch.from_numpy(shape_mask.reshape(grid, size, grid, size).mean(axis=(1, 3)))
    return colour, shape, (cover >= 0.5).flatten()


def word_vector(embed: torch.nn.Embedding, tok, word: str) -> torch.Tensor:
    """Mean input embedding of ``word``'s tokens, with and without a leading space ``[dim]``."""
    ids = tok(word, add_special_tokens=False)["input_ids"] + tok(" " + word, add_special_tokens=False)["input_ids"]
    return embed.weight[ids].mean(0).detach()


class AlignmentTargets:
    """Per-patch target embeddings ``[B, 256, dim]`` of a batch of images.

    Each image is labelled per patch: easy-VQA images (positive ids) from their pixels
    (:func:`patch_labels`), generated ``shapes_scene`` images (negative ids, see :func:`scene_key`)
    from the scene's geometry (:func:`~tokenprune.benchmarks.tasks.shapes_scene.patch_objects`).
    A patch on an object is regressed onto the mean embedding of its colour and shape words, every
    other patch onto "background". ``labels[i] = (description index [256], on_object [256] bool)``;
    ``table[index]`` is the description, ``(colour, shape)`` or, with ``places``, for a scene object
    ``(colour, shape, place)``.

    ``places``: a scene object's patches also carry the embedding of its place words ("top left",
    ..., the layout cell it sits in), so the description says where the object is, as well as what.
    Why: place and relation questions otherwise need the LLM to decode an absolute patch position
    from rotary position ids, which a rank-8 LoRA learnt slowly (v2: place 0.75, relation 0.67,
    while the colour and shape of each object decode from its tokens at 0.98). The place is what
    the patch shows -- DINOv2's features carry their position -- so the projector can learn it.
    """

    def __init__(self, images: dict[int, Path], embed: torch.nn.Embedding, tok, scenes: dict | None = None,
                 places: bool = False):
        from ..benchmarks.tasks.shapes_scene import PLACES

        words = [*COLOURS, *SHAPES, "background", *(PLACES.values() if places else ())]
        self.words = {w: word_vector(embed, tok, w) for w in words}
        self.table: list[tuple[str, ...]] = [(c, s) for c in COLOURS for s in SHAPES]
        if places:
            self.table += [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES.values()]
        described = [sum(self.words[w] for w in d) / len(d) for d in self.table]
        self.vectors = torch.stack(described + [self.words["background"]])  # [n_descriptions + 1, dim]
        background = len(self.table)
        self.labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, p in images.items():
            colour, shape, on_shape = patch_labels(p)
            index = torch.full((on_shape.numel(),), background)
            index[on_shape] = self.table.index((colour, shape))
            self.labels[i] = (index, on_shape)
        for i, scene in (scenes or {}).items():
            owner = torch.from_numpy(patch_objects(scene)).long()
            described = [(o.colour, o.shape, PLACES[o.cell]) if places else (o.colour, o.shape) for o in scene.objects]
            codes = torch.tensor([self.table.index(d) for d in described] + [background])
            self.labels[i] = (codes[owner], owner >= 0)  # owner -1 -> the last code, background

    def __call__(self, image_ids: list[int]) -> torch.Tensor:
        return self.vectors[torch.stack([self.labels[i][0] for i in image_ids])]


def scene_key(index: int) -> int:
    """The image id of generated train scene ``index`` (negative: easy-VQA's ids are >= 0)."""
    return -1 - index


def scene_split(split: str, n_scenes: int, per_kind: int) -> tuple[list[tuple[str, str, int]], dict[int, object]]:
    """``n_scenes`` generated ``shapes_scene`` scenes of ``split`` (not the test split) and
    ``per_kind`` questions of each kind per scene: ``([(question, answer, image id)], {image id: scene})``."""
    import random as _random

    from ..benchmarks.tasks.shapes_scene import KINDS, ask, make_scene

    questions, scenes = [], {}
    for i in range(n_scenes):
        rng = _random.Random(f"shapes_scene/{split}/{i}")
        scene = make_scene(rng)
        scenes[scene_key(i)] = scene
        for _ in range(per_kind):
            for kind in KINDS:
                q, a = ask(scene, kind, rng)
                questions.append((q, a, scene_key(i)))
    return questions, scenes


def keep_kinds(questions: list[tuple[str, str, int]], weights: dict[str, float],
               seed: int = 0) -> list[tuple[str, str, int]]:
    """Subsample scene ``questions`` by kind: a kind with weight ``w`` in (0, 1] keeps a seeded
    ``w`` share of its questions (at least one), unnamed kinds keep all. Why: once a kind is
    solved (presence sits at 1.00) its questions only dilute the steps the hard kinds need."""
    from ..benchmarks.tasks.shapes_scene import KINDS, kind_of

    unknown = sorted(set(weights) - set(KINDS))
    bad = sorted(k for k, w in weights.items() if not 0 < w <= 1)
    if unknown or bad:
        raise ValueError(f"scene kind weights: unknown kinds {unknown} or weights outside (0, 1] {bad}; "
                         f"kinds are {', '.join(KINDS)}")
    rng = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    for n, q in enumerate(questions):
        by_kind.setdefault(kind_of(q[0]), []).append(n)
    keep = set()
    for kind, rows in by_kind.items():
        w = weights.get(kind, 1.0)
        keep.update(rows if w >= 1 else rng.sample(rows, max(1, round(w * len(rows)))))
    return [q for n, q in enumerate(questions) if n in keep]


def focal_subset(on_shape: torch.Tensor, n_keep: int, rng: random.Random) -> torch.Tensor:
    """Sorted patch indices ``[n_keep]``: up to 3/4 of them on the shape (all of its patches when
    it has fewer), the rest background, each part drawn at random.

    Why: the LLM pass over 256 image tokens is what a CPU training step costs. A step on ~48 tokens
    that still hold the whole answer (the shape, and enough background to say where it is not) is
    ~4x cheaper, so the LoRA sees ~4x more questions in the same time -- enough to learn the
    yes/no comparisons that 256-token steps had not taught after 200 steps. The tokens keep their
    positions in the full sequence, like a pruned prompt; full-length steps in between keep the
    model calibrated for unpruned input (see ``--full-every``).
    """
    on = on_shape.nonzero().flatten().tolist()
    off = (~on_shape).nonzero().flatten().tolist()
    n_on = min(len(on), n_keep - n_keep // 4)
    picked = rng.sample(on, n_on) + rng.sample(off, min(len(off), n_keep - n_on))
    return torch.tensor(sorted(picked))


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between projected tokens and targets, relative to the targets' variance (scale-free)."""
    return torch.nn.functional.mse_loss(projected, target) / target.var()


class Batcher:
    """Builds ``inputs_embeds`` / labels for (image tokens, question, answer) batches, in the chat format."""

    def __init__(self, model, processor):
        self.model = model
        self.tok = processor.tokenizer
        self.processor = processor
        self.image_id = model.config.image_token_id
        self.embed = model.model.language_model.embed_tokens
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, question: str) -> list[int]:
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + SHORT_ANSWER}]}],
            add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, projected: torch.Tensor, questions: list[str], answers: list[str] | None,
                 keep: list[torch.Tensor] | None = None):
        """``projected``: image tokens ``[B, 256, D]`` (projector output, so callers reuse it for the
        alignment loss); ``keep``: optional sorted patch indices per sample -- only those image
        tokens are placed, at the positions they have in the full sequence (gaps where the others
        were, as a pruned prompt at inference). Returns embeds ``[B, L, D]``, mask ``[B, L]``,
        labels ``[B, L]``, position ids ``[B, L]`` and the first-answer-token positions ``[B]``."""
        rows, labels, positions, answer_pos = [], [], [], []
        n_image = projected.shape[1]
        for b, q in enumerate(questions):
            ids = self.prompt_ids(q)
            cut = ids.index(self.image_id)
            ans = self.tok(answers[b], add_special_tokens=False)["input_ids"] + [self.end] if answers else []
            pre, post = torch.tensor(ids[:cut]), torch.tensor(ids[cut + 1:] + ans)
            patches = torch.arange(n_image) if keep is None else keep[b]
            emb = torch.cat([self.embed(pre), projected[b, patches], self.embed(post)])
            pos = torch.cat([torch.arange(cut), cut + patches, cut + n_image + torch.arange(len(post))])
            n_prompt = len(pre) + len(patches) + len(ids) - cut - 1
            lab = torch.full((emb.shape[0],), -100)
            if answers:
                lab[n_prompt:] = torch.tensor(ans)
            rows.append(emb)
            labels.append(lab)
            positions.append(pos)
            answer_pos.append(n_prompt - 1)  # the position whose logits predict the first answer token
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        lab = torch.full((len(rows), length), -100)
        pos_ids = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (r, l, p) in enumerate(zip(rows, labels, positions)):  # right padding
            n = r.shape[0]
            embeds[b, :n], mask[b, :n], lab[b, :n], pos_ids[b, :n] = r, 1, l, p
        return embeds, mask, lab, pos_ids, torch.tensor(answer_pos)


def asks_present(question: str, answer: str) -> bool | None:
    """For a yes/no question, whether the colour or shape it names is in the image; else ``None``.

    easy-VQA's yes/no templates negate with "not" (``is there not a ...``, ``does the image not
    contain ...``) or "is no ..."; the answer flips with the negation.
    """
    if answer not in ("yes", "no"):
        return None
    negated = " not " in f" {question} " or question.startswith("is no ")
    return (answer == "yes") != negated


def presence_balanced(questions: list[tuple[str, str, int]]) -> list[int]:
    """Indices of ``questions`` with the "present" yes/no questions repeated to match the "absent" ones.

    One shape per image makes 82% of easy-VQA's yes/no questions ask about something absent, so
    "absent" (``no``, or ``yes`` when negated) is a prior that scores 0.81 on yes/no without looking
    at the image -- and the first run learnt exactly that (every "present" question wrong at step
    200). Balanced, the prior scores 0.5 and the loss rewards comparing the question with the image.
    """
    present = [i for i, (q, a, _) in enumerate(questions) if asks_present(q, a) is True]
    absent = sum(1 for q, a, _ in questions if asks_present(q, a) is False)
    repeats = max(1, round(absent / max(len(present), 1)))
    return list(range(len(questions))) + present * (repeats - 1)


@torch.no_grad()
def first_token_accuracy(model, batcher, feats, questions, batch: int = 32) -> float:
    """Share of questions whose greedy first answer token is the reference's first token."""
    kinds: dict[str, list[bool]] = {}
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        projected = model.model.multi_modal_projector(torch.stack([feats[q[2]].float() for q in chunk]))
        embeds, mask, _, pos_ids, pos = batcher(projected, [q[0] for q in chunk], None)
        logits = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=pos_ids).last_hidden_state
        pred = model.lm_head(logits[torch.arange(len(chunk)), pos]).argmax(-1)
        gold = torch.tensor([batcher.tok(q[1], add_special_tokens=False)["input_ids"][0] for q in chunk])
        for q, hit in zip(chunk, (pred == gold).tolist()):
            if q[2] < 0:  # a generated scene: its question kind
                kind = f"scene {kind_of(q[0])}"
            else:
                present = asks_present(q[0], q[1])
                kind = ("yes/no, present" if present else "yes/no, absent") if present is not None else \
                    "colour" if q[1] in COLOURS else "shape"
            kinds.setdefault(kind, []).append(hit)
    print("  first-token accuracy by answer kind: " + ", ".join(
        f"{k} {sum(v) / len(v):.2f} (n={len(v)})" for k, v in sorted(kinds.items())), flush=True)
    easy = [h for k, v in kinds.items() if not k.startswith("scene") for h in v]
    scene = [h for k, v in kinds.items() if k.startswith("scene") for h in v]
    # Checkpoints are chosen on the mean of the two tasks' accuracies (each counts alike).
    parts = [sum(v) / len(v) for v in (easy, scene) if v]
    if len(parts) == 2:
        print(f"  easy-VQA {parts[0]:.3f}, shapes_scene {parts[1]:.3f}", flush=True)
    return sum(parts) / len(parts)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def answer_loss(model, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                bf16: bool) -> torch.Tensor:
    """Cross-entropy of the answer tokens (``labels`` ``[B, L]``, -100 elsewhere) given ``embeds``
    ``[B, L, D]``. Vocabulary logits only where an answer token is predicted (2-3 of ~283 positions):
    the LM head over every position would cost more than the whole projector."""
    target = labels[:, 1:]
    where = target != -100
    with torch.autocast(embeds.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                          position_ids=position_ids).last_hidden_state
        logits = model.lm_head(out[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), target[where])


def optimiser_step(loss: torch.Tensor, opt, sched, clip: list[torch.Tensor] | None = None) -> None:
    """One update: gradients of ``loss`` (those of ``clip``, if given, clipped to norm 1), then the
    optimiser and the schedule."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def add_lora(language_model, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Low-rank adapters (peft) on the frozen LLM's ``targets`` (default: every attention and MLP
    projection), trainable.

    Why the MLPs too: a yes/no question about presence needs an *equality* between what the
    question names and what the image tokens show; with attention-only LoRA a balanced CPU run sat at
    chance on those questions for 200 steps while learning the open questions.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    inject_adapter_in_model(config, language_model)


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What the demo ships: the projector, and each LoRA pair as ``lora.<module>.down [r, in]`` /
    ``lora.<module>.up [out, r]`` (scaling folded into ``up``), merged into the LLM at load time."""
    out = {f"multi_modal_projector.{k}": v.detach().clone().contiguous()
           for k, v in model.model.multi_modal_projector.state_dict().items()}
    for name, module in model.model.language_model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            out[f"lora.{name}.down"] = module.lora_A["default"].weight.detach().clone().contiguous()
            out[f"lora.{name}.up"] = (module.lora_B["default"].weight * module.scaling["default"]).detach().clone().contiguous()
    return out


def load_exported(model, path: Path) -> None:
    """Start from a file :func:`trained_tensors` wrote: the projector, and each LoRA pair put back
    into peft's ``lora_A`` / ``lora_B`` (the folded scaling divided out again)."""
    from safetensors.torch import load_file

    from .demo import split_trained

    projector, lora = split_trained(load_file(str(path)))
    model.model.multi_modal_projector.load_state_dict(projector)
    modules = dict(model.model.language_model.named_modules())
    for name, (down, up) in lora.items():
        if name not in modules or "default" not in getattr(modules[name], "lora_A", {}):
            raise SystemExit(f"{path} has LoRA for {name}, which this model has no adapter on; "
                             f"use the --lora-rank/--lora-targets it was trained with")
        module = modules[name]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(down)
            module.lora_B["default"].weight.copy_(up / module.scaling["default"])


def align(projector, feats: dict[int, torch.Tensor], targets: AlignmentTargets, steps: int, batch: int,
          lr: float, seed: int) -> None:
    """Stage 1: regress every projected patch token onto its target embedding (no LLM pass)."""
    ids = sorted(i for i in feats if i in targets.labels)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        chunk = rng.sample(ids, batch)
        loss = alignment_loss(projector(torch.stack([feats[i] for i in chunk]).float()), targets(chunk))
        optimiser_step(loss, opt, sched)
        if step % 100 == 0 or step == steps:
            print(f"align step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo-train")
    parser.add_argument("--steps", type=int, default=400, help="answer-loss steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--align-steps", type=int, default=600)
    parser.add_argument("--align-batch", type=int, default=64)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--val-images", type=int, default=300, help="train images held out for checkpoint choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on the LLM (0: none)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="LLM projections that get LoRA")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--focal-tokens", type=int, default=48,
                        help="image tokens on short steps (0: every step sees all 256); see focal_subset")
    parser.add_argument("--batch-short", type=int, default=24, help="questions per short step")
    parser.add_argument("--full-every", type=int, default=4, help="every N-th step sees all 256 image tokens")
    parser.add_argument("--scenes", type=int, default=0,
                        help="generated shapes_scene train scenes mixed in (0: easy-VQA only)")
    parser.add_argument("--scene-questions", type=int, default=3, help="questions of each kind per scene")
    parser.add_argument("--scene-share", type=float, default=0.6, help="share of training questions about scenes")
    parser.add_argument("--val-scenes", type=int, default=200, help="generated scenes for checkpoint choice")
    parser.add_argument("--scene-kind-weights", default="",
                        help="e.g. presence=0.3: keep that share of a kind's train questions (see keep_kinds)")
    parser.add_argument("--scene-places", action="store_true",
                        help="scene objects' alignment targets also name their place (see AlignmentTargets)")
    parser.add_argument("--bf16", action="store_true",
                        help="LLM forward/backward under bfloat16 autocast (master weights fp32; ~2x on CPUs "
                             "with AVX512-BF16 or AMX); checkpoint evaluations in bf16 too, the benchmark stays fp32")
    parser.add_argument("--init", default=None,
                        help="start a new run from an exported file (projector + LoRA) instead of stage 1")
    parser.add_argument("--export", default=None, help="write the best projector (+ LoRA) here (safetensors)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from .demo import build_demo

    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, processor = build_demo(projector=None)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    if args.lora_rank:
        add_lora(model.model.language_model, args.lora_rank, 2.0 * args.lora_rank,
                 tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    lora_params = [p for n, p in model.model.language_model.named_parameters() if "lora_" in n]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    all_q, all_img = easy_vqa_split("train")
    # Checkpoints are chosen on questions about train images never trained on; the test split stays
    # untouched for the benchmark.
    val_images = set(sorted(all_img)[-args.val_images:])
    train_q = [q for q in all_q if q[2] not in val_images]
    eval_q = random.Random(args.seed).sample([q for q in all_q if q[2] in val_images], args.eval_size)
    print(f"easy-VQA train split: {len(train_q)} questions on {len(all_img) - len(val_images)} images to train on; "
          f"checkpoints chosen on {len(eval_q)} questions about {len(val_images)} held-out train images; "
          f"{sum(p.numel() for p in projector.parameters())} projector and {sum(p.numel() for p in lora_params)} "
          f"LoRA parameters", flush=True)
    all_feats = cache_features(model, processor, all_img, work / "features_train.pt")
    scene_q, scenes = [], {}
    if args.scenes:
        from ..benchmarks.tasks.shapes_scene import render

        # Train scenes from the "train" seeds, checkpoint scenes from "val"; the test split (the
        # benchmark's) is never seen. Val ids follow the train ids (all negative, see scene_key).
        scene_q, scenes = scene_split("train", args.scenes, args.scene_questions)
        if args.scene_kind_weights:
            try:
                weights = {k.strip(): float(w) for k, w in
                           (kw.split("=") for kw in args.scene_kind_weights.split(",") if kw.strip())}
                scene_q = keep_kinds(scene_q, weights, args.seed)
            except ValueError as e:
                raise SystemExit(f"--scene-kind-weights {args.scene_kind_weights!r}: {e}; "
                                 f"write it as kind=share,... e.g. presence=0.3") from None
        val_q, val_scenes = scene_split("val", args.val_scenes, 1)
        shift = args.scenes  # val scene i -> image id scene_key(args.scenes + i)
        val_q = [(q, a, i - shift) for q, a, i in val_q]
        val_scenes = {i - shift: sc for i, sc in val_scenes.items()}
        eval_q = eval_q[: args.eval_size // 2] + random.Random(args.seed).sample(val_q, min(len(val_q), args.eval_size // 2))
        every = {**scenes, **val_scenes}
        all_feats.update(cache_features(model, processor, {i: (lambda sc=sc: render(sc)) for i, sc in every.items()},
                                        work / f"features_scenes_{args.scenes}_{args.val_scenes}.pt"))
        print(f"shapes_scene: {len(scene_q)} questions on {len(scenes)} generated train scenes; "
              f"{len(val_q)} checkpoint questions on {len(val_scenes)} val scenes", flush=True)
    train_feats = {i: f for i, f in all_feats.items() if i not in val_images}
    targets = AlignmentTargets({i: p for i, p in all_img.items() if i not in val_images},
                               model.model.language_model.embed_tokens, processor.tokenizer, scenes,
                               places=args.scene_places)
    batcher = Batcher(model, processor)

    def export() -> None:
        if args.export:
            Path(args.export).parent.mkdir(parents=True, exist_ok=True)
            save_file(trained_tensors(model), args.export)

    def evaluate(step: int, loss: float, stage: str) -> float:
        projector.eval()
        # Under --bf16 the checkpoint choice runs in bf16 too (2x faster); the benchmark is fp32.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            acc = first_token_accuracy(model, batcher, all_feats, eval_q)
        projector.train()
        with (work / "log.jsonl").open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "loss": loss, "eval_first_token_acc": acc}) + "\n")
        return acc

    ckpt = work / "checkpoint.pt"
    aligned = work / "aligned.pt"
    if not aligned.exists() and not ckpt.exists() and not args.init:
        print(f"stage 1: aligning patch tokens to word embeddings, {args.align_steps} steps", flush=True)
        align(projector, train_feats, targets, args.align_steps, args.align_batch, args.align_lr, args.seed)
        torch.save(projector.state_dict(), aligned)
        acc = evaluate(0, float("nan"), "align")
        print(f"after alignment: first-token accuracy {acc:.3f}", flush=True)

    groups = [{"params": list(projector.parameters()), "lr": args.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": args.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    step, best = 0, -1.0
    if ckpt.exists():
        state = torch.load(ckpt)
        saved = state["trainable"]
        differ = sorted(n for n, p in trainable.items() if n not in saved or saved[n].shape != p.shape)
        if differ:  # e.g. resuming with another --lora-rank: one line, not a half-restored model
            raise SystemExit(f"{ckpt} does not match this model ({len(differ)} trainable tensors differ, e.g. "
                             f"{differ[0]}); resume with the options it was trained with, or use a new --work")
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], state["best"]
        print(f"resumed at step {step} (best first-token accuracy {best:.3f})", flush=True)
    elif args.init:
        load_exported(model, Path(args.init))
        print(f"started from {args.init}", flush=True)
    else:
        projector.load_state_dict(torch.load(aligned))
    print(f"stage 2: answer loss through the frozen LLM (+ {args.align_weight} x alignment), "
          f"{args.steps} steps of {args.batch}", flush=True)
    order = presence_balanced(train_q)
    if scene_q:
        # Scene questions join the list; easy-VQA's (balanced) are subsampled to the chosen share.
        n_easy = round(len(scene_q) * (1 - args.scene_share) / args.scene_share)
        order = sorted(random.Random(args.seed).sample(order, min(n_easy, len(order))))
        order += list(range(len(train_q), len(train_q) + len(scene_q)))
        train_q = train_q + scene_q
    print(f"yes/no questions about a colour or shape that is present repeated to balance the absent ones: "
          f"{len(order)} questions an epoch", flush=True)
    def is_short(s: int) -> bool:  # step s (0-based) sees a focal subset of the image tokens
        return args.focal_tokens > 0 and (s + 1) % args.full_every != 0

    def batch_size(s: int) -> int:
        return args.batch_short if is_short(s) else args.batch

    perms: dict[int, list[int]] = {}

    def question(n: int) -> tuple[str, str, int]:
        """The n-th question of the run: epochs of ``order``, each shuffled by seed + epoch, so the
        same batches come whatever the resume point."""
        epoch, offset = divmod(n, len(order))
        if epoch not in perms:
            perms[epoch] = order[:]
            random.Random(args.seed + epoch).shuffle(perms[epoch])
        return train_q[perms[epoch][offset]]

    if args.focal_tokens:
        print(f"{args.full_every - 1} of every {args.full_every} steps: {args.batch_short} questions on "
              f"{args.focal_tokens} image tokens (shape + background, full-sequence positions); "
              f"the others: {args.batch} questions on all 256", flush=True)
    t0 = time.time()
    consumed = sum(batch_size(s) for s in range(step))  # questions seen before this step (resume)
    while step < args.steps:
        qs = [question(consumed + j) for j in range(batch_size(step))]
        consumed += len(qs)
        keep = None
        if is_short(step):
            rng = random.Random(args.seed * 1_000_003 + step)
            keep = [focal_subset(targets.labels[q[2]][1], args.focal_tokens, rng) for q in qs]
        projected = projector(torch.stack([train_feats[q[2]] for q in qs]).float())  # [B, 256, D], once
        embeds, mask, labels, pos_ids, _ = batcher(projected, [q[0] for q in qs], [q[1] for q in qs], keep)
        loss_answer = answer_loss(model, embeds, mask, labels, pos_ids, args.bf16)
        loss = loss_answer + args.align_weight * alignment_loss(projected, targets([q[2] for q in qs]))
        optimiser_step(loss, opt, sched, list(trainable.values()))
        step += 1
        if step % 5 == 0:
            print(f"step {step}/{args.steps} answer loss {loss_answer.item():.4f} total {loss.item():.4f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {(time.time() - t0) / 5:.1f} s/step", flush=True)
            t0 = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step, loss_answer.item(), "answer")
            improved = acc > best
            best = max(best, acc)
            torch.save({"trainable": {n: p.detach().clone() for n, p in trainable.items()}, "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "best": best}, ckpt)
            if improved:
                export()
            print(f"eval step {step}: first-token accuracy {acc:.3f} (best {best:.3f})"
                  f"{' -> exported' if improved and args.export else ''}", flush=True)


if __name__ == "__main__":
    main()
