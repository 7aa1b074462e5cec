"""Is tokenprune's decoder loop ever slower than the Hugging Face path it replaces? Prints time ratios.

    python benchmarks/speed/vs_hf.py [--model tokenprune-demo|mid-llava] [--batches 1,8] [--pairs 10] \
        [--new-tokens 16] [--device cpu|cuda] [--dtype float32|bfloat16]

On the same model, the same images and prompts and the same greedy decoding, unpruned, each side timed from
the raw images and prompts:

* **ours**: ``PrunableLVLM.generate(images, prompts)`` (the processor call, vision tower, placing the image
  tokens, our decoder loop);
* **HF**: the same processor call (chat template included), then ``model.generate(**inputs)`` of the very same
  ``LlavaForConditionalGeneration``. (Timing HF from ready inputs would charge the processor to us alone:
  5.5 ms of a 530 ms batch-1 prefill of the demo, 35 ms of 4.1 s at batch 8, on 2 CPU cores.)

Both generate exactly ``--new-tokens`` tokens (EOS ignored: ``ignore_eos=True`` / ``eos_token_id=None``) and
the script checks that they are the same tokens. ``prefill`` is a one-token generation (vision + prefill + first
logits), ``decode`` the per-token time of the rest, read inside each N-token call from its first new token to its
last (ours: its synchronised decode timing; HF: a streamer noting each token), ``total`` the N-token call. Each pair runs both calls back to back, the order alternating from pair to pair, so that machine drift
hits both alike; the script prints the median of the per-pair ratios ours / HF with their min and max.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import tokenprune as tp

PROMPT = "what shape is in the image? answer with one word"


def _images(n: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _timer(device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    return timed


class _Stamps:
    """A ``generate`` streamer that only notes when each put arrives: the prompt first, then each new token."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: list[float] = []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def compare(lvlm, batch: int, pairs: int, new_tokens: int, side: int) -> None:
    model = lvlm.model
    images, prompts = _images(batch, side), [PROMPT] * batch
    timed = _timer(lvlm.device)

    # Per-token decode is read inside each N-token call, from its first new token to its last: as a
    # difference of two whole calls, (t(N) - t(1)) / (N - 1), the prefill's run-to-run spread swamps it.
    decode_seconds: dict[str, float] = {}

    def ours(n):
        out = lvlm.generate(images, prompts, max_new_tokens=n, ignore_eos=True)
        decode_seconds["ours"] = out.timings.get("decode", 0.0)  # its decode steps, synchronised
        return out.token_ids

    def hf(n):
        stamps = _Stamps(lvlm.device)
        inputs = {k: v.to(lvlm.device) if torch.is_tensor(v) else v for k, v in lvlm.prepare(images, prompts).items()}
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None,
                             pad_token_id=lvlm.runner.pad_id, streamer=stamps)
        decode_seconds["hf"] = stamps.times[-1] - stamps.times[1] if len(stamps.times) > 2 else 0.0
        return out[:, inputs["input_ids"].shape[1]:]

    a, b = ours(new_tokens), hf(new_tokens)  # warm-up, and the same answers
    same = torch.equal(a.cpu(), b.cpu())
    ours(1), hf(1)
    ratios = {"prefill": [], "decode": [], "total": []}
    abs_t = {"ours": [], "hf": []}
    for i in range(pairs):
        order = (("ours", ours), ("hf", hf)) if i % 2 == 0 else (("hf", hf), ("ours", ours))
        t = {}
        for name, fn in order:
            t1, _ = timed(lambda: fn(1))
            tn, _ = timed(lambda: fn(new_tokens))
            t[name] = (t1, decode_seconds[name] / (new_tokens - 1), tn)
        for j, key in enumerate(("prefill", "decode", "total")):
            ratios[key].append(t["ours"][j] / t["hf"][j])
        abs_t["ours"].append(t["ours"])
        abs_t["hf"].append(t["hf"])
    med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in abs_t.items()}
    processor = statistics.median(timed(lambda: lvlm.prepare(images, prompts))[0] for _ in range(max(pairs, 5)))
    print(f"batch {batch}: same tokens: {same}; ours prefill {med['ours'][0] * 1e3:.1f} ms, decode "
          f"{med['ours'][1] * 1e3:.1f} ms/token; HF prefill {med['hf'][0] * 1e3:.1f} ms, decode {med['hf'][1] * 1e3:.1f} ms/token; "
          f"the processor call in both: {processor * 1e3:.1f} ms")
    for key, vals in ratios.items():
        print(f"  ours / HF {key:<8} median {statistics.median(vals):.3f}  [min {min(vals):.3f}, max {max(vals):.3f}]"
              f"  ({pairs} pairs)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tokenprune-demo")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    lvlm = tp.load(args.model, dtype=getattr(torch, args.dtype))
    lvlm.model.to(args.device)
    side = getattr(lvlm.model.config.vision_config, "image_size", 224)
    print(f"{args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"attention={lvlm.model.config._attn_implementation} new_tokens={args.new_tokens}")
    for batch in (int(b) for b in args.batches.split(",")):
        compare(lvlm, batch, args.pairs, args.new_tokens, side)


if __name__ == "__main__":
    main()
