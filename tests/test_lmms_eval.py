"""tokenprune inside lmms-eval (``--model tokenprune``), run for real, offline, on the demo model.

1. A local easy-VQA task (100 questions, parquet next to a copy of tests/fixtures/lmms_eval/):
   ``python -m lmms_eval`` scores it, with each sample's visual tokens and FLOPs in the sample log
   and their sums in the results file;
2. ``tokenprune bench`` (run alongside) gives the same answer to each of its questions, method and
   ratio being the same (same prompt, same scoring, same FLOPs);
3. the same questions as multiple choice (loglikelihood requests on the pruned prefill) score;
4. ``torchrun --nproc-per-node 2`` (gloo on CPU, lmms-eval's default chat path) gives the results
   of the one process.
lmms-eval exits 0 even when a task or the model fails, so every check reads the written files.
Plus the request handling in-process on a tiny model, and the model's arguments and errors; and
video / multi-image requests in-process on tiny Qwen2-VL against ``generate`` (the full offline
lmms-eval run on video tasks is ``benchmarks/lmms_eval_video/run.py``).

lmms-eval is installed without its dependencies (see docs/lmms_eval.md); skipped when it is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("easy_vqa")

import tokenprune as tp  # noqa: E402
from tokenprune.errors import OptionError, UnknownNameError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "lmms_eval"
N_QUESTIONS = 100  # the lmms-eval run
N_BENCH = 16  # the bench comparison: its seeded subset of 16 is the first 16 picks of the 100 (same seed)
N_MC = 16
N_RANKS = 16  # questions of the torchrun comparison
METHOD, RATIO = "fopru_rank", 0.25
MODEL_ARGS = f"pretrained=tokenprune-demo,method={METHOD},ratio={RATIO}"
COLOURS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
SHAPES = ["circle", "rectangle", "triangle"]


def offline_env(home: Path) -> dict[str, str]:
    # One thread each: the lmms-eval run and the bench run side by side (and torchrun's ranks, which
    # torchrun gives one thread), on the same kernels.
    env = dict(os.environ, HF_HOME=str(home / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("LMMS_EVAL_PLUGINS", None)  # found through the entry point, not the legacy plugin variable
    return env


def choices_for(answer: str) -> list[str]:
    return COLOURS if answer in COLOURS else SHAPES if answer in SHAPES else ["yes", "no"]


def write_tasks(folder: Path, n: int) -> list[str]:
    """The task YAMLs and their parquet files (the bench's seeded subset of ``n`` easy-VQA test
    questions, in its order: doc ``i`` is bench sample ``ids[i]``); returns the bench's sample ids."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    for f in FIXTURES.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    data = tp.get_task("easy_vqa").load(limit=n, seed=0)  # what `tokenprune bench --limit n` evaluates
    ids = data.ids()
    rows = [data.rows[i] for i in data.indices]
    images = [{"bytes": Path(r["image"]["path"]).read_bytes(), "path": None} for r in rows]
    features = datasets.Features({"sample_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict({"sample_id": ids, "question": [r["question"] for r in rows],
                                "answer": [r["answer"] for r in rows], "image": images},
                               features=features).to_parquet(str(folder / "easy_vqa.parquet"))
    mc_features = datasets.Features({**features, "choices": datasets.Sequence(datasets.Value("string")),
                                     "label": datasets.Value("int32")})
    mc = rows[:N_MC]
    datasets.Dataset.from_dict({"sample_id": ids[:N_MC], "question": [r["question"] for r in mc],
                                "answer": [r["answer"] for r in mc], "image": images[:N_MC],
                                "choices": [choices_for(r["answer"]) for r in mc],
                                "label": [choices_for(r["answer"]).index(r["answer"]) for r in mc]},
                               features=mc_features).to_parquet(str(folder / "easy_vqa_mc.parquet"))
    return ids


