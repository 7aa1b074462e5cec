"""The loop a user would write without tokenprune: the baseline for ``tokenprune bench --methods none``.

    /usr/bin/time -v python benchmarks/speed/plain_hf_loop.py [--task shapes_scene] [--limit 64] [--batch-size 8]
    /usr/bin/time -v tokenprune bench --methods none --tasks shapes_scene --limit 64 --output /tmp/vs_hf_bench

The demo's Hugging Face checkpoint (``tokenprune.zoo.demo.demo_checkpoint()``) loaded with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``; the same seeded subset of the
task's samples as the bench (``task.load(limit, seed)``), the same prompts (the task's, through the processor's
chat template), batches of the same size, greedy ``model.generate`` with the task's answer budget, answers scored
with the task's own metric. Prints the accuracy (the bench's ``none`` row must equal it) and the answers' digest.
Compare the two processes' wall time and peak memory (``Maximum resident set size``) from ``/usr/bin/time -v``.
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="shapes_scene")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="the bench's default batch (8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.benchmarks.tasks import get_task
    from tokenprune.zoo.demo import demo_checkpoint

    folder = demo_checkpoint()
    model = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"
    task = get_task(args.task)
    samples = list(task.load(limit=args.limit, seed=args.seed))
    hits, answers = [], []
    with torch.no_grad():
        for i in range(0, len(samples), args.batch_size):
            chunk = samples[i:i + args.batch_size]
            texts = [processor.apply_chat_template([{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": task.prompt(s)}]}], add_generation_prompt=True)
                for s in chunk]
            inputs = processor(images=[s.image for s in chunk], text=texts, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False)
            decoded = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, s in zip(decoded, chunk):
                answers.append(text.strip())
                hits.append(task.score(text.strip(), s)["accuracy"])
    digest = hashlib.sha256("\n".join(answers).encode()).hexdigest()[:12]
    print(f"{args.task}: {len(samples)} samples, accuracy {sum(hits) / len(hits):.4f}, answers {digest}, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
