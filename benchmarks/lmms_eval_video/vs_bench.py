"""``python -m lmms_eval --model tokenprune`` on lmms-eval's own ``videomme`` task versus ``tokenprune bench``.

Writes a small, offline copy of Video-MME in its real schema into ``FOLDER/hf/videomme`` (the layout
of the Hub repository ``lmms-eval/Video-MME`` with its video archives extracted, which is also where
lmms-eval's ``videomme`` utils look for videos: ``$HF_HOME/videomme/data/<videoID>.mp4``, then
``.MP4``, then ``.mkv``):

* ``videomme/test-00000-of-00001.parquet``: ``n`` questions (two per video) with Video-MME's columns
  (``video_id``, ``duration``, ``domain``, ``sub_category``, ``url``, ``videoID``, ``question_id``,
  ``task_type``, ``question``, ``options`` as ``["A. ...", ...]``, ``answer``);
* ``data/<videoID>.mp4`` (one ``.MP4``, one ``.mkv``): short H.264 videos written with PyAV, a
  coloured square crossing a grey frame, of different lengths, frame rates and sizes (so the
  sampled frame counts and visual-token counts differ between videos).

Then it runs, offline (``HF_HOME=FOLDER/hf``, ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``):

1. lmms-eval 0.7.3, twice (the unpruned model and ``--method`` at ``--ratio``), on
   ``FOLDER/tasks/videomme_offline.yaml``, a task that ``include`` s lmms-eval's installed
   ``tasks/videomme/videomme.yaml`` -- so its real ``utils.py`` (``videomme_doc_to_visual``,
   ``videomme_doc_to_text``, ``videomme_process_results``, ``videomme_aggregate_results``) and
   generation options -- and only replaces the dataset: ``dataset_path: parquet`` with the local
   parquet as ``data_files`` (and no ``video: True`` / ``cache_dir``, so nothing is downloaded);
   ``--model tokenprune --model_args pretrained=M,method=...,ratio=...,sampler=S,frames=F``;
2. ``tokenprune bench --tasks videomme:sampler=S:frames=F --data-dir videomme=FOLDER/hf/videomme
   --methods METHOD --ratios R --limit all`` (the bench always adds the unpruned run);

and prints, per (method, ratio), on how many questions the two agree: the prompt text (lmms-eval's
logged ``doc_to_text`` context vs the bench task's ``prompt``), the templated prompt's token count,
the sampled frames (lmms-eval's ``video_frames`` vs the frames the bench task loads), the visual
tokens in / kept, the tokens summed over the LLM's layers, the answer text and the option letter
parsed from it (lmms-eval's ``extract_mcq_answer`` in ``videomme_process_results`` vs the bench's
port), then both headline scores (``videomme_perception_score``: lmms-eval's results file, the
bench's ``summary.csv``). Exit status 1 on any difference; differing questions are printed.

lmms-eval gives this task (which sets no ``until``) its default stop ``"\n\n"`` and cuts the answer
there; the bench's video tasks cut at the same string (``Task.until``). A bench answer still holding
it would mean they no longer agree, and is flagged.

lmms-eval's ``videomme/utils.py`` imports ``cv2`` (OpenCV) at the top, used only by the subtitle
variant; where OpenCV is not installed, the lmms-eval runs get a stand-in ``cv2`` module that fails
on any use (the script says so), so the no-subtitle task runs unchanged.

    python benchmarks/lmms_eval_video/vs_bench.py /tmp/tp_videomme --model tiny-qwen2-vl \
        --method divprune --ratio 0.5 --sampler qwen2_5_vl --frames 6
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TASK = "videomme_offline"
HEADLINE = "videomme_perception_score"
# (domain, sub_category) pairs and task types from lmms-eval's videomme/utils.py lists (its
# aggregation indexes a table by them: other values raise KeyError there)
DOMAINS = [("Knowledge", "Astronomy"), ("Sports Competition", "Football"), ("Life Record", "Pet & Animal"),
           ("Film & Television", "Animation"), ("Artistic Performance", "Magic Show")]
DURATIONS = ("short", "medium", "long")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
# per video: (source frames, fps, width, height); cycled over the videos
SHAPES = [(8, 4, 56, 56), (16, 4, 56, 56), (24, 8, 84, 56), (20, 4, 56, 84), (12, 8, 56, 56), (40, 8, 56, 56),
          (10, 2, 84, 84)]
EXTENSIONS = {3: "MP4", 7: "mkv"}  # videomme_doc_to_visual's fallbacks, exercised once each

YAML = """\
# lmms-eval's own videomme task (its utils.py: doc_to_visual / doc_to_text / process_results /
# aggregation, generation options, prompts) on a local parquet copy; written by vs_bench.py.
include: {include}
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
"""

CV2_STUB = '''\
"""Stand-in for OpenCV (not installed): lmms-eval's videomme/utils.py imports cv2 at the top but
uses it only for the subtitle task (extract_subtitles); any use fails loudly. Written by vs_bench.py."""


def __getattr__(name):
    raise ImportError(f"cv2.{name}: OpenCV is not installed (vs_bench.py's stand-in); pip install opencv-python-headless")
'''


# -- data ----------------------------------------------------------------------------------------
def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """``frames [T, H, W, 3]`` uint8 as H.264 (PyAV; the container from the file name)."""
    from tokenprune.media import write_video as write

    write(path, frames, fps=fps, codec="libx264")


DIRECTIONS = ("From left to right.", "From right to left.", "From top to bottom.", "From bottom to top.")


def moving_square(n: int, width: int, height: int, colour: tuple, direction: int, offset: int) -> np.ndarray:
    """``[n, height, width, 3]``: a 14-pixel square crossing a grey frame in ``DIRECTIONS[direction]``,
    ``offset`` pixels from the edge it runs along."""
    out = np.full((n, height, width, 3), 110, dtype=np.uint8)
    span = width if direction < 2 else height
    steps = np.linspace(0, span - 14, n).round().astype(int)
    if direction % 2:
        steps = steps[::-1]
    for t, s in enumerate(steps):
        y, x = (offset, s) if direction < 2 else (s, offset)
        out[t, y: y + 14, x: x + 14] = colour
    return out


def write_videomme(root: Path, n_questions: int, seed: int = 0) -> list[dict]:
    """A Video-MME copy under ``root`` (``videomme/test-*.parquet`` + ``data/``): two questions per
    video (direction of motion, colour). Returns the rows."""
    import datasets

    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for v in range((n_questions + 1) // 2):
        n, fps, w, h = SHAPES[v % len(SHAPES)]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        direction = int(rng.integers(len(DIRECTIONS)))
        vid = f"tpv{v:03d}x{int(rng.integers(1 << 20)):05x}"  # a YouTube-like id
        write_video(root / "data" / f"{vid}.{EXTENSIONS.get(v, 'mp4')}",
                    moving_square(n, w, h, COLOURS[colour], direction, int(rng.integers(0, min(w, h) - 14))), fps)
        domain, sub = DOMAINS[v % len(DOMAINS)]
        common = {"video_id": f"{v + 1:03d}", "duration": DURATIONS[v % 3], "domain": domain, "sub_category": sub,
                  "url": f"https://www.youtube.com/watch?v={vid}", "videoID": vid}
        rows.append({**common, "question_id": f"{v + 1:03d}-1", "task_type": "Spatial Reasoning",
                     "question": "In which direction does the square move?",
                     "options": [f"{chr(65 + i)}. {d}" for i, d in enumerate(DIRECTIONS)],
                     "answer": chr(65 + direction)})
        names = list(COLOURS)
        rows.append({**common, "question_id": f"{v + 1:03d}-2", "task_type": "Attribute Perception",
                     "question": "What colour is the moving square?",
                     "options": [f"{chr(65 + i)}. {c.capitalize()}." for i, c in enumerate(names)],
                     "answer": chr(65 + names.index(colour))})
    rows = rows[:n_questions]
    path = root / "videomme" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return rows


def write_task(folder: Path, parquet: Path) -> Path:
    """``folder/tasks/videomme_offline.yaml``, including lmms-eval's installed ``videomme.yaml``."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        sys.exit("lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 (docs/lmms_eval.md)")
    include = Path(spec.origin).parent / "tasks" / "videomme" / "videomme.yaml"
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(YAML.format(include=include, task=TASK, parquet=parquet))
    return tasks