def lmms_eval_command(task_dir: Path, out: Path, tasks: str, extra: list[str] = (), nproc: int = 1) -> list[str]:
    """``python -m lmms_eval --model tokenprune ...`` (under torchrun with ``nproc`` > 1)."""
    args = ["--model", "tokenprune", "--model_args", MODEL_ARGS, "--tasks", tasks, "--include_path", str(task_dir),
            "--batch_size", "8", "--output_path", str(out), "--log_samples", "--verbosity", "WARNING", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "lmms_eval", *args]


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """A subprocess, offline, its output in ``cwd/log.txt``."""
    log = (cwd / "log.txt").open("w")
    return subprocess.Popen(cmd, cwd=cwd, env=offline_env(cwd), stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, cwd: Path) -> None:
    rc = proc.wait(timeout=900)
    assert rc == 0, (cwd / "log.txt").read_text()[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_run(out: Path, task: str) -> tuple[dict, dict[int, dict]]:
    """The results of ``task`` (the results file, checked to hold it) and its sample log by doc id."""
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    assert results and samples, f"lmms-eval wrote no results for {task} under {out}: {sorted(out.rglob('*'))}"
    data = json.loads(results[-1].read_text())
    assert task in data["results"], data["results"]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return data, {r["doc_id"]: r for r in rows}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("lmms_tasks")
    return folder, write_tasks(folder, N_QUESTIONS)


@pytest.fixture(scope="module")
def runs(task_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One lmms-eval run of both tasks through lmms-eval's simple task path (which multiple choice
    needs) and, at the same time, `tokenprune bench` on the first questions: ``(lmms-eval output, bench output)``."""
    folder, _ = task_dir
    lmms, bench = tmp_path_factory.mktemp("lmms_run"), tmp_path_factory.mktemp("bench_run")
    procs = [(start(lmms_eval_command(folder, lmms / "out", "easy_vqa_tp,easy_vqa_tp_mc", ["--force_simple"]), lmms), lmms),
             (start([sys.executable, "-m", "tokenprune", "bench", "--tasks", "easy_vqa", "--methods", METHOD, "--ratios",
                     str(RATIO), "--limit", str(N_BENCH), "--output", str(bench / "out"), "--bootstrap", "10"], bench), bench)]
    for proc, cwd in procs:
        finish(proc, cwd)
    return lmms / "out", bench / "out"


@pytest.fixture(scope="module")
def simple_run(runs) -> Path:
    return runs[0]


def test_manifest_resolves_to_the_model_classes():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from tokenprune.integrations.lmms_eval.manifest import MANIFEST
    from tokenprune.integrations.lmms_eval.model import TokenPrune, TokenPruneChat

    registry = ModelRegistryV2()
    registry.register_manifest(MANIFEST)  # what lmms-eval does with the entry point's payload
    assert registry.get_model_class("tokenprune") is TokenPruneChat
    assert registry.get_model_class("tokenprune", force_simple=True) is TokenPrune
    # `--model tokenprune` in the runs below is found through the installed entry point


def test_lmms_eval_scores_100_questions_with_the_cost_of_each(task_dir, simple_run):
    results, samples = read_run(simple_run, "easy_vqa_tp")
    assert sorted(samples) == list(range(N_QUESTIONS))
    acc = results["results"]["easy_vqa_tp"]["accuracy,none"]
    assert 0.8 < acc <= 1.0, acc  # the demo model answers most easy-VQA questions, at ratio 0.25 too
    assert acc == pytest.approx(sum(s["accuracy"] for s in samples.values()) / N_QUESTIONS)
    counts = [s["token_counts"][0] for s in samples.values()]  # per sample: visual tokens and FLOPs
    assert all(c["visual_tokens_in"] == 256 and c["visual_tokens_kept"] == 64 and c["tflops"] > c["tflops_vision"] > 0
               for c in counts)
    throughput = results["throughput"]  # summed over the run (both tasks)
    mc = [c for s in read_run(simple_run, "easy_vqa_tp_mc")[1].values() for c in s["token_counts"]]
    assert throughput["avg_tokenprune_requests"] == N_QUESTIONS + len(mc)
    assert throughput["avg_tokenprune_total_visual_tokens_kept"] == sum(c["visual_tokens_kept"] for c in counts + mc)
    assert throughput["avg_tokenprune_total_tflops"] == pytest.approx(sum(c["tflops"] for c in counts + mc), rel=1e-9)
    assert results["efficiency"]["by_task"]["easy_vqa_tp"]["total_input_tokens"] == sum(c["input_tokens"] for c in counts)


def test_same_answers_as_tokenprune_bench(task_dir, runs):
    """`tokenprune bench` on the same questions, method and ratio answers every question the same."""
    _, ids = task_dir
    simple_run, out = runs
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    bench_rows = {r["sample_id"]: r for r in rows if r["method"] == METHOD}
    assert len(bench_rows) == N_BENCH and set(bench_rows) <= set(ids)
    _, samples = read_run(simple_run, "easy_vqa_tp")
    lmms_rows = {ids[doc_id]: s for doc_id, s in samples.items()}
    differ = [(sid, r["prediction"], lmms_rows[sid]["filtered_resps"]) for sid, r in bench_rows.items()
              if r["prediction"] != lmms_rows[sid]["filtered_resps"]]
    assert not differ, differ
    for sid, r in bench_rows.items():
        assert r["scores"]["accuracy"] == lmms_rows[sid]["accuracy"]
        assert r["tflops"] == pytest.approx(lmms_rows[sid]["token_counts"][0]["tflops"], rel=1e-12)
        assert r["visual_tokens_kept"] == lmms_rows[sid]["token_counts"][0]["visual_tokens_kept"]


def test_multiple_choice_scores_with_the_pruned_prefill(simple_run):
    results, samples = read_run(simple_run, "easy_vqa_tp_mc")
    assert sorted(samples) == list(range(N_MC))
    acc = results["results"]["easy_vqa_tp_mc"]["acc,none"]
    assert 0.8 < acc <= 1.0, acc
    for s in samples.values():  # one (loss, is_greedy) per choice; the cost of each scored continuation
        losses = [float(loss) for loss, _ in s["filtered_resps"]]
        assert len(losses) == len(s["token_counts"]) in (2, 3, 8) and all(loss > 0 for loss in losses)
        assert s["acc"] == float(losses.index(min(losses)) == int(s["target"]))
        assert all(c["visual_tokens_kept"] == 64 and c["output_tokens"] >= 1 for c in s["token_counts"])


def test_torchrun_two_ranks_equal_one_process(task_dir, simple_run, tmp_path):
    """Two ranks (gloo on CPU; lmms-eval's default chat path) answer as the one process did."""
    folder, _ = task_dir
    finish(start(lmms_eval_command(folder, tmp_path / "out", "easy_vqa_tp", ["--limit", str(N_RANKS)], nproc=2), tmp_path), tmp_path)
    out = tmp_path / "out"
    results, samples = read_run(out, "easy_vqa_tp")
    _, single = read_run(simple_run, "easy_vqa_tp")
    assert {d: s["filtered_resps"] for d, s in samples.items()} == {d: single[d]["filtered_resps"] for d in range(N_RANKS)}
    assert {d: s["token_counts"] for d, s in samples.items()} == {d: single[d]["token_counts"] for d in range(N_RANKS)}
    assert results["results"]["easy_vqa_tp"]["accuracy,none"] == pytest.approx(
        sum(single[d]["accuracy"] for d in range(N_RANKS)) / N_RANKS)
    assert results["throughput"]["avg_tokenprune_requests"] == N_RANKS  # both ranks' cost, summed


# -- the model's arguments and request handling, without a run ------------------------------------
def test_decoding_options_and_stop_strings():
    from tokenprune.integrations.lmms_eval.model import cut_at_stop, decoding_options

    assert decoding_options({"max_new_tokens": 6, "temperature": 0, "top_p": 1.0, "num_beams": 1, "until": "\n\n"}, 9) \
        == (6, ["\n\n"])
    assert decoding_options({"do_sample": False, "temperature": 0.2, "image_aspect_ratio": "pad"}, 9) == (9, [])
    for bad in ({"do_sample": True}, {"temperature": 0.7}, {"num_beams": 3}, {"repetition_penalty": 1.2}):
        with pytest.raises(OptionError, match="decodes greedily"):
            decoding_options(bad, 9)
    assert cut_at_stop("red\n\nthe shape is red", ["\n\n"]) == "red"
    assert cut_at_stop("red. Blue", [".", "\n\n"]) == "red" and cut_at_stop("red", []) == "red"


def test_model_arguments():
    from tokenprune.integrations.lmms_eval.model import TokenPrune, messages_to_prompt

    m = TokenPrune.create_from_arg_string("pretrained=tiny-llava,method=fastv,ratio=0.5,k=3,batch_size=4",
                                          {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert m.batch_size == 4 and m.pruner.name == "fastv" and m.pruner.k == 3 and m.pruner.ratio == 0.5
    assert m.device.type == "cpu" and m.rank == 0 and m.world_size == 1
    assert TokenPrune(pretrained="tiny-llava", batch_size="2").pruner is None
    with pytest.raises(UnknownNameError, match="fopru_rank"):
        TokenPrune(pretrained="tiny-llava", method="fopru_rnak", ratio=0.25)
    with pytest.raises(OptionError, match="has no option"):
        TokenPrune(pretrained="tiny-llava", method="fastv", ratio=0.25, kk=3)
    with pytest.raises(OptionError, match="needs a method"):
        TokenPrune(pretrained="tiny-llava", ratio=0.25)
    with pytest.raises(OptionError, match="auto"):
        TokenPrune(pretrained="tiny-llava", batch_size="auto")
    with pytest.raises(OptionError, match="apply_chat_template"):
        m.apply_chat_template([])
    visuals, prompt = messages_to_prompt([{"role": "user", "content": [{"type": "image", "url": "x.png"},
                                                                       {"type": "text", "text": "what ?"}]}], "t", 0)
    assert visuals == ["x.png"] and prompt == "<image>\nwhat ?"
    with pytest.raises(OptionError, match="one user turn"):
        messages_to_prompt([{"role": "system", "content": "hi"}, {"role": "user", "content": "q"}], "t", 0)


def test_requests_on_a_tiny_model():
    """lmms-eval's request shapes, handled in-process: batching across generation options with the
    order kept, stop strings, multiple choice sharing one prefill, multi-round, the chat interface."""
    import numpy as np
    from lmms_eval.api.instance import GenerationResult, Instance
    from PIL import Image

    from tokenprune.integrations.lmms_eval.model import TokenPrune, TokenPruneChat

    rng = np.random.default_rng(0)
    docs = [{"image": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "q": f"question {i} ?"}
            for i in range(5)]
    model = TokenPrune(pretrained="tiny-llava", method="fastv", ratio=0.5, batch_size=2, device="cpu")
    model.task_dict = {"t": {"test": docs}}
    lvlm, pruner = model.lvlm, model.pruner

    def request(kind, args, doc_id):
        return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})

    visual = lambda d: [d["image"]]  # noqa: E731
    opts = [{"max_new_tokens": 3, "until": ["\n\n"]}, {"max_new_tokens": 5, "do_sample": False}]
    reqs = [request("generate_until", (docs[i]["q"], dict(opts[i % 2]), visual, i, "t", "test"), i) for i in (4, 0, 3, 1, 2)]
    out = model.generate_until(reqs)
    assert all(isinstance(r, GenerationResult) for r in out)
    for r, i in zip(out, (4, 0, 3, 1, 2)):
        ref = lvlm.generate([docs[i]["image"].convert("RGB")], [docs[i]["q"]], pruner=pruner, max_new_tokens=opts[i % 2]["max_new_tokens"],
                            sample_ids=[f"t/test/{i}"])
        assert r.text == ref.texts[0].split("\n\n")[0].strip()
        assert r.token_counts.output_tokens == ref.stats[0].new_tokens and r.token_counts.visual_tokens_kept == ref.stats[0].visual_tokens_kept

    choices = ["red", "blue square", "no"]
    reqs = [request("loglikelihood", (docs[i]["q"], c, visual, i, "t", "test"), i) for i in (1, 0) for c in choices]
    out = model.loglikelihood(reqs)
    ref = lvlm.loglikelihood([docs[1]["image"].convert("RGB")] * 3, [docs[1]["q"]] * 3, choices, pruner=pruner,
                             sample_ids=["t/test/1"] * 3)
    assert [r.text[0] for r in out[:3]] == pytest.approx([-lp for lp in ref.logprobs], abs=1e-5)
    assert [r.text[1] for r in out[:3]] == ref.greedy

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        assert len(previous_output) == round_idx
        return (None, f"round {round_idx}: {doc['q']}", round_idx == 3, previous_output, {"n": round_idx})

    out = model.generate_until_multi_round([request("generate_until_multi_round", (docs[0]["q"], {"max_new_tokens": 2}, visual,
                                                                                  doc_to_text, 0, "t", "test"), 0)])
    assert len(out[0].text) == 3 and all(isinstance(t, str) for t in out[0].text)
    assert out[0].token_counts.output_tokens >= 3

    chat = TokenPruneChat(pretrained="tiny-llava", method="fastv", ratio=0.5, batch_size=2, device="cpu")
    chat.task_dict = model.task_dict
    to_messages = lambda d: [{"role": "user", "content": [{"type": "image", "url": d["image"]}, {"type": "text", "text": d["q"]}]}]  # noqa: E731
    a = chat.generate_until([request("generate_until", (None, to_messages, dict(opts[0]), i, "t", "test"), i) for i in range(3)])
    b = model.generate_until([request("generate_until", (docs[i]["q"], dict(opts[0]), visual, i, "t", "test"), i) for i in range(3)])
    assert [r.text for r in a] == [r.text for r in b]
    with pytest.raises(OptionError, match="text-only"):  # several images are a multi-image question (below); none is refused
        model.generate_until([request("generate_until", ("q", {}, lambda d: [], 0, "t", "test"), 0)])
    with pytest.raises(OptionError, match="do_sample"):
        model.generate_until([request("generate_until", ("q", {"do_sample": True}, visual, 0, "t", "test"), 0)])


# -- video and multi-image questions, in-process -----------------------------------------------------
VIDEO_FPS = 4  # 8 frames at 4 fps: the qwen2_5_vl sampler (2 fps) picks 4 of them, [0, 2, 5, 7]


def write_mp4(path: Path, frames) -> None:
    """``frames [T, H, W, 3]`` uint8 as an H.264 mp4 (PyAV)."""
    from tokenprune.media import write_video

    write_video(path, frames, fps=VIDEO_FPS, codec="libx264")


@pytest.fixture(scope="module")
def video_docs(tmp_path_factory):
    """Three 8-frame 56x56 mp4s (a square crossing in different directions and colours), a file
    that is not a video, and two multi-image documents."""
    pytest.importorskip("av")
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(3):
        frames = np.full((8, 56, 56, 3), 110, dtype=np.uint8)
        for t in range(8):
            x = 6 * t if i % 2 == 0 else 42 - 6 * t
            frames[t, 10 + 8 * i: 24 + 8 * i, x: x + 14] = rng.integers(0, 256, 3)
        path = folder / f"v{i}.mp4"
        write_mp4(path, frames)
        docs.append({"video": str(path), "q": f"which way does square {i} move ?"})
    broken = folder / "broken.mp4"
    broken.write_bytes(rng.integers(0, 256, 1024, dtype=np.uint8).tobytes())
    docs.append({"video": str(broken), "q": "which way ?"})
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(5)]
    docs.append({"images": images[:2], "q": "Image 1: <image>\nImage 2: <image>\nwhich one is brighter ?"})
    docs.append({"images": images[2:], "q": "which of these three images is red ?"})
    return docs


@pytest.fixture(scope="module")
def qwen_model():
    from tokenprune.integrations.lmms_eval.model import TokenPrune

    return TokenPrune(pretrained="tiny-qwen2-vl", method="divprune", ratio=0.5, batch_size=2, device="cpu")


def _instance(kind, args, doc_id, **metadata):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1, **metadata})


