"""Issue 29, must-show 4: PruMerge+ on the demo -- each image's kept count is the IQR outlier count plus the
spatial samples plus the extra token, recomputed here with numpy from the tower's own q / k (3 different images).

    python benchmarks/prumerge_count_check.py
"""
import numpy as np
import torch

import tokenprune as tp
from tokenprune.benchmarks.tasks import get_task

lvlm = tp.load("tokenprune-demo")
task = get_task("shapes_scene")
pool = list(task.load(limit=30))
samples, seen = [], set()
for smp in pool:  # a scene has several questions: three different images
    key = np.asarray(smp.image).tobytes()
    if key not in seen:
        seen.add(key); samples.append(smp)
    if len(samples) == 3:
        break
tower = lvlm.model.model.vision_tower
for s in samples:
    prompt = task.prompt(s)
    out = lvlm.generate([s.image], [prompt], pruner=tp.create_pruner("prumerge_plus"), max_new_tokens=1)
    batch = lvlm.prepare([s.image], [prompt])
    with torch.no_grad():
        hs = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        blk = tower.encoder.layer[-1]
        x = blk.norm1(hs[-2])
        q = blk.attention.q_proj(x)[0].numpy(); k = blk.attention.k_proj(x)[0].numpy()
    c = q.shape[-1]
    logits = q[0] @ k.T / np.sqrt(c)
    attn = np.exp(logits - logits.max()); attn /= attn.sum()
    cls = attn[1:]
    n = cls.shape[0]
    q1, q3 = np.percentile(cls, 25), np.percentile(cls, 75)
    outliers = int((cls > q3 + 1.5 * (q3 - q1)).sum())
    k_out = int(n * (outliers / n))
    top = set(np.argsort(-cls, kind="stable")[:k_out].tolist())
    step = int(1 / (outliers / n))
    samples_idx = [i for i in range(0, n - 1, max(int(step / 3), 1)) if i not in top]
    expected = k_out + len(samples_idx) + 1  # + the extra token
    st = out.stats[0]
    print(f"{s.id}: outliers {outliers}, samples {len(samples_idx)}, +1 extra = {expected}; "
          f"LLM received {st.visual_tokens_kept} (decoder layer 0 visual tokens {st.visual_per_layer[0]})")
    assert expected == st.visual_tokens_kept == st.visual_per_layer[0]