# -- the two sides -------------------------------------------------------------------------------
def offline_env(folder: Path, stubs: Path | None) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(folder / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if stubs is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs), env.get("PYTHONPATH")) if p)
    return env


def run(cmd: list[str], env: dict, log: Path, cwd: Path) -> float:
    """Run ``cmd``; exit with its log's tail when it fails. Returns seconds."""
    print("$", " ".join(cmd).replace(sys.executable, "python"), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"exit status {proc.returncode}; log {log}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - t0


def run_lmms_eval(folder: Path, tasks: Path, env: dict, args, method: str | None) -> tuple[dict, dict[str, dict], float]:
    """``(results, {question_id: sample log}, seconds)`` of one lmms-eval run."""
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", method or "none")  # a spec's ':' is no folder name
    out = folder / "lmms_out" / name
    margs = [f"pretrained={args.model}"]
    if method:
        margs += [f"method={method}", f"ratio={args.ratio}"]
    margs += [f"sampler={args.sampler}"] + ([f"frames={args.frames}"] if args.frames else [])
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tokenprune", "--model_args", ",".join(margs),
           "--tasks", TASK, "--include_path", str(tasks), "--batch_size", str(args.batch_size),
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
           *(["--force_simple"] if args.force_simple else [])]
    seconds = run(cmd, env, folder / f"lmms_eval_{name}.log", folder)
    results = sorted(out.rglob("*_results.json"))
    files = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    if not results or not files:  # lmms-eval exits 0 when a task fails
        sys.exit(f"lmms-eval wrote no results for {TASK}; log {folder / f'lmms_eval_{name}.log'}")
    data = json.loads(results[-1].read_text())
    if TASK not in data.get("results", {}):
        sys.exit(f"lmms-eval's results hold no {TASK}; log {folder / f'lmms_eval_{name}.log'}")
    samples = {}
    for line in files[-1].read_text().splitlines():
        if line.strip():
            s = json.loads(line)
            samples[s[HEADLINE]["question_id"]] = s
    return data, samples, seconds