def test_video_and_multi_image_requests_match_generate(qwen_model, video_docs):
    """Video paths decode with the family's lmms-eval sampler (Qwen: qwen2_5_vl, 4 of 8 frames),
    several images are one multi-image question (at the ``<image>`` marks, or first), a frame list
    is one video when the task's metadata says so; answers, visual tokens and frames equal
    ``generate`` on the same Video / images; an unreadable file answers empty in one logged line."""
    from loguru import logger

    from tokenprune import Video
    from tokenprune.media import sample_indices

    model, lvlm, pruner = qwen_model, qwen_model.lvlm, qwen_model.pruner
    assert model.sampler == "qwen2_5_vl" and model.frames is None
    model.task_dict = {"t": {"test": video_docs}}
    seen = []  # what the plugin hands generate: checked against an independent decode below
    real = lvlm.generate
    lvlm.generate = lambda visuals, prompts, **kw: seen.extend(zip(visuals, prompts)) or real(visuals, prompts, **kw)
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR")
    try:
        gen = {"max_new_tokens": 3, "until": ["\n\n"]}
        video_visual = lambda d: [d["video"]]  # noqa: E731  lmms-eval's video tasks: [path]
        out = model.generate_until([_instance("generate_until", (video_docs[i]["q"], dict(gen), video_visual, i, "t", "test"), i)
                                    for i in (2, 3, 0, 1)])
        images_visual = lambda d: d["images"]  # noqa: E731
        multi = model.generate_until([_instance("generate_until", (video_docs[i]["q"], dict(gen), images_visual, i, "t", "test"), i)
                                      for i in (4, 5)])
        frames_visual = lambda d: Video.from_file(d["video"], sampler="all").pil_frames()  # noqa: E731  8 PIL frames
        framed = model.generate_until([_instance("generate_until", (video_docs[0]["q"], dict(gen), frames_visual, 0, "t", "test"),
                                                 0, task_type="video", sample_frames=3)])
    finally:
        lvlm.generate = real
        logger.remove(sink)

    for r, i in zip(out, (2, 3, 0, 1)):
        if i == 3:  # not a video: one logged line, an empty answer, the cause in the sample log
            assert r.text == "" and "cannot open video" in r.token_counts.media_error
            continue
        ref_video = Video.from_file(video_docs[i]["video"], sampler="qwen2_5_vl")
        assert ref_video.indices == tuple(sample_indices("qwen2_5_vl", 8, VIDEO_FPS)) == (0, 2, 5, 7)
        video, prompt = next((v, p) for v, p in seen if isinstance(v, Video) and v.path == video_docs[i]["video"])
        assert video.indices == ref_video.indices and (video.frames == ref_video.frames).all() and prompt == video_docs[i]["q"]
        ref = real([ref_video], [video_docs[i]["q"]], pruner=pruner, max_new_tokens=3, sample_ids=[f"t/test/{i}"])
        assert r.text == ref.texts[0].split("\n\n")[0].strip()
        c, st = r.token_counts, ref.stats[0]
        assert (c.visual_tokens_in, c.visual_tokens_kept, c.video_frames) == (st.visual_tokens_in, st.visual_tokens_kept, 4)
        assert c.visual_tokens_kept == st.visual_tokens_in // 2 and c.output_tokens == st.new_tokens
    assert sum("t, doc 3 answered empty" in line for line in lines) == 1 and len(lines) == 1

    for r, i in zip(multi, (4, 5)):  # a list of images per sample: a multi-image prompt
        ref = real([video_docs[i]["images"]], [video_docs[i]["q"]], pruner=pruner, max_new_tokens=3, sample_ids=[f"t/test/{i}"])
        single = real([video_docs[i]["images"][0]], [video_docs[i]["q"].replace("<image>", "", 1).replace("<image>", "")],
                      pruner=pruner, max_new_tokens=3)
        assert r.text == ref.texts[0].split("\n\n")[0].strip() and r.token_counts.images == len(video_docs[i]["images"])
        assert r.token_counts.visual_tokens_in == ref.stats[0].visual_tokens_in \
            == len(video_docs[i]["images"]) * single.stats[0].visual_tokens_in  # every image's tokens, not one

    video, _ = seen[-1]  # the frame list as one video: sample_frames by lmms-eval llava_onevision's rule
    assert isinstance(video, Video) and video.indices == (0, 3, 7) and framed[0].token_counts.video_frames == 3
    ref = real([Video.from_frames(frames_visual(video_docs[0])).sample("llava_onevision", frames=3)], [video_docs[0]["q"]],
               pruner=pruner, max_new_tokens=3, sample_ids=["t/test/0"])
    assert framed[0].text == ref.texts[0].split("\n\n")[0].strip()
    assert framed[0].token_counts.visual_tokens_kept == ref.stats[0].visual_tokens_kept


