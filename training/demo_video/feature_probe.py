"""Is an actor's place in the pooled tower features the projector reads? Probes (logistic, and a 256-unit MLP)
fitted on the actor tokens of the first 3,000 train videos' cached features, scored on the 240 val videos':
x half, y half, the token's cell column (a control: the position embedding), and the side of the crossings
line in line scenes. Session 7's finding: x / y half 0.96 (linear) -- the place is there, so v9's tokens naming
their side little better than chance (0.60 / 0.63, place_probe.py) was the alignment objective's fault. Line
side 0.89 (MLP) is over all line scenes' actor tokens, where the middle's side agrees with the line's on 0.93:
it does not show the line's side is there where the two differ (session 8's reading, docs/demo.md).
    python training/demo_video/feature_probe.py [features_train.pt features_val.pt]   (~6 min on 2 cores)
"""
import sys

import torch

from tokenprune.zoo.demo_video import FRAME_SIZE, POOL_STRIDE
from tokenprune.zoo.train_demo_video import DESCRIPTIONS, questions, token_labels, token_places, x_splits

torch.set_num_threads(2)
N = 3000
cells = FRAME_SIZE // 14 // POOL_STRIDE
if len(sys.argv) not in (1, 3):
    raise SystemExit("usage: feature_probe.py [features_train.pt features_val.pt] (both, or neither for v8's)")
train_path, val_path = sys.argv[1:] or ["runs/demo-video-train-v8/features_train_12000_112px_10f_4l.pt",
                                        "runs/demo-video-train-v8/features_val_240_112px_10f_4l.pt"]


def actor_tokens(qs, feats):
    """Features ``[M, 384]`` of the tokens that show an actor, with the actor's x, y, the scene's x split,
    whether it has a line, and the token's cell column (all ``[M]``)."""
    codes = torch.stack([token_labels(s, FRAME_SIZE, cells)[0] for s, _ in qs])
    places = torch.stack([token_places(s, FRAME_SIZE, cells) for s, _ in qs])
    split = x_splits([s for s, _ in qs]).view(-1, 1).expand_as(codes)
    has_line = torch.tensor([s.line is not None for s, _ in qs]).view(-1, 1).expand_as(codes)
    col = (torch.arange(codes.shape[1]) % cells).view(1, -1).expand_as(codes)
    m = codes < len(DESCRIPTIONS)
    return feats[m], places[m][:, 0], places[m][:, 1], split[m], has_line[m], col[m]


def fit(x, y, x_val, y_val, hidden: int = 0, steps: int = 300) -> float:
    """Val accuracy of a logistic (``hidden`` 0) or one-hidden-layer probe trained full-batch with Adam."""
    torch.manual_seed(0)
    net = (torch.nn.Linear(x.shape[1], 1) if not hidden else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)))
    opt = torch.optim.Adam(net.parameters(), 3e-3 if hidden else 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1), y.float()).backward()
        opt.step()
    with torch.no_grad():
        return float(((net(x_val).squeeze(-1) > 0) == y_val).float().mean())


train, val = questions("train", N, 10), questions("val", 240, 10)
xt, at, bt, st, lt, ct = actor_tokens(train, torch.load(train_path, mmap=True)[:N].float().flatten(1, 2))
xv, av, bv, sv, lv, cv = actor_tokens(val, torch.load(val_path).float().flatten(1, 2))
mu, sd = xt.mean(0), xt.std(0) + 1e-5
xt, xv = (xt - mu) / sd, (xv - mu) / sd
print(f"actor tokens: {len(xt)} train, {len(xv)} val")
for name, (y, y_val) in {"x half": (at >= 0.5, av >= 0.5), "y half": (bt >= 0.5, bv >= 0.5),
                         "cell column >= 2 (control)": (ct >= cells // 2, cv >= cells // 2)}.items():
    print(f"{name}: linear {fit(xt, y, xv, y_val):.3f}, MLP {fit(xt, y, xv, y_val, 256):.3f}")
print(f"side of the line (line scenes): MLP {fit(xt[lt], (at >= st)[lt], xv[lv], (av >= sv)[lv], 256):.3f}")
