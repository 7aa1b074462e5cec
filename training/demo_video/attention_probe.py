"""Where does the answer position look? For val questions about one named object, the share of the answer
position's attention (mean over heads, per layer) that lands on the tokens showing that object, against the
share those tokens are of the video. Run on a --work checkpoint:

    python training/demo_video/attention_probe.py runs/demo-video-train-v4/checkpoint.pt aux_x
    python training/demo_video/attention_probe.py runs/demo-video-train-v4/checkpoint.pt static_control

(``aux_*``: the trainer's one-frame reads; ``static_control``: its "what color is the <shape>?" half.)
"""
import random
import re
import sys

import numpy as np
import torch

from tokenprune.benchmarks.tasks.shapes_video import SHAPES
from tokenprune.zoo.demo_video import build_demo_video
from tokenprune.zoo.train_demo import add_lora
from tokenprune.zoo.train_demo_video import VideoBatcher, aux_questions, covering_actor, pick_aux, questions

torch.set_num_threads(1)
ckpt, kind = sys.argv[1], sys.argv[2]
model, processor = build_demo_video(weights=None)
add_lora(model.model.language_model, 8, 16.0)
model.load_state_dict(torch.load(ckpt)["trainable"], strict=False)
model.model.language_model.set_attn_implementation("eager")
val = questions("val", 240, 10)
feats = torch.load("runs/demo-video-train-v3/features_val_240_112px_10f_4l.pt")
batcher = VideoBatcher(model, processor)
items = []  # (feature index, question, target actor index)
for i, (scene, q) in enumerate(val):
    if kind.startswith("aux"):
        draw = pick_aux(aux_questions(scene))
        picks = [draw(random.Random(i * 100 + k)) for k in range(20)] if draw else []
        picks = [p for p in picks if p[2] == kind]
        if not picks:
            continue
        colour, shape = re.match(r"(?:is|in how many frames is) the (\w+) (\w+)", picks[0][0]).groups()
        target = next(a for a, actor in enumerate(scene.actors) if actor.colour == colour and actor.shape == shape)
        items.append((i, picks[0][0], target))
    elif q.kind == kind and any(f"the {s}?" in q.question for s in SHAPES):
        items.append((i, q.question, q.targets[0]))
items = items[:24]
on_target, share = [], []
with torch.no_grad():
    for i, question, target in items:
        best, shows = covering_actor(val[i][0], 112, 4)
        mask = torch.from_numpy((best == target) & shows).flatten()  # [T*16]
        projected = model.model.multi_modal_projector(feats[i].flatten(0, 1).float()[None])
        embeds, attn_mask, _, pos, at = batcher(projected, [question], None)
        cut = batcher.prompt_ids(question).index(model.config.video_token_id)
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=attn_mask, position_ids=pos,
                                         output_attentions=True)
        rows = torch.stack([a[0, :, int(at[0]), cut:cut + 160].mean(0) for a in out.attentions])  # [layers, 160]
        on_target.append((rows[:, mask].sum(-1) / rows.sum(-1).clamp_min(1e-9)).numpy())
        share.append(float(mask.float().mean()))
on_target = np.stack(on_target)
print(f"{kind}: {len(items)} questions; target tokens are {np.mean(share):.3f} of the video")
print("share of the video attention on the target, by layer:", " ".join(f"{v:.2f}" for v in on_target.mean(0)))