def test_video_multiple_choice_and_chat_messages(qwen_model, video_docs):
    """Multiple choice on a video shares one decode and prefill (unreadable: inf for each choice);
    the chat interface's video / image parts give the simple interface's answers."""
    from tokenprune import Video
    from tokenprune.integrations.lmms_eval.model import TokenPruneChat

    model, lvlm = qwen_model, qwen_model.lvlm
    model.task_dict = {"t": {"test": video_docs}}
    video_visual = lambda d: [d["video"]]  # noqa: E731
    choices = ["left", "right"]
    out = model.loglikelihood([_instance("loglikelihood", (video_docs[i]["q"], c, video_visual, i, "t", "test"), i)
                               for i in (0, 3) for c in choices])
    ref = lvlm.loglikelihood([Video.from_file(video_docs[0]["video"], sampler="qwen2_5_vl")] * 2, [video_docs[0]["q"]] * 2,
                             choices, pruner=model.pruner, sample_ids=["t/test/0"] * 2)
    assert [r.text[0] for r in out[:2]] == pytest.approx([-lp for lp in ref.logprobs], abs=1e-5)
    assert [r.text for r in out[2:]] == [(float("inf"), False)] * 2 and out[2].token_counts.media_error

    chat = TokenPruneChat(pretrained="tiny-qwen2-vl", method="divprune", ratio=0.5, batch_size=2, device="cpu")
    chat.task_dict = model.task_dict

    def to_messages(d):
        parts = [{"type": "video", "url": d["video"]}] if "video" in d else [{"type": "image", "url": im} for im in d["images"]]
        return [{"role": "user", "content": parts + [{"type": "text", "text": d["q"]}]}]

    gen = {"max_new_tokens": 3}
    a = chat.generate_until([_instance("generate_until", (None, to_messages, dict(gen), i, "t", "test"), i) for i in (0, 4)])
    visual = lambda d: [d["video"]] if "video" in d else d["images"]  # noqa: E731
    b = model.generate_until([_instance("generate_until", (video_docs[i]["q"], dict(gen), visual, i, "t", "test"), i)
                              for i in (0, 4)])
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.token_counts.visual_tokens_in for r in a] == [r.token_counts.visual_tokens_in for r in b]


