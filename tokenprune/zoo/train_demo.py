"""Train the demo model's projector on easy-VQA (frozen DINOv2 and SmolLM2). Seeded and resumable.

    python -m tokenprune.zoo.train_demo --work runs/demo-train --steps 1500 \
        --export tokenprune/zoo/weights/demo_projector.safetensors

DINOv2 features of every image are computed once and cached in ``--work``. Each step feeds a
batch of (image features -> projector -> 256 tokens, question) prompts, in exactly the chat format
the benchmark uses, through the frozen LLM; the loss is on the answer tokens only. Every
``--eval-every`` steps: first-answer-token accuracy on held-out test questions, a checkpoint
(projector, optimizer, step) in ``--work``, and -- when accuracy improved -- the projector exported.
Rerunning the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from PIL import Image

from ..tasks.base import SHORT_ANSWER


def easy_vqa_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, Path]]:
    """``[(question, answer, image_id)]`` and ``{image_id: png path}`` of easy-VQA's ``split``."""
    from .convert import package_file

    root = package_file("easy_vqa", "data")
    questions = [tuple(q) for q in json.loads((root / split / "questions.json").read_text())]
    images = {int(p.stem): p for p in (root / split / "images").glob("*.png")}
    return questions, images


@torch.no_grad()
def cache_features(model, processor, images: dict[int, Path], path: Path, batch: int = 64) -> dict[int, torch.Tensor]:
    """DINOv2 features ``[256, 384]`` (fp16) of every image at the demo's feature layer, cached on disk."""
    if path.exists():
        return torch.load(path)
    from .demo import FEATURE_LAYER

    feats: dict[int, torch.Tensor] = {}
    ids = sorted(images)
    t0 = time.time()
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        pixels = processor.image_processor([Image.open(images[j]).convert("RGB") for j in chunk], return_tensors="pt")
        hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[FEATURE_LAYER]
        for j, h in zip(chunk, hidden[:, 1:]):
            feats[j] = h.to(torch.float16).clone()
        print(f"  features {i + len(chunk)}/{len(ids)} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(feats, path)
    return feats


class Batcher:
    """Builds ``inputs_embeds`` / labels for (features, question, answer) batches, in the chat format."""

    def __init__(self, model, processor):
        self.model = model
        self.tok = processor.tokenizer
        self.processor = processor
        self.image_id = model.config.image_token_id
        self.embed = model.model.language_model.embed_tokens
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, question: str) -> list[int]:
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + SHORT_ANSWER}]}],
            add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, feats: torch.Tensor, questions: list[str], answers: list[str] | None):
        """``feats`` ``[B, 256, 384]``; returns embeds ``[B, L, D]``, mask ``[B, L]``, labels, answer positions."""
        projected = self.model.model.multi_modal_projector(feats.float())  # [B, 256, D]
        rows, labels, answer_pos = [], [], []
        for b, q in enumerate(questions):
            ids = self.prompt_ids(q)
            cut = ids.index(self.image_id)
            ans = self.tok(answers[b], add_special_tokens=False)["input_ids"] + [self.end] if answers else []
            pre, post = torch.tensor(ids[:cut]), torch.tensor(ids[cut + 1:] + ans)
            emb = torch.cat([self.embed(pre), projected[b], self.embed(post)])
            n_prompt = len(pre) + projected.shape[1] + len(ids) - cut - 1
            lab = torch.full((emb.shape[0],), -100)
            if answers:
                lab[n_prompt:] = torch.tensor(ans)
            rows.append(emb)
            labels.append(lab)
            answer_pos.append(n_prompt - 1)  # the position whose logits predict the first answer token
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        lab = torch.full((len(rows), length), -100)
        for b, (r, l) in enumerate(zip(rows, labels)):  # right padding: positions stay 0..n-1
            embeds[b, : r.shape[0]], mask[b, : r.shape[0]], lab[b, : r.shape[0]] = r, 1, l
        return embeds, mask, lab, torch.tensor(answer_pos)


@torch.no_grad()
def first_token_accuracy(model, batcher, feats, questions, batch: int = 32) -> float:
    """Share of questions whose greedy first answer token is the reference's first token."""
    correct = 0
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        embeds, mask, _, pos = batcher(torch.stack([feats[q[2]] for q in chunk]), [q[0] for q in chunk], None)
        logits = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        pred = model.lm_head(logits[torch.arange(len(chunk)), pos]).argmax(-1)
        gold = torch.tensor([batcher.tok(q[1], add_special_tokens=False)["input_ids"][0] for q in chunk])
        correct += int((pred == gold).sum())
    return correct / len(questions)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo-train")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", default=None, help="write the best projector here (safetensors)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from .demo import build_demo

    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, processor = build_demo(projector=None)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    train_q, train_img = easy_vqa_split("train")
    test_q, test_img = easy_vqa_split("test")
    eval_q = random.Random(args.seed).sample(test_q, args.eval_size)
    print(f"easy-VQA: {len(train_q)} train questions on {len(train_img)} images; eval on {len(eval_q)} held-out "
          f"test questions; {sum(p.numel() for p in projector.parameters())} trainable parameters", flush=True)
    train_feats = cache_features(model, processor, train_img, work / "features_train.pt")
    test_feats = cache_features(model, processor, {q[2]: test_img[q[2]] for q in eval_q}, work / "features_eval.pt")

    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    step, best = 0, -1.0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt)
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], state["best"]
        print(f"resumed at step {step} (best first-token accuracy {best:.3f})", flush=True)
    batcher = Batcher(model, processor)
    order = list(range(len(train_q)))
    t0 = time.time()
    while step < args.steps:
        epoch, offset = divmod(step * args.batch, len(order))
        perm = order[:]
        random.Random(args.seed + epoch).shuffle(perm)  # the same batches whatever the resume point
        idx = perm[offset:offset + args.batch]
        qs = [train_q[i] for i in idx]
        embeds, mask, labels, _ = batcher(torch.stack([train_feats[q[2]] for q in qs]), [q[0] for q in qs], [q[1] for q in qs])
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Vocabulary logits only where an answer token is predicted (2-3 of ~283 positions): the
        # LM head over every position would cost more than the whole projector.
        target = labels[:, 1:]
        where = target != -100
        logits = model.lm_head(out[:, :-1][where]).float()
        loss = torch.nn.functional.cross_entropy(logits, target[where])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{(time.time() - t0) / 10:.1f} s/step", flush=True)
            t0 = time.time()
        if step % args.eval_every == 0 or step == args.steps:
            projector.eval()
            with torch.no_grad():
                acc = first_token_accuracy(model, batcher, test_feats, eval_q)
            projector.train()
            improved = acc > best
            best = max(best, acc)
            torch.save({"projector": projector.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "best": best}, ckpt)
            if improved and args.export:
                Path(args.export).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, args.export)
            with (work / "log.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "eval_first_token_acc": acc,
                                    "exported": bool(improved and args.export)}) + "\n")
            print(f"eval step {step}: first-token accuracy {acc:.3f} (best {best:.3f}){' -> exported' if improved and args.export else ''}",
                  flush=True)


if __name__ == "__main__":
    main()