def run_bench(folder: Path, env: dict, args) -> tuple[dict[tuple[str, str], dict], dict, float]:
    """``({(method, question_id): row}, {(method, ratio): summary.csv row}, seconds)`` of one
    ``tokenprune bench`` run."""
    out = folder / "bench_out"
    if out.exists():
        shutil.rmtree(out)
    spec = f"videomme:sampler={args.sampler}" + (f":frames={args.frames}" if args.frames else "")
    cmd = [sys.executable, "-m", "tokenprune", "bench", "--model", args.model, "--tasks", spec,
           "--data-dir", f"videomme={folder / 'hf' / 'videomme'}", "--methods", args.method,
           "--ratios", str(args.ratio), "--limit", "all", "--batch-size", str(args.batch_size),
           "--bootstrap", "20", "--output", str(out)]
    seconds = run(cmd, env, folder / "bench.log", folder)
    rows = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["method"], r["sample_id"])] = r
    with (out / "summary.csv").open() as f:  # bench's own headline per (method, ratio): its `score` column
        # a ratio-free method (scissor) is one run with an empty ratio cell: the same row at any ratio
        summary = {(r["method"], float(r["ratio"]) if r["ratio"] else None): r for r in csv.DictReader(f)}
    return rows, summary, seconds


def bench_samples(folder: Path, args) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{question_id: (source frame indices, prompt)}`` as the bench's task builds them (its own
    loading code, ``tp.get_task('videomme', sampler=..., frames=...).load(data_dir=...)`` and
    ``task.prompt``, as ``bench`` runs it): bench's rows record neither."""
    import tokenprune as tp

    task = tp.get_task("videomme", sampler=args.sampler, frames=args.frames or None)
    data = task.load(data_dir=folder / "hf" / "videomme")
    return {s.id: (s.image.indices, task.prompt(s)) for s in data}