def test_what_a_question_shows(qwen_model, video_docs, tmp_path):
    """``doc_to_visual`` 's list -> one image, a list of images, or one Video (lmms-eval's reading)."""
    from tokenprune import Video
    from tokenprune.media import MediaError

    model, images = qwen_model, video_docs[5]["images"]
    assert isinstance(model.load_visual([images[0]], "t", 0), type(images[0].convert("RGB")))
    assert model.load_visual([images], "t", 0, {"task_type": "video"}) == images  # no sample_frames: images (as lmms-eval)
    video = model.load_visual(images, "t", 0, {"task_type": "video", "sample_frames": 2})
    assert isinstance(video, Video) and video.indices == (0, 2) and (video.frames[1] == images[2]).all()
    model.frame_list = "video"
    try:
        assert model.load_visual(images, "t", 0).indices == (0, 1, 2)
    finally:
        model.frame_list = "auto"
    with pytest.raises(MediaError, match="cannot read image"):
        model.load_visual([str(tmp_path / "missing.png")], "t", 0)
    with pytest.raises(OptionError, match="one video per question"):
        model.load_visual([video_docs[0]["video"], video_docs[1]["video"]], "t", 0)
    with pytest.raises(OptionError, match="not int"):
        model.load_visual([images[0], 3], "t", 0)


