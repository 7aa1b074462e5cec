"""Does pruning a video make the model faster, per scope? Prints prefill time ratios beside FLOPs ratios.

    python benchmarks/speed/video_speed.py [--runs 5] [--frames 16] [--ratio 0.25] [--model qwen2_vl|onevision|both]

Two randomly initialised models of realistic width built from configs (no hub): a mid-size Qwen2-VL
(ViT 768 wide x 12 blocks, patch 14, 2x2 merge; LLM 768 x 12 layers, GQA 12/4) on 336x336 frames
(8 temporal patches x 144 tokens for 16 frames), and a mid-size LLaVA-OneVision (SigLIP 768 x 12 at
384 px, patch 14: 729 patches per frame pooled to 14x14 = 196 tokens; the same LLM) on 384x384
frames (16 x 196 + 1 tokens). For each method at ``--ratio`` and each scope it supports: the
prefill time (placing the pruned visual tokens + the LLM's prefill + first logits; the vision tower
excluded, as it is the same for every pre-LLM method) over the unpruned prefill, next to the ratio
of the LLM's prefill FLOPs (full convention) and the visual tokens the last layer sees. Medians
over ``--runs``, every variant's calls interleaved so that machine drift hits all alike.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import tokenprune as tp
from tokenprune.cost import llm_flops

from adapter_speed import paired_medians  # run as a script: its folder is on sys.path

PROMPT = "what is in the image ? answer using a single word"
METHODS = [("fopru_rank", "frame"), ("fopru_rank", "clip"), ("divprune", "frame"), ("divprune", "clip"),
           ("random", "frame"), ("random", "clip"), ("visionzip", "frame"), ("fastv", None)]
MID_TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4)


def mid_qwen2_vl():
    """``(model, processor, frame side)``: a mid-size Qwen2-VL."""
    from tokenprune.zoo.tiny import tiny_qwen2_vl

    text = dict(MID_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    model, processor = tiny_qwen2_vl(patch_size=14, vision=dict(depth=12, embed_dim=768, hidden_size=768, num_heads=12,
                                                                mlp_ratio=4), text=text)
    # 336 px frames keep their size: a budget of up to 12x12 merged tokens per frame
    processor.videos_kwargs = {**processor.videos_kwargs, "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 336 * 336}}
    return model, processor, 336


def mid_onevision(side: int = 384):
    """``(model, processor, frame side)``: a mid-size LLaVA-OneVision (SigLIP at ``side`` px, default 384)."""
    from tokenprune.zoo.tiny_llava_onevision import tiny_llava_onevision

    model, processor = tiny_llava_onevision(crop_size=side, patch_size=14, vision=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), text=MID_TEXT)
    return model, processor, side


@torch.no_grad()
def bench(name: str, build, frames: int, ratio: float, runs: int) -> None:
    model, processor, side = build()
    lvlm = tp.wrap(model, processor)
    rng = np.random.default_rng(0)
    video = tp.Video.from_frames(rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8), fps=2.0)
    inputs = {k: v.to(lvlm.device) if torch.is_tensor(v) else v for k, v in lvlm.prepare([video], [PROMPT]).items()}
    calls, layers, rows = [], {}, [("none", None, None)]
    for method, scope in METHODS:
        try:
            rows.append((method, scope, tp.create_pruner(method, ratio=ratio, **({} if scope is None else {"scope": scope}))))
        except tp.OptionError as err:  # a method defined per frame only
            print(f"{name}: {method} scope={scope}: {err}")
    for key, scope, pruner in rows:
        needs = lvlm.vision_needs(pruner)
        views = lvlm.encode_images(inputs, needs)
        in_llm = lvlm._in_llm(pruner)

        def run(views=views, pruner=pruner, in_llm=in_llm):
            llm_inputs = lvlm._assemble(inputs, views, pruner, "keep", ["0"])[0]
            return lvlm.runner.generate(llm_inputs, 1, pruner=in_llm)

        out = run()
        layers[(key, scope)] = (out.prefill_tokens[0].tolist(), out.visual_tokens[0].tolist())
        calls.append(run)
    times = paired_medians(calls, runs, lvlm.device)
    full_tokens, full_visual = layers[("none", None)]
    full_flops = llm_flops(lvlm.model.config, full_tokens, new_tokens=1)
    print(f"\n{name}: {frames} frames of {side}x{side}, {full_visual[0]} visual + {full_tokens[0] - full_visual[0]} "
          f"text tokens, ratio {ratio}, threads {torch.get_num_threads()}, median of {runs}")
    print(f"{'method':<12}{'scope':<7}{'visual kept':>12}{'FLOPs ratio':>13}{'prefill ms':>12}{'time ratio':>12}")
    for (key, scope, _), t in zip(rows, times):
        tokens, visual = layers[(key, scope)]
        flops = llm_flops(lvlm.model.config, tokens, new_tokens=1) / full_flops
        print(f"{key:<12}{scope or '-':<7}{visual[-1]:>12}{flops:>13.3f}{t * 1e3:>12.1f}{t / times[0]:>12.3f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--model", choices=["qwen2_vl", "onevision", "both"], default="both")
    args = parser.parse_args()
    torch.manual_seed(0)
    builders = {"qwen2_vl": ("mid Qwen2-VL", mid_qwen2_vl), "onevision": ("mid LLaVA-OneVision", mid_onevision)}
    for key in (["qwen2_vl", "onevision"] if args.model == "both" else [args.model]):
        name, build = builders[key]
        bench(name, build, args.frames, args.ratio, args.runs)


if __name__ == "__main__":
    main()
