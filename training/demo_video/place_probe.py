"""Does the projector put the place words of --place-weight into the tokens? Correlation of each val actor's
token residual (after its description) along right-left / down-up with its true x / y.
    python training/demo_video/place_probe.py runs/demo-video-train-v3b/aligned.pt
"""
import torch, numpy as np
from tokenprune.zoo.train_demo_video import questions, token_places, token_labels, DESCRIPTIONS, target_words
from tokenprune.zoo.demo_video import build_demo_video
torch.set_num_threads(1)
model, processor = build_demo_video(weights=None)
proj = model.model.multi_modal_projector
import sys
src = sys.argv[1]
st = torch.load(src)
if "trainable" in st:
    proj.load_state_dict({k.split("multi_modal_projector.")[1]: v for k, v in st["trainable"].items() if "multi_modal_projector" in k})
else:
    proj.load_state_dict(st)
val = questions("val", 240, 10)
feats = torch.load("runs/demo-video-train-v3/features_val_240_112px_10f_4l.pt")
places = torch.stack([token_places(s, 112, 4) for s, _ in val])
codes = torch.stack([token_labels(s, 112, 4)[0] for s, _ in val])
embed = model.model.language_model.embed_tokens
w, table = target_words(embed, processor.tokenizer)
with torch.no_grad():
    p = proj(feats.flatten(1, 2).float())
resid = p - table[codes]
dx = (w["right"] - w["left"]) / 2; dy = (w["down"] - w["up"]) / 2
m = (codes < len(DESCRIPTIONS)) & ~places[..., 0].isnan()
sx = (resid[m] @ dx) / (dx @ dx) / 0.5; sy = (resid[m] @ dy) / (dy @ dy) / 0.5
x = places[m][:, 0]; y = places[m][:, 1]
print("actor tokens", int(m.sum()), "corr x", np.corrcoef(sx, x)[0, 1], "corr y", np.corrcoef(sy, y)[0, 1])
print("slope x", float(((sx - sx.mean()) * (x - x.mean())).sum() / ((x - x.mean()) ** 2).sum()))