def test_video_arguments_and_prompts():
    from tokenprune.integrations.lmms_eval.model import (VIDEO_SAMPLERS, TokenPrune, _video_options, messages_to_prompt,
                                                         prompt_for)
    from tokenprune import Video

    assert _video_options("qwen2_5_vl", "16", "1.5") == ("qwen2_5_vl", 16, 1.5)
    assert _video_options("llava_onevision", None, "") == ("llava_onevision", None, None)
    with pytest.raises(OptionError, match="not a frame sampler"):
        TokenPrune(pretrained="tiny-llava", sampler="linspace")
    with pytest.raises(OptionError, match="positive number of frames"):
        _video_options("internvl", 0, None)
    with pytest.raises(OptionError, match="takes a frame count"):
        _video_options("llava_onevision", None, 2)
    with pytest.raises(OptionError, match="frame_list"):
        TokenPrune(pretrained="tiny-llava", frame_list="frames")
    assert VIDEO_SAMPLERS["llava_next_video"] == "llava_onevision" and VIDEO_SAMPLERS["internvl"] == "internvl"

    video = Video.from_frames([Image_new() for _ in range(2)])
    assert prompt_for(video, "<image>\nwhat happens ?") == "<video>\nwhat happens ?"
    assert prompt_for(video, "<image>\n<image>\nsubtitle\n<image>\nQ ?") == "<video>\nsubtitle\nQ ?"  # longvideobench_i style
    assert prompt_for(video, "what happens ?") == "what happens ?" and prompt_for(Image_new(), "<image>\nq") == "<image>\nq"
    visuals, prompt = messages_to_prompt([{"role": "user", "content": [{"type": "video", "url": "a.mp4"},
                                                                       {"type": "text", "text": "q ?"}]}], "t", 0)
    assert visuals == ["a.mp4"] and prompt == "<video>\nq ?"
    ims = [{"type": "image", "url": f"{i}.png"} for i in range(2)]  # the text already places both images
    visuals, prompt = messages_to_prompt([{"role": "user", "content": ims + [{"type": "text", "text": "<image>\nx\n<image>\ny"}]}],
                                         "t", 0)
    assert visuals == ["0.png", "1.png"] and prompt == "<image>\nx\n<image>\ny"
    with pytest.raises(OptionError, match="clip"):
        messages_to_prompt([{"role": "user", "content": [{"type": "video", "url": {"path": "a.mp4", "video_start": 1.0}}]}], "t", 0)


def Image_new():
    from PIL import Image

    return Image.new("RGB", (8, 8))
