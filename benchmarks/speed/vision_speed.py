"""Does pruning inside the vision tower cut the tower's time as its FLOPs say? Prints ratios.

    python benchmarks/speed/vision_speed.py [--runs 10] [--budgets 192,128,64] [--methods tome,flowcut,mustdrop:layers=2,6,10]
                                            [--device cpu|cuda] [--dtype float32|bfloat16]

On ``mid-llava`` (CLIP-B/14 at 336 px: 576 patches, 12 blocks; a 12-layer LLM), for each budget of
visual tokens reaching the LLM (192 / 128 / 64 of 576, i.e. ``ratio = budget / 576``) and each
method that cuts in the tower, next to ``fastervlm`` (which prunes after the whole tower) at the same
count (MustDrop's count is adaptive: its ``ratio`` picks the official threshold pair named for that
budget, and the ``kept`` column says what it kept):

* vision: processor outputs -> tower -> projector (``encode_images``), time and FLOPs, each as a
  ratio to the unpruned tower;
* prefill: vision + placing the tokens + the LLM's prefill + first logits, time and FLOPs ratios.

Medians over ``--runs`` after warm-up, all variants' calls interleaved so drift hits them alike.
FLOPs are tokenprune's own count (:mod:`tokenprune.cost`) from the tokens each block and layer saw.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.benchmarks.sweep_config import split_methods
from tokenprune.cost import sample_cost

try:
    from benchmarks.speed.adapter_speed import paired_medians
except ImportError:  # run as a script from benchmarks/speed
    from adapter_speed import paired_medians  # type: ignore[no-redef]

PROMPT = "what is in the image ? answer using a single word"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--methods", default="tome,flowcut,mustdrop:layers=2,6,10",
                        help="pruner specs that cut in the vision tower (fastervlm is always the reference)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    lvlm = tp.load("mid-llava", dtype=getattr(torch, args.dtype))
    lvlm.model.to(args.device)
    device = lvlm.device
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8))
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in lvlm.prepare([image], [PROMPT]).items()}
    n = 576
    print(f"mid-llava device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} runs={args.runs}")

    variants = [("none", None, n)]
    for budget in (int(b) for b in args.budgets.split(",")):
        ratio = budget / n
        for name in ["fastervlm", *split_methods(args.methods)]:  # specs may hold commas (layers=2,6,10)
            variants.append((name, tp.pruner_from_spec(name, ratio=ratio), budget))

    spec = lvlm.vision_spec()
    vision_calls, prefill_calls, costs = [], [], []
    for name, pruner, _ in variants:
        needs = lvlm.vision_needs(pruner)

        def vision(needs=needs):
            return lvlm.encode_images(inputs, needs)

        def prefill(needs=needs, pruner=pruner):
            views = lvlm.encode_images(inputs, needs)
            in_llm = lvlm._in_llm(pruner)
            llm_inputs = lvlm._assemble(inputs, views, pruner, "keep", ["0"])[0]
            return lvlm.runner.generate(llm_inputs, 1, pruner=in_llm)

        out = lvlm.generate([image], [PROMPT], pruner=pruner, max_new_tokens=1)
        c = sample_cost(lvlm.model.config, spec, out.stats[0])
        costs.append((c, out.stats[0].visual_tokens_kept))
        vision_calls.append(vision)
        prefill_calls.append(prefill)
    v_times = paired_medians(vision_calls, args.runs, device)
    p_times = paired_medians(prefill_calls, args.runs, device)
    base_c, _ = costs[0]
    print(f"{'method':<11}{'budget':>7}{'kept':>6}{'vision ms':>11}{'time ratio':>12}{'FLOPs ratio':>13}"
          f"{'prefill ms':>12}{'time ratio':>12}{'FLOPs ratio':>13}")
    for (name, _, budget), tv, tpf, (c, kept) in zip(variants, v_times, p_times, costs):
        print(f"{name:<11}{budget:>7}{kept:>6}{tv * 1e3:>11.1f}{tv / v_times[0]:>12.3f}{c.vision / base_c.vision:>13.3f}"
              f"{tpf * 1e3:>12.1f}{tpf / p_times[0]:>12.3f}"
              f"{(c.vision + c.prefill + c.lm_head) / (base_c.vision + base_c.prefill + base_c.lm_head):>13.3f}",
              flush=True)


if __name__ == "__main__":
    main()
