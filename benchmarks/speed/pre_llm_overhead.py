"""What does each pre-LLM method's scoring cost? Prints ratios.

    python benchmarks/speed/pre_llm_overhead.py [--runs 10] [--ratio 0.25] [--device cpu|cuda] [--dtype float32]

On ``mid-llava`` (CLIP-B/14 tower at 336 px, 576 visual tokens, 12 layers), per method at
``--ratio``: the vision pass (tower + projector) computing what the method needs (attention rows
of one layer, its keys, the features the projector reads) against the plain vision pass, and the
method's own selection time (its ``select``: top-k, diversity loops, DPP, merges), both as a share of
the plain vision pass. Medians over ``--runs`` after warm-up, the variants' calls interleaved.
"""
from __future__ import annotations

import torch

import tokenprune as tp
from tokenprune.pruner import PrunerNeeds, PruningInputs

from adapter_speed import mid_llava_setup, paired_medians  # run as a script: its folder is on sys.path

PROMPT = "what is in the image ? answer using a single word"
METHODS = ["fopru_rank", "fopru_row", "random", "pool", "fastervlm", "divprune", "vispruner", "cdpruner", "visionzip"]


@torch.no_grad()
def main() -> None:
    args, lvlm, batch = mid_llava_setup(__doc__, PROMPT)
    device = lvlm.device
    embeds = lvlm.runner.embed(batch["input_ids"])
    text = lvlm._text_after_images(embeds, batch["attention_mask"].bool(), lvlm.encode_images(batch, PrunerNeeds()),
                                   batch["input_ids"])

    calls, pruners = [lambda: lvlm.encode_images(batch, PrunerNeeds())], []
    for name in METHODS:
        pruner = tp.create_pruner(name, ratio=args.ratio)
        view = lvlm.encode_images(batch, pruner.needs)[0]
        inputs = PruningInputs(
            tokens=view.tokens[None], grid=view.grid, sample_ids=["0"], vision_prefix=view.vision_prefix,
            vision_attention=None if view.vision_attention is None else view.vision_attention[None],
            vision_features=None if view.vision_features is None else view.vision_features[None],
            vision_prefix_features=None if view.vision_prefix_features is None else view.vision_prefix_features[None],
            vision_keys=None if view.vision_keys is None else view.vision_keys[None],
            text_tokens=text[0], text_mask=text[1], text_ids=text[2], prompts=[PROMPT])
        calls += [lambda p=pruner: lvlm.encode_images(batch, p.needs), lambda p=pruner, i=inputs: p(i)]
        pruners.append(pruner)
    times = paired_medians(calls, args.runs, device)
    plain = times[0]
    print(f"plain vision pass (tower + projector): {plain * 1e3:.1f} ms")
    print(f"{'method':<12}{'needs':<32}{'vision ms':>10}{'ratio':>8}{'select ms':>11}{'share':>8}")
    for i, pruner in enumerate(pruners):
        vision, select = times[1 + 2 * i], times[2 + 2 * i]
        n = pruner.needs
        needs = ",".join(([f"attn{n.vision_attention_layer}:{n.vision_attention_rows}"] if n.vision_attention_layer is not None else [])
                         + (["features"] if n.vision_features else []) + (["keys"] if n.vision_keys else [])
                         + (["text"] if n.text else [])) or "-"
        print(f"{pruner.name:<12}{needs:<32}{vision * 1e3:>10.1f}{vision / plain:>8.3f}{select * 1e3:>11.2f}"
              f"{select / plain:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
