"""What each video method costs and saves: its own selection time against the vision tower, and prefill and
per-token decode time against the unpruned model, beside the FLOPs ratios.

    python benchmarks/speed/video_methods_speed.py [--frames 32] [--ratio 0.25] [--runs 3] [--new-tokens 8] \
        [--model qwen2_vl|onevision|both] [--methods dycoke,prunevid,...]

Models: the mid-size Qwen2-VL and LLaVA-OneVision of ``video_speed.py`` (randomly initialised, realistic width:
ViT / SigLIP 768 x 12, LLM 768 x 12 with GQA 12/4; no hub), OneVision here at ``--side`` px frames. The video is
synthetic but temporally redundant, as real ones are (a static textured background, two squares moving at
constant speed, a little sensor noise), so that the temporal methods have something to merge.

Per method (at ``--ratio``; methods without a ratio once), every call interleaved with the others so that machine
drift hits all alike, medians over ``--runs``:

* ``vision ms``: the vision tower + projector for this method's needs (its recorded attention included), once per
  distinct needs (the tower is the same for every pre-LLM method; only what is recorded differs);
* ``select ms``: the pruner's own time -- every call of its ``select`` (scoring and choosing, every stage: before
  the LLM, inside it, per decode step), measured around the calls; ``select/vision`` is that over the tower's time;
* ``prefill ms``: placing the tokens + the decoder's prefill (in-LLM selection included), and its ratio to unpruned;
* ``decode ms/tok``: the decoder's per-token time over ``--new-tokens - 1`` cached steps (a decode plan's per-step
  selection included), and its ratio;
* ``FLOPs`` ratios of the LLM prefill and of one decode step (``tokenprune.cost``: DyCoke's per-step selection
  attends to fewer entries than its cache holds, which the decode FLOPs, counted on the cache, do not see).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import tokenprune as tp
from tokenprune.cost import TextDims, decode_macs, prefill_macs

from video_speed import mid_onevision, mid_qwen2_vl  # run as a script: its folder is on sys.path

PROMPT = "what happens in the video ? answer using a single word"
VIDEO_METHODS = ("dycoke", "prunevid", "fastvid", "framefusion", "holitom", "scissor", "visionzip_video")


def redundant_video(frames: int, side: int, seed: int = 0) -> np.ndarray:
    """``[T, side, side, 3]`` uint8: a fixed textured background, two squares moving at constant speed, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    background = np.stack([128 + 60 * np.sin(9 * xx + 3 * yy), 128 + 60 * np.cos(7 * yy), 96 + 80 * xx * yy], -1)
    background += rng.normal(0, 12, background.shape)
    out = np.repeat(background[None], frames, 0)
    box = side // 8
    for t in range(frames):
        for (x0, y0, vx, vy, colour) in ((0.1, 0.2, 0.6, 0.1, (230, 30, 30)), (0.7, 0.7, -0.5, -0.4, (30, 60, 230))):
            x = int((x0 + vx * t / frames) * (side - box)) % (side - box)
            y = int((y0 + vy * t / frames) * (side - box)) % (side - box)
            out[t, y:y + box, x:x + box] = colour
    out += rng.normal(0, 2, out.shape)
    return out.clip(0, 255).astype(np.uint8)


