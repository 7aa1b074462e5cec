"""Does pruning make the model faster, and does FoPru's scoring cost anything? Prints ratios.

    python benchmarks/speed/adapter_speed.py [--runs 20] [--model tiny|mid|both] [--device cpu|cuda]

For each model: (1) vision-tower time with FoPru's attention scoring / without (the target is
<= 1.10: only one layer records its attention rows, every other layer stays on SDPA);
(2) prefill time (placing the pruned visual tokens + the LLM's prefill + first logits; the vision
tower excluded) at ratio 0.25 / ratio 1.0, next to the ratio of tokens the decoder layers process.
Medians over ``--runs`` after warm-up, the variants' calls interleaved.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.pruner import PrunerNeeds
from tokenprune.zoo.tiny import mid_llava, tiny_llava

PROMPT = "what is in the image ? answer using a single word"


def median_time(fn, runs: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up
        fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_medians(fns, runs: int, device: torch.device) -> list[float]:
    """Median time of each function, calls interleaved so that machine drift hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:  # warm-up
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def mid_llava_setup(doc: str, prompt: str):
    """Shared set-up of the mid-llava ratio scripts: ``(args, lvlm, batch)`` for one 336 px image and
    ``prompt`` (flags ``--runs --ratio --device --dtype``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    lvlm = tp.load("mid-llava", dtype=getattr(torch, args.dtype))
    lvlm.model.to(args.device)
    print(f"mid-llava device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} runs={args.runs} "
          f"ratio={args.ratio}")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8))
    batch = {k: v.to(lvlm.device) if torch.is_tensor(v) else v for k, v in lvlm.prepare([image], [prompt]).items()}
    return args, lvlm, batch


@torch.no_grad()
def bench(name: str, lvlm, image_size: int, runs: int, batch: int) -> None:
    device = lvlm.device
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(batch)]
    prompts = [PROMPT] * batch
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in lvlm.prepare(images, prompts).items()}
    ids = [str(i) for i in range(batch)]

    plain, scored = paired_medians([lambda: lvlm.encode_images(inputs, PrunerNeeds()),
                                    lambda: lvlm.encode_images(inputs, PrunerNeeds(vision_attention_layer=-2))],
                                   runs, device)
    print(f"{name}: vision tower {plain * 1e3:.1f} ms, with FoPru scoring {scored * 1e3:.1f} ms, "
          f"ratio {scored / plain:.3f} (target <= 1.10)", flush=True)

    # Prefill = placing (pruned) visual tokens + the LLM's prefill + first logits; vision excluded.
    methods = [("none", None)] + [(m, tp.create_pruner(m, ratio=0.25)) for m in
                                  ("fopru_rank", "fopru_row", "random", "pool", "fastv")]
    calls, layers = [], {}
    for key, pruner in methods:
        needs = lvlm.vision_needs(pruner)
        views = lvlm.encode_images(inputs, needs)
        in_llm = lvlm._in_llm(pruner)

        def run(views=views, pruner=pruner, in_llm=in_llm):
            llm_inputs = lvlm._assemble(inputs, views, pruner, "keep", ids)[0]
            return lvlm.runner.generate(llm_inputs, 1, pruner=in_llm)

        layers[key] = run().prefill_tokens[0].tolist()
        calls.append(run)
    times = paired_medians(calls, runs, device)
    full_tokens = sum(layers["none"])
    from tokenprune.cost import llm_flops

    full_flops = llm_flops(lvlm.model.config, layers["none"], new_tokens=1)
    print(f"{'method':<12}{'ratio':>6}{'tokens L0/last':>16}{'token ratio':>13}{'FLOPs ratio':>13}"
          f"{'prefill ms':>12}{'time ratio':>12}")
    for (key, pruner), t in zip(methods, times):
        ratio = 1.0 if pruner is None else pruner.ratio
        n = layers[key]
        # token ratio: tokens summed over layers (FastV prunes only from layer K on); FLOPs: LLM
        # prefill + LM head, full convention (the part this timing covers)
        flops = llm_flops(lvlm.model.config, n, new_tokens=1) / full_flops
        print(f"{key:<12}{ratio:>6}{str(n[0]) + '/' + str(n[-1]):>16}{sum(n) / full_tokens:>13.3f}{flops:>13.3f}"
              f"{t * 1e3:>12.1f}{t / times[0]:>12.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--model", choices=["tiny", "mid", "both", "demo"], default="both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} runs={args.runs} batch={args.batch}")
    def demo():
        from tokenprune.zoo.demo import WEIGHTS, build_demo

        return build_demo(projector=WEIGHTS if WEIGHTS.exists() else None)

    builders = {"tiny": (tiny_llava, 64), "mid": (mid_llava, 336), "demo": (demo, 224)}
    for key in (["tiny", "mid"] if args.model == "both" else [args.model]):
        build, size = builders[key]
        model, processor = build()
        model = model.to(args.device, getattr(torch, args.dtype))
        lvlm = tp.wrap(model, processor)
        bench(f"{key} LLaVA", lvlm, size, args.runs, args.batch)
        print()


if __name__ == "__main__":
    main()
