"""Average the weights of answer-stage checkpoints of one run (a "model soup") and score each input and the
average on the val questions, so that the choice of what to ship stays on val.

The LoRA deltas are averaged exactly: ``mean_i(up_i @ down_i) = [up_1 / n, ..., up_n / n] @ [down_1; ...; down_n]``,
so the soup is a rank ``n x r`` LoRA in the shipped format (the demo merges ``up @ down`` into the LLM at load,
whatever the rank). Averaging ``down`` and ``up`` separately would not give the average of the products. The
projectors are averaged too (with ``--lr 0`` they are one and the same).

Inputs are copies of the trainer's ``checkpoint.pt`` (it overwrites that file at every eval step; session 8 copied
it after each one, ``snap_evalK.pt`` = step 650 + 50 K) or exported ``.safetensors``. Session 8's soup of v10c
and v10d's last five evaluations scored 0.802 on 480 val questions, no better than its best single input
(``training/demo_video/soup_v10d_val480.txt``), so it was not shipped:

    R=runs/demo-video-train-v10d
    python training/demo_video/soup.py training/demo_video/checkpoints/demo_video_v10c.safetensors \\
        $R/snap_eval{5,6,7,8,9}.pt --val 480 --features $R/features_val_480_112px_10f_4l.pt \\
        --export runs/soup_v10c_tail5.safetensors
"""
import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenprune.zoo.demo import load_trained, split_trained
from tokenprune.zoo.demo_video import build_demo_video
from tokenprune.zoo.train_demo import add_lora, trained_tensors
from tokenprune.zoo.train_demo_video import VideoBatcher, first_token_accuracy, questions


def exported_tensors(path: Path, trainer_model) -> dict[str, torch.Tensor]:
    """The shipped-format tensors (projector + ``lora.<module>.down/up``) of an export, or of a trainer checkpoint
    loaded into ``trainer_model`` (the demo with peft LoRA, as the trainer builds it; every trained tensor is
    overwritten, so one model serves all checkpoints)."""
    if path.suffix == ".safetensors":
        return {k: v.float() for k, v in load_file(str(path)).items()}
    result = trainer_model.load_state_dict(torch.load(path, map_location="cpu")["trainable"], strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"{path}: {len(result.unexpected_keys)} tensors this model lacks; pass --lora-rank")
    return {k: v.float() for k, v in trained_tensors(trainer_model).items()}


def trainer_model(lora_rank: int):
    """The demo with rank-``lora_rank`` peft LoRA, as the trainer builds it (what its checkpoints load into)."""
    model, _ = build_demo_video(weights=None)
    add_lora(model.model.language_model, lora_rank, 2.0 * lora_rank)
    return model


def soup(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The exact average of ``parts`` (shipped-format dicts): projector tensors averaged, LoRA pairs stacked
    (``down`` ``[n*r, in]``, ``up`` ``[out, n*r]`` divided by n) so that ``up @ down`` is the mean delta."""
    n = len(parts)
    split = [split_trained(p) for p in parts]
    out = {f"multi_modal_projector.{k}": sum(s[0][k] for s in split) / n for k in split[0][0]}
    for name in split[0][1]:
        out[f"lora.{name}.down"] = torch.cat([s[1][name][0] for s in split], 0)
        out[f"lora.{name}.up"] = torch.cat([s[1][name][1] / n for s in split], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="checkpoint.pt copies or exported .safetensors")
    parser.add_argument("--val", type=int, default=480, help="val questions to score on")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--features", type=Path, required=True, help="the trainer's cached val features for --val")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--soup-only", action="store_true", help="score the soup only, not each input")
    parser.add_argument("--export", type=Path, default=None, help="write the soup here (fp16, shipped format)")
    args = parser.parse_args()
    if len(args.inputs) < 2:
        raise SystemExit("a soup needs two inputs or more")
    feats = torch.load(args.features)
    val = questions("val", args.val, args.frames)
    if len(feats) != len(val):
        raise SystemExit(f"{args.features} holds {len(feats)} videos, --val asks {len(val)}")
    items = [(i, q.question, q.answer, q.kind) for i, (_, q) in enumerate(val)]
    peft_model = trainer_model(args.lora_rank) if any(p.suffix != ".safetensors" for p in args.inputs) else None
    parts = [exported_tensors(p, peft_model) for p in args.inputs]
    mixed = soup(parts)
    # fp16 first, as shipped: every score below is of the weights a file would hold
    candidates = [] if args.soup_only else [(str(p), t) for p, t in zip(args.inputs, parts)]
    candidates.append((f"soup of {len(parts)}", mixed))
    for name, tensors in candidates:
        t0 = time.time()
        model, processor = build_demo_video(weights=None)
        load_trained(model, {k: v.to(torch.float16) for k, v in tensors.items()})
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            acc, per_kind = first_token_accuracy(model, VideoBatcher(model, processor), feats, items)
        print(f"{name}: val {acc:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in per_kind.items()) +
              f" ({time.time() - t0:.0f} s)", flush=True)
    if args.export:
        save_file({k: v.to(torch.float16).contiguous() for k, v in mixed.items()}, str(args.export))
        print(f"soup written to {args.export}")


if __name__ == "__main__":
    main()