class _Timed:
    """Wraps a pruner's ``select`` to add up the seconds its calls take (``seconds``, reset per generate)."""

    def __init__(self, pruner):
        self.seconds = 0.0
        inner = pruner.select

        def select(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        pruner.select = select


def _pruners(methods, ratio: float):
    rows = [("none", None)]
    for name in methods:
        if name not in tp.list_pruners():
            print(f"  {name}: not registered in this install, skipped")
            continue
        pruner = tp.create_pruner(name)
        if pruner.uses_ratio:
            pruner = tp.create_pruner(name, ratio=ratio)
        rows.append((name, pruner))
    return rows


@torch.no_grad()
def bench(label: str, build, frames: int, ratio: float, runs: int, new_tokens: int, methods) -> None:
    model, processor, side = build()
    lvlm = tp.wrap(model, processor)
    video = tp.Video.from_frames(redundant_video(frames, side), fps=2.0)
    rows = _pruners(methods, ratio)
    encoded, vision_s = {}, {}
    for name, pruner in rows:  # the tower once per distinct needs (median of 2)
        needs = lvlm.vision_needs(pruner)
        key = repr(needs)
        if key not in encoded:
            try:
                times = []
                for _ in range(2):
                    enc = lvlm.encode([video], [PROMPT], needs)
                    times.append(enc.seconds)
            except tp.OptionError as err:
                print(f"  {label}: {name}: {err}")
                continue
            encoded[key], vision_s[key] = enc, statistics.median(times)
    timed = {name: _Timed(p) for name, p in rows if p is not None}
    ok = [(n, p) for n, p in rows if repr(lvlm.vision_needs(p)) in encoded]
    samples = {n: [] for n, _ in ok}
    stats = {}
    for run in range(runs + 1):  # run 0 warms up
        for name, pruner in ok:
            if name in timed:
                timed[name].seconds = 0.0
            try:
                out = lvlm.generate([video], [PROMPT], pruner=pruner, encoded=encoded[repr(lvlm.vision_needs(pruner))],
                                    max_new_tokens=new_tokens, ignore_eos=True)
            except tp.OptionError as err:
                print(f"  {label}: {name}: {err}")
                ok = [(n, p) for n, p in ok if n != name]
                continue
            stats[name] = out.stats[0]
            if run:
                prefill = out.timings["llm"] - out.timings["decode"]  # placing the tokens + the decoder's prefill
                samples[name].append((prefill, out.timings["decode"] / max(new_tokens - 1, 1),
                                      timed[name].seconds if name in timed else 0.0))
    if not samples.get("none"):
        print(f"  {label}: the unpruned model did not run (see above): no ratios to print; try fewer --frames")
        return
    d = TextDims.from_config(lvlm.model.config)
    full = stats["none"]
    full_prefill = prefill_macs(d, full.tokens_per_layer)
    full_decode = decode_macs(d, full.tokens_per_layer, 2)
    base = [statistics.median(x) for x in zip(*samples["none"])]
    vis_none = vision_s[repr(lvlm.vision_needs(None))]
    print(f"\n{label}: {frames} frames of {side}x{side}, {full.visual_tokens_in} visual + {full.text_tokens} text tokens, "
          f"ratio {ratio}, {new_tokens} new tokens, threads {torch.get_num_threads()}, median of {runs}")
    print(f"{'method':<16}{'kept':>6}{'vision ms':>11}{'select ms':>11}{'sel/vis':>9}{'prefill ms':>12}{'time x':>8}"
          f"{'FLOPs x':>9}{'dec ms/tok':>12}{'time x':>8}{'FLOPs x':>9}")
    for name, pruner in ok:
        if not samples.get(name):
            continue
        prefill, decode, select = (statistics.median(x) for x in zip(*samples[name]))
        st = stats[name]
        vis = vision_s[repr(lvlm.vision_needs(pruner))]
        cache = st.cache_per_layer or st.tokens_per_layer
        print(f"{name:<16}{st.visual_tokens_kept:>6}{vis * 1e3:>11.0f}{select * 1e3:>11.1f}{select / vis_none:>9.3f}"
              f"{prefill * 1e3:>12.0f}{prefill / base[0]:>8.3f}{prefill_macs(d, st.tokens_per_layer) / full_prefill:>9.3f}"
              f"{decode * 1e3:>12.1f}{decode / base[1]:>8.3f}{decode_macs(d, cache, 2) / full_decode:>9.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--side", type=int, default=384, help="OneVision frame side (a multiple of 14)")
    parser.add_argument("--model", choices=["qwen2_vl", "onevision", "both"], default="both")
    parser.add_argument("--methods", default=",".join(VIDEO_METHODS))
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = [m for m in args.methods.split(",") if m]
    builders = {"qwen2_vl": ("mid Qwen2-VL", mid_qwen2_vl),
                "onevision": ("mid LLaVA-OneVision", lambda: mid_onevision(args.side))}
    for key in (["qwen2_vl", "onevision"] if args.model == "both" else [args.model]):
        label, build = builders[key]
        bench(label, build, args.frames, args.ratio, args.runs, args.new_tokens, methods)


if __name__ == "__main__":
    main()
