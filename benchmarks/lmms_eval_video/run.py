"""Offline check of ``--model tokenprune`` on video and multi-image tasks.

Writes, into a folder, three small lmms-eval tasks with their data (the YAMLs and ``utils.py`` of
this folder are copied next to the data, as ``--include_path`` reads them):

* ``tp_video_mc``: ``n`` short mp4 videos written with PyAV (8 frames, 56x56, 4 fps; a square
  moving left or right) plus one file that is not a video, one ``[path]`` per question (the
  convention of lmms-eval's video tasks); a two-option direction question;
* ``tp_video_frames_mc``: the same videos handed over as lists of PIL frames, the task's
  ``metadata`` (``task_type: video``, ``sample_frames: 4``) making each one video;
* ``tp_multi_image_mc``: ``n`` questions over 2-3 images each (which one shows the red square?),
  the images at the question's ``<image>`` marks (even documents) or first (odd ones).

Then runs ``python -m lmms_eval --model tokenprune`` on them (offline; lmms-eval's default chat
interface, or its simple one with ``--force_simple``), and the same questions
through tokenprune's own API (``tp.load(model).generate([Video | [images]], prompts)``, one
question per call: these custom tasks have no ``tokenprune bench`` counterpart; ``vs_bench.py``
compares lmms-eval's own ``videomme`` with ``tokenprune bench``), and prints, per task, how many
answers and visual-token counts (in / kept) and frame counts agree. Exit status 1 on any
difference, or when the unreadable file was not answered empty with one logged line.

    python benchmarks/lmms_eval_video/run.py /tmp/tp_video_check --model tiny-qwen2-vl \
        --method divprune --ratio 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TASKS = ("tp_video_mc", "tp_video_frames_mc", "tp_multi_image_mc")
FRAMES, SIZE, FPS = 8, 56, 4
SAMPLE_FRAMES = 4  # tp_video_frames_mc.yaml's metadata
MAX_NEW_TOKENS, UNTIL = 4, "\n"  # the YAMLs' generation_kwargs
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245)}
BROKEN = "videos/broken.mp4"


# -- data ----------------------------------------------------------------------------------------
def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """``frames [T, H, W, 3]`` uint8 as an H.264 mp4 (PyAV)."""
    from tokenprune.media import write_video

    write_video(path, frames, fps=fps, codec="libx264")


def moving_square(rng: np.random.Generator, rightward: bool) -> np.ndarray:
    """``[FRAMES, SIZE, SIZE, 3]``: a coloured 14-pixel square crossing a grey frame."""
    colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
    y = int(rng.integers(0, SIZE - 14))
    xs = np.linspace(0, SIZE - 14, FRAMES).round().astype(int)
    out = np.full((FRAMES, SIZE, SIZE, 3), 110, dtype=np.uint8)
    for t, x in enumerate(xs if rightward else xs[::-1]):
        out[t, y: y + 14, x: x + 14] = colour
    return out


def write_tasks(folder: Path, n: int, seed: int = 0) -> None:
    """The three tasks' data, YAMLs and ``utils.py`` in ``folder``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        rightward = bool(rng.integers(2))
        write_mp4(folder / f"videos/vid_{i:02d}.mp4", moving_square(rng, rightward))
        options = ["left to right", "right to left"]
        rows.append({"video": f"videos/vid_{i:02d}.mp4", "question": "In which direction does the square move?",
                     "options": options, "answer": "A" if rightward else "B"})
    (folder / BROKEN).write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())  # not a video
    rows.append({"video": BROKEN, "question": "In which direction does the square move?",
                 "options": ["left to right", "right to left"], "answer": "A"})
    (folder / "video_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = []
    for i in range(n):
        k = 2 + i % 2
        red = int(rng.integers(k))
        names = []
        for j in range(k):
            others = [c for c in COLOURS if c != "red"]
            colour = COLOURS["red"] if j == red else COLOURS[others[rng.integers(len(others))]]
            im = np.full((SIZE, SIZE, 3), 110, dtype=np.uint8)
            y, x = rng.integers(0, SIZE - 20, 2)
            im[y: y + 20, x: x + 20] = colour
            names.append(f"images/img_{i:02d}_{j}.png")
            Image.fromarray(im).save(folder / names[-1])
        marks = "".join(f"Image {j + 1}: <image>\n" for j in range(k)) if i % 2 == 0 else ""
        rows.append({"images": names, "question": f"{marks}Which image shows a red square?",
                     "options": [f"Image {j + 1}" for j in range(k)], "answer": chr(ord("A") + red)})
    (folder / "multi_image_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for f in HERE.iterdir():
        if f.suffix in (".yaml", ".py") and f.name != Path(__file__).name:
            shutil.copy(f, folder / f.name)


# -- the two sides -------------------------------------------------------------------------------
def model_args(args: argparse.Namespace) -> str:
    out = [f"pretrained={args.model}"]
    if args.method:
        out += [f"method={args.method}", f"ratio={args.ratio}"]
    if args.sampler:
        out.append(f"sampler={args.sampler}")
    if args.frames:
        out.append(f"frames={args.frames}")
    return ",".join(out)


def lmms_eval_command(folder: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "lmms_eval", "--model", "tokenprune", "--model_args", model_args(args),
            "--tasks", ",".join(TASKS), "--include_path", str(folder), "--batch_size", str(args.batch_size),
            "--output_path", str(folder / "lmms_out"), "--log_samples", "--verbosity", "WARNING",
            *(["--force_simple"] if args.force_simple else [])]


def run_lmms_eval(folder: Path, args: argparse.Namespace) -> tuple[dict, dict[str, dict[int, dict]], str]:
    """``(results, {task: {doc_id: sample}}, log text)`` of one offline lmms-eval run."""
    env = dict(os.environ, HF_HOME=str(folder / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    cmd = lmms_eval_command(folder, args)
    print("$", " ".join(cmd[1:]).replace(sys.executable, "python"), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (folder / "lmms_eval.log").write_text(log)
    print(f"lmms-eval exit status {proc.returncode} in {time.perf_counter() - t0:.0f} s (log: {folder / 'lmms_eval.log'})")
    results = sorted((folder / "lmms_out").rglob("*_results.json"))
    if proc.returncode != 0 or not results:
        sys.exit(f"lmms-eval failed:\n{log[-4000:]}")
    data = json.loads(results[-1].read_text())
    samples = {}
    for task in TASKS:
        files = sorted((folder / "lmms_out").rglob(f"*_samples_{task}.jsonl"))
        if task not in data["results"] or not files:  # lmms-eval exits 0 when a task fails
            sys.exit(f"lmms-eval wrote no results for {task}:\n{log[-4000:]}")
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        samples[task] = {r["doc_id"]: r for r in rows}
    return data, samples, log


def reference(folder: Path, args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """The same questions through tokenprune's API, one per call: ``{task: {doc_id: answer}}``."""
    sys.path.insert(0, str(folder))
    import utils  # the task folder's: the same prompts and frame lists lmms-eval builds

    import tokenprune as tp
    from tokenprune.integrations.lmms_eval.model import DEFAULT_SAMPLER, VIDEO_SAMPLERS
    from tokenprune.media import MediaError
    from tokenprune.pruner import pruner_from_spec

    lvlm = tp.load(args.model)
    lvlm.model.to("cpu")
    pruner = pruner_from_spec(args.method, ratio=args.ratio) if args.method else None
    sampler = args.sampler or VIDEO_SAMPLERS.get(lvlm.family, DEFAULT_SAMPLER)
    docs = {"tp_video_mc": _rows(folder / "video_mc.jsonl"), "tp_video_frames_mc": _rows(folder / "video_mc.jsonl"),
            "tp_multi_image_mc": _rows(folder / "multi_image_mc.jsonl")}
    out: dict[str, dict[int, dict]] = {}
    for task, rows in docs.items():
        out[task] = {}
        for doc_id, doc in enumerate(rows):
            try:
                if task == "tp_video_mc":
                    visual = tp.Video.from_file(folder / doc["video"], sampler=sampler, frames=args.frames)
                elif task == "tp_video_frames_mc":
                    visual = tp.Video.from_frames(utils.frames_doc_to_visual(doc)).sample("llava_onevision",
                                                                                          frames=SAMPLE_FRAMES)
                else:
                    visual = utils.images_doc_to_visual(doc)
            except MediaError as e:
                out[task][doc_id] = {"text": "", "error": str(e)}
                continue
            res = lvlm.generate([visual], [utils.doc_to_text(doc)], pruner=pruner, max_new_tokens=MAX_NEW_TOKENS,
                                sample_ids=[f"{task}/test/{doc_id}"])
            st = res.stats[0]
            out[task][doc_id] = {"text": res.texts[0].split(UNTIL)[0].strip(), "in": st.visual_tokens_in,
                                 "kept": st.visual_tokens_kept,
                                 "frames": visual.num_frames if isinstance(visual, tp.Video) else None}
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- comparison ----------------------------------------------------------------------------------
def compare(results: dict, samples: dict, ref: dict, log: str) -> bool:
    ok = True
    header = (f"{'task':<20} {'docs':>4} {'skipped':>7} {'answers =':>9} {'tokens =':>8} {'frames =':>8} "
              f"{'distinct':>8} {'vis in/q':>8} {'kept/q':>6} {'accuracy':>8}")
    print(header)
    print("-" * len(header))
    diffs = []
    for task in TASKS:
        lm, rf = samples[task], ref[task]
        same_text = same_tokens = same_frames = skipped = 0
        vis_in, kept = [], []
        for doc_id, r in rf.items():
            s = lm[doc_id]
            counts = s["token_counts"][0] or {}
            text = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            if "error" in r:
                skipped += 1
                good = text == "" and "media_error" in counts
                same_text += good
                same_tokens += good
                same_frames += good
                if not good:
                    diffs.append((task, doc_id, "unreadable file not answered empty", text, counts))
                continue
            same_text += text == r["text"]
            same_tokens += (counts.get("visual_tokens_in"), counts.get("visual_tokens_kept")) == (r["in"], r["kept"])
            same_frames += counts.get("video_frames") == r["frames"]
            if text != r["text"] or counts.get("visual_tokens_kept") != r["kept"] or counts.get("video_frames") != r["frames"]:
                diffs.append((task, doc_id, (text, counts.get("visual_tokens_in"), counts.get("visual_tokens_kept"),
                                             counts.get("video_frames")), (r["text"], r["in"], r["kept"], r["frames"])))
            vis_in.append(r["in"])
            kept.append(r["kept"])
        n = len(rf)
        ok &= same_text == same_tokens == same_frames == n == len(lm)
        acc = results["results"][task]["accuracy,none"]
        distinct = len({r["text"] for r in rf.values() if "error" not in r})  # how telling "answers =" is
        print(f"{task:<20} {n:>4} {skipped:>7} {same_text:>5}/{n:<3} {same_tokens:>4}/{n:<3} {same_frames:>4}/{n:<3} "
              f"{distinct:>8} {np.mean(vis_in):>8.1f} {np.mean(kept):>6.1f} {acc:>8.3f}")
    for d in diffs[:10]:
        print("DIFF", *d)
    errors = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in log.splitlines() if "answered empty" in line]
    print(f"logged media errors: {len(errors)}")
    for line in errors:
        print("  ", line.strip().split(" - ", 1)[-1][:200])
    expected = sum("error" in r for t in TASKS for r in ref[t].values())
    ok &= len(errors) == expected
    thr = results.get("throughput", {})
    print("throughput:", {k: v for k, v in thr.items() if k.startswith("avg_tokenprune")})
    return ok and not diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where the tasks, data and runs are written")
    p.add_argument("--model", default="tiny-qwen2-vl", help="a zoo name, hub id or local path")
    p.add_argument("--n", type=int, default=20, help="questions per task (the video task gets one unreadable file more)")
    p.add_argument("--method", default=None, help="a pruner (default: unpruned)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--sampler", default=None, help="video sampler (default: the plugin's for the family)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--force_simple", action="store_true",
                   help="lmms-eval's simple model interface (doc_to_visual) instead of its default chat one (doc_to_messages)")
    args = p.parse_args(argv)
    folder = args.folder.resolve()
    if (folder / "lmms_out").exists():
        shutil.rmtree(folder / "lmms_out")
    write_tasks(folder, args.n)
    results, samples, log = run_lmms_eval(folder, args)
    ref = reference(folder, args)
    ok = compare(results, samples, ref, log)
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