# -- comparison ----------------------------------------------------------------------------------
def compare(name: str, lmms: dict, samples: dict, rows: dict[str, dict], summary: dict,
            bench_inputs: dict[str, tuple[tuple[int, ...], str]], show: int) -> bool:
    """One line of agreement counts for one (method, ratio); the differing questions after it."""
    from tokenprune.benchmarks.tasks.video import extract_mcq_answer

    ids = sorted(set(samples) | set(rows))
    n = len(ids)
    same = dict.fromkeys(("prompt", "text_tok", "frames", "in", "kept", "prefill", "text", "letter"), 0)
    diffs, vis_in, kept, nframes = [], [], [], []
    for qid in ids:
        s, r = samples.get(qid), rows.get(qid)
        if s is None or r is None:
            diffs.append(f"{qid}: only in {'bench' if s is None else 'lmms-eval'}")
            continue
        c = s["token_counts"][0] or {}
        text = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        letter_l, letter_b = s[HEADLINE]["pred_answer"], extract_mcq_answer(r["prediction"], "ABCD")
        indices, prompt = bench_inputs.get(qid, ((), None))
        checks = {"prompt": s["input"] == prompt,  # lmms-eval's doc_to_text vs bench's task.prompt
                  "text_tok": c.get("text_tokens") == r["text_tokens"],  # the templated prompt's length
                  "frames": c.get("video_frames") == len(indices),
                  "in": c.get("visual_tokens_in") == r["visual_tokens_in"],
                  "kept": c.get("visual_tokens_kept") == r["visual_tokens_kept"],
                  "prefill": c.get("prefill_tokens") == r["prefill_tokens"],  # tokens summed over LLM layers
                  "text": text == r["prediction"], "letter": letter_l == letter_b}
        for k, ok in checks.items():
            same[k] += ok
        if not all(checks.values()):
            diffs.append(f"{qid}: lmms-eval {text!r} ({letter_l or '-'}) in/kept/text/frames "
                         f"{c.get('visual_tokens_in')}/{c.get('visual_tokens_kept')}/{c.get('text_tokens')}/"
                         f"{c.get('video_frames')}{'' if checks['prompt'] else ' prompt ' + repr(s['input'])} | bench "
                         f"{r['prediction']!r} ({letter_b or '-'}) {r['visual_tokens_in']}/{r['visual_tokens_kept']}/"
                         f"{r['text_tokens']}/{len(indices)}{'' if checks['prompt'] else ' prompt ' + repr(prompt)}")
            if "\n\n" in r["prediction"]:  # lmms-eval's default stop for this task; the bench cuts there too
                diffs.append(f"{qid}: bench's answer holds '\\n\\n', where lmms-eval cuts it (the task's until)")
        vis_in.append(r["visual_tokens_in"])
        kept.append(r["visual_tokens_kept"])
        nframes.append(len(indices))
    head_l = lmms["results"][TASK][f"{HEADLINE},none"]
    head_b = float(summary["score"])
    if int(summary["n_skipped"]):
        diffs.append(f"bench skipped {summary['n_skipped']} question(s): see bench_out/skipped.json")
    distinct = len({r["prediction"] for r in rows.values()})
    if abs(head_l - head_b) >= 1e-6:
        diffs.append(f"headline {HEADLINE}: lmms-eval {head_l} vs bench {head_b}")
    span = f"{min(nframes)}-{max(nframes)}" if nframes else "-"
    print(f"{name:<28} {n:>3} " + " ".join(f"{f'{same[k]}/{n}':>10}" for k in same)
          + f" {distinct:>8} {np.mean(vis_in) if vis_in else 0:>7.1f} {np.mean(kept) if kept else 0:>6.1f} {span:>6}"
          + f" {head_l:>7.2f} {head_b:>7.2f}")
    for d in diffs[:show]:
        print("   DIFF", d)
    return not diffs and all(v == n for v in same.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where the data, task YAML and runs are written")
    p.add_argument("--model", default="tiny-qwen2-vl", help="a zoo name, hub id or local path")
    p.add_argument("--n", type=int, default=20, help="questions (two per video)")
    p.add_argument("--method", default="divprune", help="the pruner compared besides the unpruned model")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--sampler", default="qwen2_5_vl", help="frame sampler, the same on both sides")
    p.add_argument("--frames", type=int, default=6,
                   help="the sampler's frame count, the same on both sides (0: the sampler's default)")
    p.add_argument("--batch_size", type=int, default=4, help="both sides")
    p.add_argument("--force_simple", action="store_true",
                   help="lmms-eval's simple model interface (doc_to_visual + context) instead of its default chat one")
    p.add_argument("--show", type=int, default=5, help="differing questions printed per run")
    args = p.parse_args(argv)
    if args.method in ("", "none"):
        p.error("--method: a pruner (the unpruned model is always run as well)")
    folder = args.folder.resolve()
    for old in ("lmms_out", "hf", "tasks", "bench_out"):
        shutil.rmtree(folder / old, ignore_errors=True)
    root = folder / "hf" / "videomme"
    rows = write_videomme(root, args.n)
    tasks = write_task(folder, root / "videomme" / "test-00000-of-00001.parquet")
    stubs = None
    if importlib.util.find_spec("cv2") is None:
        stubs = folder / "stubs"
        stubs.mkdir(exist_ok=True)
        (stubs / "cv2.py").write_text(CV2_STUB)
        print(f"OpenCV is not installed: lmms-eval runs with a stand-in cv2 module ({stubs / 'cv2.py'}; "
              "videomme's utils import it for subtitles only)")
    env = offline_env(folder, stubs)
    print(f"{len(rows)} questions on {len({r['videoID'] for r in rows})} videos in {root}; task {tasks / (TASK + '.yaml')}")

    lmms = {m: run_lmms_eval(folder, tasks, env, args, m) for m in (None, args.method)}
    bench, summary, bench_s = run_bench(folder, env, args)
    inputs = bench_samples(folder, args)
    print(f"lmms-eval {lmms[None][2]:.0f} s + {lmms[args.method][2]:.0f} s, tokenprune bench {bench_s:.0f} s "
          f"(logs in {folder})")
    print(f"prompt: lmms-eval's {'simple (doc_to_visual + context)' if args.force_simple else 'chat (doc_to_messages)'} "
          "interface vs bench's task.prompt")
    cols = ["prompt", "text tok", "frames", "vis in", "kept", "prefill", "answer", "letter"]
    header = (f"{'run':<28} {'qs':>3} " + " ".join(f"{c + ' =':>10}" for c in cols)
              + f" {'distinct':>8} {'in/q':>7} {'kept/q':>6} {'frames':>6} {'lmms':>7} {'bench':>7}")
    print(header)
    print("-" * len(header))
    ok = True
    for method, ratio in (("none", 1.0), (args.method, args.ratio)):
        results, samples, _ = lmms[None if method == "none" else method]
        mine = {qid: r for (m, qid), r in bench.items() if m == method}
        ok &= compare(f"{method} r={ratio:g}", results, samples, mine, summary.get((method, float(ratio))) or summary[(method, None)], inputs, args.show)
    print("X =: questions where lmms-eval and bench agree on X. prompt: doc_to_text vs task.prompt; text tok: the\n"
          "templated prompt's tokens; prefill: tokens summed over the LLM's layers; letter: the option parsed from the\n"
          "answer; distinct: different bench answers; lmms / bench: headline videomme_perception_score")
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
