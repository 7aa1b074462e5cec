"""How far can the demo's reader (SmolLM2-135M + LoRA) go when the video tokens are perfect?

Trains only the LLM side -- the rank-8 LoRA started from the image demo's, as the real trainer does (or, with
``--full``, every LLM weight) -- on the alignment *targets* themselves instead of projector outputs: each token
the mean word embedding of the colour and shape of the actor covering its cell ("background" elsewhere),
plus, on actor tokens, its place words (``--place halves``: one side word in x and one in y, as
``--place-halves --place-actors-only``; ``mixed``: left/right and up/down mixed by the true x / y as
``place_vectors``; ``line-sides``: halves, x split at the ``crossings`` line where there is one; ``none``). Same batches as the trainer's answer stage: 3 steps in 4 on the focal tokens
(actors, the line, 8 others), every 4th on all 160; val first-token accuracy on one question per val scene.
This bounds what any projector can give this reader on CPU budgets.

    python training/demo_video/ideal_reader.py --kinds main --steps 1000 --train 6000 --log out.jsonl
    python training/demo_video/ideal_reader.py --kinds aux_x --steps 100 --train 2000
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from tokenprune.zoo.demo_video import FRAME_SIZE, build_demo_video
from tokenprune.zoo.train_demo import add_lora, answer_loss, optimiser_step, trained_tensors
from tokenprune.zoo.train_demo_video import (VideoBatcher, aux_questions, first_token_accuracy, focal_tokens,
                                             line_tokens, load_lora_only, place_vectors, questions, target_words, x_splits,
                                             token_labels, token_places)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--train", type=int, default=3000)
p.add_argument("--val", type=int, default=240)
p.add_argument("--kinds", default="main", help="'main' (the six task kinds) or aux kinds, comma-separated")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--full", action="store_true", help="train every LLM weight instead of the LoRA")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--eval-every", type=int, default=25)
p.add_argument("--place", choices=["halves", "line-sides", "mixed", "none"], default="halves",
               help="line-sides: halves, but left / right of the crossings line where a scene has one (x_splits)")
p.add_argument("--init", default="tokenprune/zoo/weights/demo_projector.safetensors", help="LoRA start (image demo)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", help="where the LLM trains (cpu, cuda); the ideal tokens stay in host memory")
p.add_argument("--log", default=None)
p.add_argument("--export", default=None, help="write the trained LoRA here (fp16, the shipped format): a start "
               "for the real trainer's --init-lora (reader first, then the projector)")
a = p.parse_args()
if a.export and a.full:
    p.error("--export writes a LoRA; with --full there is none (drop one of the two)")
torch.set_num_threads(a.threads)
torch.manual_seed(0)
model, processor = build_demo_video(weights=None)
model.requires_grad_(False)
lm = model.model.language_model
if a.full:
    params = list(lm.parameters())
    for q in params:
        q.requires_grad_(True)
else:
    add_lora(lm, 8, 16.0)
    load_lora_only(model, Path(a.init))
    params = [q for n, q in lm.named_parameters() if "lora_" in n]
model.model.multi_modal_projector = torch.nn.Identity()  # the tokens below are already in the LLM's space
w, table = target_words(lm.embed_tokens, processor.tokenizer)  # on the host, as the tokens built from it
device = torch.device(a.device)
model.to(device)
cells = FRAME_SIZE // 14 // model.config.spatial_pool_stride  # tokens a frame side, as the trainer derives it
kinds = None if a.kinds == "main" else set(a.kinds.split(","))


def build(split: str, n: int):
    """Ideal tokens ``[n, 160, D]``, candidate questions per scene, actor / line token masks."""
    feats, items, shows_all, lines = [], [], [], []
    for i, (scene, q) in enumerate(questions(split, n, 10)):
        codes, shows = token_labels(scene, FRAME_SIZE, cells)
        tokens = table[codes]
        if a.place != "none":
            places = token_places(scene, FRAME_SIZE, cells)
            places[~shows] = float("nan")
            x_split = x_splits([scene])[0] if a.place == "line-sides" else 0.5
            tokens = tokens + place_vectors(places, w, halves=a.place in ("halves", "line-sides"), x_split=x_split)
        feats.append(tokens)
        shows_all.append(shows)
        lines.append(line_tokens(scene, FRAME_SIZE, cells))
        cands = [(q.question, q.answer, q.kind)] if kinds is None else [x for x in aux_questions(scene) if x[2] in kinds]
        items.append([(i, *x) for x in cands])
    return torch.stack(feats), items, shows_all, lines


t0 = time.time()
feats, train_items, shows, lines = build("train", a.train)
val_feats, val_items, _, _ = build("val", a.val)
val = [random.Random(i).choice(x) for i, x in enumerate(val_items) if x]
usable = [i for i, x in enumerate(train_items) if x]
print(f"{len(usable)} train / {len(val)} val scenes ({time.time() - t0:.0f} s)", flush=True)
batcher = VideoBatcher(model, processor)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))


def evaluate(step: int) -> None:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        acc, per_kind = first_token_accuracy(model, batcher, val_feats.unsqueeze(2), val)
    print(f"eval {step}: {acc:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in per_kind.items()), flush=True)
    if a.log:
        with open(a.log, "a") as f:
            f.write(json.dumps({"step": step, "val_first_token_acc": acc, "per_kind": per_kind, "args": vars(a)}) + "\n")


evaluate(0)
rng, t1 = random.Random(0), time.time()
for step in range(1, a.steps + 1):
    idx = rng.sample(usable, a.batch)
    qa = [rng.choice(train_items[i]) for i in idx]
    keep = [focal_tokens(shows[i], lines[i], 8, rng) for i in idx] if step % 4 else None
    embeds, mask, lab, pos, _ = batcher(feats[idx].to(device), [x[1] for x in qa], [x[2] for x in qa], keep)
    loss = answer_loss(model, embeds, mask, lab, pos, True)
    optimiser_step(loss, opt, sched, params)
    if step % 5 == 0:
        print(f"step {step} loss {loss.item():.3f} {(time.time() - t1) / 5:.1f} s/step", flush=True)
        t1 = time.time()
    if step % a.eval_every == 0:
        evaluate(step)
if a.export:
    from safetensors.torch import save_file

    save_file({k: v.to(torch.float16).cpu() for k, v in trained_tensors(model).items()}, a.export)
    print(f"LoRA written to {a.export}", flush=True)
