"""Do the in-LLM methods make prefill faster, and what does their scoring cost? Prints ratios.

    python benchmarks/speed/in_llm_speed.py [--runs 10] [--ratio 0.25] [--device cpu|cuda] [--dtype float32]

On ``mid-llava`` (a randomly initialised LLaVA of realistic shape: 576 visual tokens, a 12-layer
decoder of width 768 with GQA), for FastV, PyramidDrop, SparseVLM and DART at ``--ratio`` against the
unpruned model: prefill time (the decoder layers + first logits; the vision tower excluded, it is the
same for all) and its ratio to unpruned, next to the FLOPs ratio of the same part (analytical, from
the per-layer token counts). Scoring overhead = prefill time of the method / prefill time of the
same reduction replayed without any scoring (the recorded keep/merge decisions applied at the same
layers): what computing attention rows, keys, raters and clusters costs on top of the shorter
sequence. The 32-layer schedules are scaled to the 12-layer decoder (PyramidDrop 2/5/8, SparseVLM
1/3/6; FastV and DART keep K=2). Medians over ``--runs`` after warm-up, the variants' calls
interleaved so machine drift hits all alike.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

import tokenprune as tp
from tokenprune.cost import llm_flops
from tokenprune.pruner import PrunerNeeds

from adapter_speed import mid_llava_setup, paired_medians  # run as a script: its folder is on sys.path

PROMPT = "what is in the image ? answer using a single word"
METHODS = ["fastv", "pdrop:layers=2,5,8", "sparsevlm:layers=1,3,6", "dart"]


def prefill(lvlm, llm_inputs, pruner, replay=None):
    """Decoder prefill + first logits with ``pruner`` (or its recorded decisions, ``replay``)."""
    runner = lvlm.runner
    stages = runner.schedule(pruner)
    policy = pruner.position_policy if pruner is not None else "keep"
    h, n_tok, _, records = runner._run_layers(
        runner._initial_sequence(llm_inputs), DynamicCache(), pruner, stages, replay, llm_inputs.sample_ids,
        llm_inputs.view_grids, policy, llm_inputs.embeds.shape[1])
    runner._logits(h)
    return n_tok[0].tolist(), records


@torch.no_grad()
def main() -> None:
    args, lvlm, batch = mid_llava_setup(__doc__, PROMPT)
    device = lvlm.device
    views = lvlm.encode_images(batch, PrunerNeeds())
    llm_inputs = lvlm._assemble(batch, views, None, "keep", ["0"])[0]

    entries = [("none", None)] + [(spec, tp.pruner_from_spec(spec, ratio=args.ratio)) for spec in METHODS]
    calls, layers = [], {}
    for key, pruner in entries:
        layers[key], records = prefill(lvlm, llm_inputs, pruner)
        calls.append(lambda p=pruner: prefill(lvlm, llm_inputs, p))
        if pruner is not None:
            replay = [(r.keep, r.merge) for r in records]
            calls.append(lambda p=pruner, r=replay: prefill(lvlm, llm_inputs, p, replay=r))
    times = paired_medians(calls, args.runs, device)
    full = llm_flops(lvlm.model.config, layers["none"], new_tokens=1)
    base = times[0]
    print(f"{'method':<24}{'visual L0/last':>16}{'avg':>8}{'FLOPs ratio':>13}{'prefill ms':>12}{'time ratio':>12}"
          f"{'no-score ms':>13}{'overhead':>10}")
    print(f"{'none':<24}{'576/576':>16}{576:>8}{1.0:>13.3f}{base * 1e3:>12.1f}{1.0:>12.3f}")
    t = iter(times[1:])
    n_text = layers["none"][0] - 576
    for key, pruner in entries[1:]:
        with_scoring, replayed = next(t), next(t)
        visual = [n - n_text for n in layers[key]]
        flops = llm_flops(lvlm.model.config, layers[key], new_tokens=1) / full
        print(f"{key:<24}{f'{visual[0]}/{visual[-1]}':>16}{sum(visual) / len(visual):>8.1f}{flops:>13.3f}"
              f"{with_scoring * 1e3:>12.1f}{with_scoring / base:>12.3f}{replayed * 1e3:>13.1f}"
              f"{with_scoring / replayed:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
