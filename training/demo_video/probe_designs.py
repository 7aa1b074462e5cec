"""Which DINOv2 depth and pooling let a video token carry the shape of a small object at 112 px?

    python training/demo_video/probe_designs.py [N_TRAIN=300] [N_VAL=120]   # -> probe_designs.json beside it

For each candidate (features after DINOv2 block 4, 6 or 8; 2 x 2-pooled (16 tokens a frame, the demo's) or not
(64)), an MLP probe (384 -> 256 -> 16, background weighted 0.2) is fitted on the tokens of ``N_TRAIN``
``shapes_video`` train videos and read on ``N_VAL`` val videos, labels from the scene descriptions
(``token_labels``). It measures what the features hold, an upper bound for any projector trained on them.
Result (300 / 120, ``probe_designs.json``): block 4 pooled reads shape on 0.64 of the actor tokens (chance 0.33),
unpooled 0.79; blocks 6 and 8 add little (pooled 0.69 / 0.66). The demo's word-regression alignment read only 0.37 from the same
features (``--probe``), which is what ``--align-loss mse+ce`` fixes (0.70).
"""
import json
import sys
import time
from pathlib import Path

import torch

from tokenprune.benchmarks.tasks.shapes_video import render
from tokenprune.zoo import train_demo_video as T
from tokenprune.zoo.demo_video import build_demo_video

LAYERS = (4, 6, 8)


def main(n_train: int, n_val: int) -> dict:
    torch.manual_seed(0)
    model, proc = build_demo_video(weights=None, vision_layers=max(LAYERS))
    frames = T.frames_processor(proc)
    train, val = T.questions("train", n_train, 10), T.questions("val", n_val, 10)

    @torch.no_grad()
    def features(scenes) -> dict[int, torch.Tensor]:  # {block: [N, 10, 64, 384]}
        out = {layer: [] for layer in LAYERS}
        for i in range(0, len(scenes), 8):
            px = frames([render(s, 112) for s, _ in scenes[i:i + 8]], return_tensors="pt")["pixel_values_videos"]
            hidden = model.model.vision_tower(px.flatten(0, 1), output_hidden_states=True).hidden_states
            for layer in LAYERS:
                out[layer].append(hidden[layer][:, 1:].reshape(-1, 10, 64, 384))
        return {layer: torch.cat(v) for layer, v in out.items()}

    def pool(f: torch.Tensor) -> torch.Tensor:  # [N, T, 64, D] -> [N, T, 16, D]: 2 x 2 means, row-major cells
        n, t, _, d = f.shape
        return f.view(n, t, 4, 2, 4, 2, d).mean((3, 5)).reshape(n, t, 16, d)

    t0 = time.time()
    f_train, f_val = features(train), features(val)
    print(f"features {time.time() - t0:.0f} s", flush=True)
    labels = {cells: (torch.stack([T.token_labels(s, 112, cells)[0] for s, _ in train]),
                      torch.stack([T.token_labels(s, 112, cells)[0] for s, _ in val])) for cells in (4, 8)}
    bg = len(T.DESCRIPTIONS)
    results = {}
    for layer in LAYERS:
        for pooled in (True, False):
            cells = 4 if pooled else 8
            x_train = (pool(f_train[layer]) if pooled else f_train[layer]).flatten(0, 2).float()
            x_val = (pool(f_val[layer]) if pooled else f_val[layer]).flatten(0, 2).float()
            y_train, y_val = labels[cells][0].flatten(), labels[cells][1].flatten()
            mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
            x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
            weight = torch.ones(bg + 1)
            weight[bg] = 0.2
            probe = torch.nn.Sequential(torch.nn.Linear(384, 256), torch.nn.GELU(), torch.nn.Linear(256, bg + 1))
            opt = torch.optim.AdamW(probe.parameters(), 2e-3, weight_decay=1e-2)
            for _ in range(600):
                idx = torch.randint(0, len(x_train), (1024,))
                loss = torch.nn.functional.cross_entropy(probe(x_train[idx]), y_train[idx], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = probe(x_val).argmax(-1)
            shows = y_val < bg
            p, g = pred[shows].tolist(), y_val[shows].tolist()
            part = lambda i, k: T.DESCRIPTIONS[i][k] if i < bg else "bg"  # noqa: E731
            r = {"desc": sum(a == b for a, b in zip(p, g)) / len(g),
                 "colour": sum(part(a, 0) == part(b, 0) for a, b in zip(p, g)) / len(g),
                 "shape": sum(part(a, 1) == part(b, 1) for a, b in zip(p, g)) / len(g),
                 "as_bg": sum(a == bg for a in p) / len(g), "actor_tokens": len(g)}
            name = f"L{layer}_{'pool2' if pooled else 'nopool'}"
            results[name] = r
            print(name, " ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    return results


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    out = main(*(args + [300, 120][len(args):]))
    (Path(__file__).parent / "probe_designs.json").write_text(json.dumps(out, indent=1) + "\n")
