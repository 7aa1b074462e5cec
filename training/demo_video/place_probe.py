"""Does the projector put the place words of --place-weight into the tokens? The place read: on how many val
actor tokens the nearest (cosine) of the four halves targets -- description + left / right (of the line, where
the scene has one) x up / down, the choice ``place_loss`` trains -- has the right x side and the right y side. Correlation of each val actor's
token residual (after its description) along right-left / down-up with its true x / y; and, in scenes with a
crossings line, how often the right-left part (above or below its median) names the actor's side of the *line* (what
``--place-line-sides`` aligns to) or of the middle (``--place-halves``), on the tokens where the two differ.
    python training/demo_video/place_probe.py runs/demo-video-train-v9/aligned.pt \
        [runs/demo-video-train-v8/features_val_240_112px_10f_4l.pt]
"""
import sys

import numpy as np
import torch

from tokenprune.zoo.demo_video import FRAME_SIZE, build_demo_video
from tokenprune.zoo.train_demo_video import (DESCRIPTIONS, halves_variants, place_sides, questions, target_words, token_labels,
                                             token_places, x_splits)

torch.set_num_threads(1)
model, processor = build_demo_video(weights=None)
proj = model.model.multi_modal_projector
st = torch.load(sys.argv[1])
if "trainable" in st:
    proj.load_state_dict({k.split("multi_modal_projector.")[1]: v for k, v in st["trainable"].items() if "multi_modal_projector" in k})
else:
    proj.load_state_dict(st)
cells = FRAME_SIZE // 14 // model.config.spatial_pool_stride  # tokens a frame side, as the trainer derives it
val = questions("val", 240, 10)
feats = torch.load(sys.argv[2] if len(sys.argv) > 2 else "runs/demo-video-train-v8/features_val_240_112px_10f_4l.pt")
places = torch.stack([token_places(s, FRAME_SIZE, cells) for s, _ in val])
codes = torch.stack([token_labels(s, FRAME_SIZE, cells)[0] for s, _ in val])
w, table = target_words(model.model.language_model.embed_tokens, processor.tokenizer)
with torch.no_grad():
    p = proj(feats.flatten(1, 2).float())
resid = p - table[codes]
dx = (w["right"] - w["left"]) / 2; dy = (w["down"] - w["up"]) / 2
m = (codes < len(DESCRIPTIONS)) & ~places[..., 0].isnan()
sx = (resid[m] @ dx) / (dx @ dx) / 0.5; sy = (resid[m] @ dy) / (dy @ dy) / 0.5
x = places[m][:, 0]; y = places[m][:, 1]
print("actor tokens", int(m.sum()), "corr x", np.corrcoef(sx, x)[0, 1], "corr y", np.corrcoef(sy, y)[0, 1])
print("slope x", float(((sx - sx.mean()) * (x - x.mean())).sum() / ((x - x.mean()) ** 2).sum()))
splits = x_splits([s for s, _ in val])  # [N, 1, 1] each scene's line, else the middle
line = splits.view(-1, 1).expand_as(codes)[m]
has_line = torch.tensor([s.line is not None for s, _ in val]).view(-1, 1).expand_as(codes)[m]
differ = has_line & ((x >= line) != (x >= 0.5))
right = sx > sx.median()
print(f"line scenes: {int(has_line.sum())} actor tokens, {int(differ.sum())} where the line's side and the middle's differ; "
      f"there the right-left part (split at its median) names the line's side {float((right[differ] == (x >= line)[differ]).float().mean()):.2f}, "
      f"the middle's {float((right[differ] == (x >= 0.5)[differ]).float().mean()):.2f}")
sides = place_sides(places, splits)[m]  # [M, 2] the true halves (line sides)
variants = halves_variants(table[codes[m]], w)  # [M, 4, D]
pick = torch.nn.functional.cosine_similarity(p[m].unsqueeze(1), variants, dim=-1).argmax(-1)  # (left, up), (left, down), ...
print(f"place read (nearest of the four halves targets): x side {float(((pick // 2) == sides[:, 0]).float().mean()):.3f}, "
      f"y side {float(((pick % 2) == sides[:, 1]).float().mean()):.3f}")
print(f"  on the {int(differ.sum())} tokens where the line's side and the middle's differ: x side (the line's) "
      f"{float(((pick // 2) == sides[:, 0])[differ].float().mean()):.3f}")
