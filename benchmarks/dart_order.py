"""DART's pivot order on the demo: does ``pivot_order="official"`` keep what the official loop keeps?

    python benchmarks/dart_order.py [--runs 12] [--ratios 0.5,0.25,0.1] [--model tokenprune-demo]

The official code (``ZichenWen1/DART``, ``llava/model/language_model/modeling_llama_self.py``,
``DART.get_retained_image_token``; read at the fork ``xqy1111111/DART@d6a5af6``) visits its pivots in
``list(set(image_indices + query_indices))`` order: absolute sequence positions in a Python set, so
CPython's hash-table order. For each of ``--runs`` questions of ``shapes_scene`` (batch 1, as the
official code runs) and each ratio, this prints:

- ``start``: where the image starts in the unpadded prompt (from the processor's ``input_ids``);
- ``walk==seq``: whether the official set order happens to equal sequence order for this run;
- ``off-vs-seq``: how many kept tokens ``pivot_order="official"`` and ``pivot_order="sequence"`` do not
  share (tokens kept by one and not the other, counted once per pair);
- ``ours==literal``: whether tokenprune's kept set (default ``pivot_order="official"``) equals that of
  :func:`official_get_retained_image_token`, a line-by-line transcription of the official function, run on
  the sample's own unpadded sequence: the hidden states entering layer ``k`` through the final norm and the
  layer ``k - 1`` keys repeated over the GQA groups (``repeat_kv``, as the official attention returns them),
  both as the decoder recorded them, placed at their absolute positions (zeros before the image: never read);
- ``batched``: whether the same questions in one left-padded batch keep the same sets as alone.

Not a test (tests/test_method_dart.py is); it is the evidence for the official order on a real prompt layout.
About 9 minutes for the default 12 x 3 runs on 2 shared CPU cores (``--ratios 0.25``: a third of that).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import tokenprune as tp
from tokenprune.benchmarks.tasks import get_task
from tokenprune.pruner import PruningInputs
from tokenprune.testing import recording


def official_get_retained_image_token(last_layer_state, any_states, image_token_start_index, image_token_length,
                                      max_num_trunction, pivot_image_token=4, pivot_text_token=4):
    """``DART.get_retained_image_token``, batch 1, transcribed line by line. Changes: the ``DART_config``
    read replaced by the arguments; ``any_states`` comes already permuted and reshaped to ``[1, L, H * d]``;
    ``reduction_ratio`` unused (``max_num_trunction`` is given, as the official LLaVA scripts do)."""
    TOKEN_TOPK = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    device = last_layer_state.device
    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)
    return retained_image_tokens_index


def kept_alone(lvlm, image, prompt, sid, **options) -> tuple[list[int], PruningInputs]:
    pruner = tp.create_pruner("dart", **options)
    calls = recording(pruner)
    lvlm.generate([image], [prompt], pruner=pruner, max_new_tokens=1, sample_ids=[sid])
    (inputs, red), = calls
    return red.indices[0].tolist(), inputs


def literal(lvlm, image, prompt, inputs: PruningInputs, ratio: float) -> tuple[list[int], int, bool]:
    """The official function on this sample: (kept visual indices, image start, walk == sequence order)."""
    ids = lvlm.prepare([image], [prompt])["input_ids"][0]
    span = (ids == lvlm.model.config.image_token_id).nonzero().flatten()
    start, n = int(span[0]), len(span)
    assert span.tolist() == list(range(start, start + n)) and n == inputs.num_tokens, "one contiguous image"
    t = int(inputs.text_mask[0].sum())
    assert start + n + t == len(ids), "the text after the image runs to the end of the prompt"
    norm = inputs.final_norm
    cfg = lvlm.runner.model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads

    def repeat_kv(k):  # [L, H_kv * d] -> [L, H * d], each kv head repeated over its query group
        return k.unflatten(-1, (cfg.num_key_value_heads, -1)).repeat_interleave(groups, dim=1).flatten(1)

    with torch.no_grad():
        d = inputs.tokens.shape[-1]
        states = torch.cat([torch.zeros(start, d), norm(inputs.tokens[0]), norm(inputs.text_tokens[0][inputs.text_mask[0]])])
        keys = torch.cat([repeat_kv(inputs.llm_keys[0]), repeat_kv(inputs.text_keys[0][inputs.text_mask[0]])])
        keys = torch.cat([torch.zeros(start, keys.shape[1]), keys])
        kept = official_get_retained_image_token(states[None].float(), keys[None].float(), start, n, int(ratio * n))
        # the walk alone, to say whether it happens to be sequence order here
        img = (torch.norm(keys[start:start + n], p=1, dim=-1).topk(4).indices + start).tolist()
        txt = (torch.norm(keys[start + n:], p=1, dim=-1).topk(4).indices + start + n).tolist()
    return sorted(p - start for p in kept.tolist()), start, list(set(img + txt)) == sorted(img) + sorted(txt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--model", default="tokenprune-demo")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    lvlm = tp.load(args.model)
    task = get_task("shapes_scene")
    samples = list(task.load(limit=args.runs))
    prompts = [task.prompt(s) for s in samples]
    print(f"DART pivot order on {args.model}, shapes_scene, {len(samples)} questions x ratios {ratios}; "
          f"Python {sys.version.split()[0]}")
    print(f"{'ratio':>5} {'run':>3} {'question':<44} {'N':>4} {'start':>5} {'kept':>4} {'walk==seq':>9} "
          f"{'off-vs-seq':>10} {'ours==literal':>13} {'batched':>7}")
    off_literal, off_batched, changed, total = 0, 0, 0, 0
    for ratio in ratios:
        batch_pruner = tp.create_pruner("dart", ratio=ratio)
        calls = recording(batch_pruner)
        ids = [s.id for s in samples]
        lvlm.generate([s.image for s in samples], prompts, pruner=batch_pruner, max_new_tokens=1, sample_ids=ids)
        batched = {sid: red.indices[i].tolist() for inp, red in calls for i, sid in enumerate(inp.sample_ids)}
        for r, (s, prompt) in enumerate(zip(samples, prompts)):
            ours, inputs = kept_alone(lvlm, s.image, prompt, s.id, ratio=ratio)
            seq, _ = kept_alone(lvlm, s.image, prompt, s.id, ratio=ratio, pivot_order="sequence")
            ref, start, walk_is_seq = literal(lvlm, s.image, prompt, inputs, ratio)
            diff = len(set(ours) - set(seq))
            same, same_batched = ours == ref, batched[s.id] == ours
            off_literal += not same
            off_batched += not same_batched
            changed += diff > 0
            total += 1
            print(f"{ratio:>5} {r:>3} {s.question[:44]:<44} {inputs.num_tokens:>4} {start:>5} {len(ours):>4} "
                  f"{str(walk_is_seq):>9} {diff:>10} {str(same):>13} {str(same_batched):>7}")
    print(f"official vs sequence order: kept sets differ in {changed} of {total} runs; ours == the literal "
          f"official loop in {total - off_literal} of {total}; batched == alone in {total - off_batched} of {total}")
    return 1 if off_literal or off_batched else 0


if __name__ == "__main__":
    raise SystemExit(main())
