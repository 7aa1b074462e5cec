"""Video tasks: lmms-eval 0.7.3's VideoMME, MVBench, EgoSchema subset, MLVU dev, LongVideoBench and
NExT-QA on small local copies in each dataset's real schema.

Each test writes the annotation rows with the real field names in the Hub repository's layout
(parquet shards or the JSON files the repository ships) and short mpeg4 videos with PyAV, loads them
with ``--data-dir`` semantics through the real ``datasets`` path, and checks the sampled frames (each
test frame's grey level encodes its index), the prompt text of lmms-eval's ``doc_to_text`` and the
scores of its ``process_results`` / aggregation on hand-written answers. Expected values are worked
out by hand in the comments; the answer parsers are also compared with lmms-eval's own functions,
read from its installed source.
"""
from __future__ import annotations

import ast
import json
import os
import re
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest

import tokenprune as tp
from tokenprune import media
from tokenprune.benchmarks.tasks import DatasetUnavailableError, Sample
from tokenprune.benchmarks.tasks import video as V

av = pytest.importorskip("av")

LEVEL = 30  # frame i of a test video is a flat grey of level i * LEVEL
N_FRAMES = 8


def write_video(path: Path, n: int = N_FRAMES, rate: int = 8) -> Path:
    """An mpeg4 video of ``n`` 32x32 frames at ``rate`` fps, frame ``i`` a flat grey ``i * LEVEL``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    media.write_video(path, np.stack([np.full((32, 32, 3), i * LEVEL, np.uint8) for i in range(n)]), fps=rate)
    return path


def write_broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def frame_ids(video) -> list[int]:
    """Which source frame each decoded frame is, read back from its grey level."""
    return [int(round(float(f.mean()) / LEVEL)) for f in video.frames]


def write_parquet(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(path))


def bare(sample_id: str, answer: str, category: str = "", **extra) -> Sample:
    """A sample as the results files rebuild it: no pixels."""
    return Sample(sample_id, None, "q?", [answer], category=category, extra=extra)


# ------------------------------------------------------------------------------------------ VideoMME

def videomme_dir(root: Path) -> Path:
    """lmms-eval/Video-MME: ``videomme/test-00000-of-00001.parquet`` and the videos in ``data/``."""
    write_parquet(root / "videomme" / "test-00000-of-00001.parquet", {
        "video_id": ["001", "002", "003", "004"],
        "duration": ["short", "medium", "long", "short"],
        "domain": ["Knowledge", "Sports Competition", "Knowledge", "Knowledge"],
        "sub_category": ["Humanity & History", "Football", "Astronomy", "Law"],
        "url": ["https://www.youtube.com/watch?v=fFjv93ACGo8"] * 4,
        "videoID": ["fFjv93ACGo8", "upper", "broken", "missing"],
        "question_id": ["001-1", "002-1", "003-1", "004-1"],
        "task_type": ["Counting Problem", "Action Recognition", "OCR Problems", "Counting Problem"],
        "question": ["How many people are in the video?", "What sport is played?", "q3", "q4"],
        "options": [["A. 1.", "B. 2.", "C. 3.", "D. 4."], ["A. golf", "B. tennis", "C. soccer", "D. judo"],
                    ["A. a", "B. b", "C. c", "D. d"], ["A. a", "B. b", "C. c", "D. d"]],
        "answer": ["C", "C", "A", "B"],
    })
    write_video(root / "data" / "fFjv93ACGo8.mp4")
    write_video(root / "data" / "upper.MP4")  # doc_to_visual falls back to .MP4, then .mkv
    write_broken(root / "data" / "broken.mp4")
    return root


def test_videomme_loads_samples_frames_and_prompt(tmp_path):
    root = videomme_dir(tmp_path)
    task = tp.get_task("videomme")  # default: uniform sampler, 8 frames
    data = task.load(data_dir=root)
    samples = list(data)
    assert [s.id for s in samples] == ["001-1", "002-1"]
    # the undecodable mp4 and the missing one are skipped and recorded, as broken images are
    assert [s.id for s in data.skipped] == ["003-1", "004-1"]
    assert "MediaError" in data.skipped[0].reason and "broken.mp4" in data.skipped[0].reason
    assert "not found under" in data.skipped[1].reason and "video_dir" in data.skipped[1].reason
    assert "2 samples used, 2 skipped" in data.report()
    video = samples[0].image
    assert isinstance(video, tp.Video) and video.indices == tuple(range(8)) and frame_ids(video) == list(range(8))
    assert video.fps == 8.0 and video.total_frames == 8 and video.path.endswith("fFjv93ACGo8.mp4")
    assert samples[1].image.path.endswith("upper.MP4")
    assert samples[0].category == "short" and samples[0].extra["task_type"] == "Counting Problem"
    # videomme_doc_to_text with the default post prompt (which starts with a newline)
    assert task.prompt(samples[0]) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many people are in the video?\nA. 1.\nB. 2.\nC. 3.\nD. 4.\n\n"
        "Answer with the option's letter from the given choices directly.")
    qwen = tp.get_task("videomme", prompt_style="qwen3_vl")  # videomme_doc_to_text_qwen3vl
    assert qwen.prompt(samples[0]) == ("Question: How many people are in the video?\nOptions:\nA. 1.\nB. 2.\nC. 3.\nD. 4.\n"
                                       "Answer with the option letter only.")


def test_sampler_and_frames_are_task_options(tmp_path):
    root = videomme_dir(tmp_path)
    # uniform, 4 of 8 frames: linspace(0, 7, 4) = 0, 2.33, 4.67, 7 -> rounded 0, 2, 5, 7
    video = next(iter(tp.get_task("videomme", frames=4).load(data_dir=root))).image
    assert video.indices == (0, 2, 5, 7) and frame_ids(video) == [0, 2, 5, 7]
    # lmms-eval's llava_onevision: linspace(0, 7, 4, dtype=int) truncates: 0, 2, 4, 7
    video = next(iter(tp.get_task("videomme", sampler="llava_onevision", frames=4).load(data_dir=root))).image
    assert video.indices == (0, 2, 4, 7) and frame_ids(video) == [0, 2, 4, 7]
    # frames as a list of images (a multi-image prompt), and videos found through video_dir
    frames = next(iter(tp.get_task("videomme", frames=3, as_images=True).load(data_dir=root))).image
    assert isinstance(frames, list) and [round(np.asarray(f).mean() / LEVEL) for f in frames] == [0, 4, 7]  # 0, 3.5->4, 7
    elsewhere = tmp_path / "annotations"
    (root / "videomme").rename(elsewhere)
    data = tp.get_task("videomme", video_dir=str(root)).load(data_dir=elsewhere)
    assert [s.id for s in data] == ["001-1", "002-1"]


@pytest.mark.parametrize("options, message", [
    (dict(sampler="bogus"), "task videomme: unknown frame sampler 'bogus': use one of llava_onevision, qwen2_5_vl"),
    (dict(frames=0), "task videomme: frames must be a whole number >= 1"),
    (dict(sampler="uniform", fps=2.0), "task videomme: sampler 'uniform' takes a frame count, not fps=2.0"),
    (dict(prompt_style="nope"), "task videomme: unknown prompt_style 'nope': use one of default, gpt4v"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(tp.OptionError) as info:
        tp.get_task("videomme", **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_videomme_scores_and_aggregate():
    task = tp.get_task("videomme")
    s = bare("1", "C", "short", domain="Knowledge", task_type="Counting Problem")
    # extract_mcq_answer: start/end/phrase/format priorities, as lmms-eval's mcq_extract
    got = [task.score(p, s)["accuracy"] for p in [
        "C", "(C)", "C. 3.", "Best option: (C)",
        "The answer is D because A is wrong",  # two phrase hits (D, A): the later one, A
        "Cats",                                # no format: any occurrence of C, the fallback
        "", "none"]]
    assert got == [1, 1, 1, 1, 0, 1, 0, 0]
    rows = [("short", "Knowledge", "OCR Problems", "C", "C"), ("short", "Knowledge", "OCR Problems", "A", "B"),
            ("medium", "Sports Competition", "Action Recognition", "B", "B"), ("long", "Knowledge", "OCR Problems", "D", "D")]
    samples = [bare(str(i), ans, d, domain=dom, task_type=t) for i, (d, dom, t, ans, _) in enumerate(rows)]
    scores = [task.score(pred, x) for x, (*_, pred) in zip(samples, rows)]
    out = task.aggregate(scores, samples)
    assert out["videomme_perception_score"] == 75.0  # 3 of 4, in percent as lmms-eval
    assert out["duration_short"] == 50.0 and out["duration_medium"] == 100.0 and out["duration_long"] == 100.0
    assert out["domain_Knowledge"] == pytest.approx(200 / 3) and out["task_OCR Problems"] == pytest.approx(200 / 3)
    assert task.headline == "videomme_perception_score"


# ------------------------------------------------------------------------------------------- MVBench

def mvbench_dir(root: Path) -> Path:
    """OpenGVLab/MVBench: ``json/<subtask>.json`` and the videos in lmms-eval's DATA_LIST folders."""
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_antonym.json").write_text(json.dumps([
        {"video": "166583.mp4", "question": "What is the action performed by the person in the video?",
         "candidates": ["Not sure", "Scattering something down", "Piling something up"], "answer": "Piling something up"},
        {"video": "79451.mp4", "question": "What is the action?",
         "candidates": ["Pulling something", "Pushing something", "Not sure"], "answer": "Pushing something"},
    ]))
    (root / "json" / "moving_count.json").write_text(json.dumps([
        {"video": "video_10009.mp4", "question": "How many metal objects enter the scene?",
         "candidates": ["1", "2", "0", "3"], "answer": "2"},
    ]))
    write_video(root / "ssv2_video_mp4" / "166583.mp4")
    write_video(root / "ssv2_video_mp4" / "79451.mp4")
    write_video(root / "data0613" / "clevrer" / "video_validation" / "video_10009.mp4")  # the data0613 fallback
    return root


def test_mvbench(tmp_path):
    task = tp.get_task("mvbench", subtasks="action_antonym,moving_count", sampler="internvl", frames=2)
    data = task.load(data_dir=mvbench_dir(tmp_path))
    samples = list(data)
    assert [s.id for s in samples] == ["action_antonym-0", "action_antonym-1", "moving_count-0"] and not data.skipped
    # InternVL get_index, 2 segments of 8 frames: seg = 7 / 2 = 3.5; int(1.75 + round(0)) = 1, int(1.75 + round(3.5)) = 5
    assert samples[0].image.indices == (1, 5) and frame_ids(samples[0].image) == [1, 5]
    assert [s.answers for s in samples] == [["C"], ["B"], ["B"]] and samples[2].category == "moving_count"
    assert task.prompt(samples[0]) == ("Question:What is the action performed by the person in the video?\nOption:\n"
                                       "(A) Not sure\n(B) Scattering something down\n(C) Piling something up\n"
                                       "Only give the best option.\n")
    b = samples[1]  # reference B
    # mcq_acc: "B. text" -> B; punctuation stripped, then the first standalone letter a-e in any case
    assert [task.score(p, b)["accuracy"] for p in ["B", "(B) Pushing something", "B. Pushing", "b", "The answer is B",
                                                   "a cat", "(c)", "Pushing something"]] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert task.score("a cat", samples[0]) == {"accuracy": 0.0, "answered": 1.0}  # reads as A; the reference is C
    assert task.score("", b) == {"accuracy": 0.0, "answered": 0.0}
    # aggregate: per subtask 100 * correct / answered (empty answers not counted), headline their mean
    preds = ["C", "", "A"]  # right; unanswered; wrong
    out = task.aggregate([task.score(p, s) for p, s in zip(preds, samples)], samples)
    assert out["mvbench_action_antonym"] == 100.0 and out["mvbench_moving_count"] == 0.0
    assert out["mvbench_accuracy"] == 50.0 and out["overall"] == 50.0


def test_folder_of_frames_is_a_video(tmp_path):
    """A row whose video is a folder of frame images (lmms-eval's frame-list variants): read in
    file-name order at ``frame_fps``, then sampled like a file."""
    from PIL import Image

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "fine_grained_pose.json").write_text(json.dumps(
        [{"video": "S001C001P001R001A001", "question": "q?", "candidates": ["a", "b"], "answer": "b"}]))
    folder = tmp_path / "nturgbd_convert" / "S001C001P001R001A001"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (16, 12), (i * LEVEL,) * 3).save(folder / f"img_{i:05d}.png")
    (folder / "notes.txt").write_text("not a frame")
    task = tp.get_task("mvbench", subtasks="fine_grained_pose", frames=3, frame_fps=3.0)
    video = next(iter(task.load(data_dir=tmp_path))).image
    # uniform, 3 of 6: linspace(0, 5, 3) = 0, 2.5, 5 -> round half to even: 0, 2, 5
    assert video.indices == (0, 2, 5) and frame_ids(video) == [0, 2, 5] and video.fps == 3.0 and video.size == (12, 16)


def test_mvbench_missing_subtask_is_one_line(tmp_path):
    task = tp.get_task("mvbench", subtasks=["action_antonym", "state_change"])
    with pytest.raises(DatasetUnavailableError, match="no annotations for MVBench subtasks state_change"):
        task.load(data_dir=mvbench_dir(tmp_path))


# ------------------------------------------------------------------------------------------ EgoSchema

def test_egoschema_subset(tmp_path):
    """lmms-eval/egoschema, config ``Subset``: ``Subset/test-*.parquet``, videos in ``videos/``."""
    opts = ["A. C cleans the kitchen.", "B. C cooks dinner.", "C. C reads a book.", "D. C paints a wall.",
            "E. C plays the guitar."]
    write_parquet(tmp_path / "Subset" / "test-00000-of-00001.parquet", {
        "question_idx": ["0074f737-11cb-497d-8d07-77c3a8127391", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"],
        "question": ["What is the overall activity of C in the video?", "What does C do first?"],
        "video_idx": ["0074f737-11cb-497d-8d07-77c3a8127391", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"],
        "option": [opts, opts], "answer": ["2", "0"],
    })
    write_video(tmp_path / "videos" / "0074f737-11cb-497d-8d07-77c3a8127391.mp4")
    task = tp.get_task("egoschema_subset", frames=2)
    data = task.load(data_dir=tmp_path)
    samples = list(data)
    assert [s.id for s in samples] == ["0074f737-11cb-497d-8d07-77c3a8127391"] and len(data.skipped) == 1
    assert samples[0].image.indices == (0, 7)
    assert task.prompt(samples[0]) == ("What is the overall activity of C in the video?\n" + "\n".join(opts)
                                       + "\nAnswer with the option's letter from the given choices directly.")
    assert tp.get_task("egoschema_subset", prompt_style="aria").prompt(samples[0]).startswith(
        "Please answer the question about the video:\nWhat is the overall")
    s = samples[0]  # answer index 2 = C
    # MMMU-style parser: "(C)", "C " and "C." candidates; several -> the one whose last occurrence comes first
    assert [task.score(p, s)["score"] for p in ["C", "(C)", "C. C reads a book.", "I choose C. then B.",
                                                "E is right, not (A)", "B"]] == [1, 1, 1, 1, 0, 0]
    # nothing to read: a random letter, the same draw every time for a sample, different across samples
    assert all(task.score("e", s) == task.score("e", s) for _ in range(5))
    picks = {V.parse_mmmu_first("e", "ABCDE", {}, V._rng(task, bare(str(i), "0"))) for i in range(40)}
    assert len(picks) >= 3
    other = bare("x", "0", **s.extra)  # as rebuilt from a results file; reference A
    out = task.aggregate([task.score("C", s), task.score("B", other)], [s, other])
    assert out == {"score": 0.5}


# ------------------------------------------------------------------------------------------ MLVU dev

def test_mlvu_dev(tmp_path):
    """sy1998/MLVU_dev: one ``test`` parquet shard; videos at ``<video_name>`` under the cache dir."""
    question = "What color is the main male character in the video?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue"
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "video_name": ["movie101_66.mp4", "count_1.mp4", "needle_3.mp4"],
        "duration": [246.0, 300.0, 400.0],
        "question": [question, "How many times does the man jump?\n(A) 1\n(B) 2\n(C) 3\n(D) 4", "q?\n(A) x\n(B) y"],
        "candidates": [["Yellow", "Red", "Green", "Blue"], ["1", "2", "3", "4"], ["x", "y"]],
        "answer": ["A", "B", "B"], "task_type": ["plotQA", "count", "needle"], "question_id": ["0", "1", "2"],
    })
    write_video(tmp_path / "movie101_66.mp4")
    write_video(tmp_path / "count_1.mp4")
    write_video(tmp_path / "needle_3.mp4")
    task = tp.get_task("mlvu_dev", sampler="qwen3_vl", frames=4)
    samples = list(task.load(data_dir=tmp_path))
    # transformers' Qwen3-VL rule with 4 frames: linspace(0, 7, 4).round() = 0, 2, 5, 7
    assert [s.id for s in samples] == ["0", "1", "2"] and samples[0].image.indices == (0, 2, 5, 7)
    assert task.prompt(samples[0]) == question + "\nOnly give the best option.\nBest option: ("
    assert tp.get_task("mlvu_dev", prompt_style="plm").prompt(samples[0]) == question + "\nOnly give the best option."
    preds = ["A) Yellow", "C", "The answer is B"]  # right, wrong, right
    scores = [task.score(p, s) for p, s in zip(preds, samples)]
    assert [s["accuracy"] for s in scores] == [1, 0, 1]
    out = task.aggregate(scores, samples)
    # mlvu_aggregate_results_dev: mean over all 7 task types, absent ones counted 0: (100 + 0 + 100) / 7
    assert out["mlvu_percetion_score"] == pytest.approx(200 / 7)
    assert out["type_plotQA"] == 100.0 and out["type_count"] == 0.0 and out["type_ego"] == 0.0
    assert out["accuracy"] == pytest.approx(200 / 3)


# ------------------------------------------------------------------------------------ LongVideoBench

def lvb_row(i: int, correct: int, duration_group: int, category: str, options: list[str]) -> dict:
    opts = (options + ["N/A"] * 5)[:5]
    return {"video_id": f"vid{i}", "question": f"What happens at 00:0{i}?", "question_wo_referring_query": "What happens?",
            "candidates": options, "correct_choice": correct, "position": [1, 2], "topic_category": "NP-News-Programs",
            "question_category": category, "level": "L1-Perception", "id": f"86CxyhFV9MI_{i}",
            "video_path": f"86CxyhFV9MI_{i}.mp4", "subtitle_path": f"86CxyhFV9MI_{i}_en.json", "duration_group": duration_group,
            "starting_timestamp_for_subtitles": 0, "duration": 10.0, "view_count": 100,
            **{f"option{k}": opts[k] for k in range(5)}}


def test_longvideobench_val_v(tmp_path):
    """longvideobench/LongVideoBench: ``lvb_val.json`` and the videos in ``videos/``."""
    rows = [lvb_row(0, 2, 15, "TOS", ["a man", "a woman", "a dog"]), lvb_row(1, 0, 600, "S2E", ["red", "blue", "green", "pink"])]
    (tmp_path / "lvb_val.json").write_text(json.dumps(rows))
    write_video(tmp_path / "videos" / "86CxyhFV9MI_0.mp4")
    write_video(tmp_path / "videos" / "86CxyhFV9MI_1.mp4")
    task = tp.get_task("longvideobench_val_v")
    samples = list(task.load(data_dir=tmp_path))
    assert [s.id for s in samples] == ["86CxyhFV9MI_0", "86CxyhFV9MI_1"] and samples[0].answers == ["C"]
    assert task.max_new_tokens == 32 and samples[0].image.num_frames == 8
    assert task.prompt(samples[0]) == ("What happens at 00:00?\nA. a man\nB. a woman\nC. a dog\n"
                                       "Answer with the option's letter from the given choices directly.\n")
    s = samples[0]
    # prefixes removed, then the FIRST capital A-E anywhere: "Based on ..." reads as B
    assert [task.score(p, s)["accuracy"] for p in ["C", "The best answer is C", "C. A book", "Based on the video, C"]] == [1, 1, 1, 0]
    assert task.score("(c)", s) == task.score("(c)", s)  # random fallback, the same draw each time
    scores = [task.score("C", samples[0]), task.score("B", samples[1])]
    out = task.aggregate(scores, samples)
    assert out == {"duration_15": 1.0, "category_TOS": 1.0, "duration_600": 0.0, "category_S2E": 0.0, "lvb_acc": 0.5}


# ------------------------------------------------------------------------------------------- NExT-QA

def test_nextqa_mc_test(tmp_path):
    """lmms-eval/NExTQA, config ``MC``: ``MC/test-*.parquet``, videos in ``NExTVideo/``."""
    write_parquet(tmp_path / "MC" / "test-00000-of-00001.parquet", {
        "video": [4010069381, 4010069381], "frame_count": [1612, 1612], "width": [640, 640], "height": [480, 480],
        "question": ["how do the two man play the instrument ", "why did the boy stand up"],
        "answer": [2, 0], "qid": [6, 7], "type": ["CH", "CW"],
        "a0": ["roll the handle", "to dance"], "a1": ["tap their feet", "to leave"], "a2": ["strum the string", "to sing"],
        "a3": ["hit with sticks", "to eat"], "a4": ["pat with hand", "to jump"],
    })
    write_video(tmp_path / "NExTVideo" / "4010069381.mp4")
    task = tp.get_task("nextqa_mc_test")
    samples = list(task.load(data_dir=tmp_path))
    assert [s.id for s in samples] == ["4010069381-6", "4010069381-7"] and samples[0].answers == ["C"]
    assert task.prompt(samples[0]) == ("how do the two man play the instrument\nA. roll the handle\nB. tap their feet\n"
                                       "C. strum the string\nD. hit with sticks\nE. pat with hand")
    s = samples[0]
    # "(X)" first; else "X "; else "X."; several -> the one occurring last; long answers by option text
    assert [task.score(p, s)["exact_match"] for p in ["C", "(B) or (C)", "A or C.", "C.", "(A) or (C) maybe B",
                                                      "they strum the string with fingers", "they tap their feet, not strum the string",
                                                      "A"]] == [1, 1, 1, 1, 1, 1, 1, 0]
    out = task.aggregate([task.score("C", s), task.score("B", samples[1])], samples)
    assert out == {"exact_match": 0.5, "type_CH": 1.0, "type_CW": 0.0}


# ------------------------------------------------------------- the parsers against lmms-eval's own code

def _official(relpath: str, name: str, **namespace):
    """Function ``name`` of an installed lmms-eval task file, compiled alone (importing lmms-eval's task
    package would take ~15 s and needs decord / cv2 / nltk)."""
    lmms_eval = pytest.importorskip("lmms_eval")
    path = Path(os.path.dirname(lmms_eval.__file__)) / "tasks" / relpath
    with warnings.catch_warnings():  # mvbench's regexes are written with invalid escapes ("\d" in "...")
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if relpath.endswith("mcq_extract.py"):  # its module-level tables too
        body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))]
    from typing import List, Optional

    ns = {"re": re, "np": np, "List": List, "Optional": Optional, **namespace}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return ns[name]


class _NoRandom:
    def choice(self, seq):
        return "RANDOM"


ANSWERS = ["C", "(B)", "B.", "b", "The answer is D because A is wrong", "Best option: (C)", "A dog", "Bird", "C) x",
           "I choose C. then B.", "E is right, not (A)", "(B) or (C)", "A or B.", "they strum the string with fingers",
           "Based on the video, C", "The best answer is C", "the correct option is c, not D", "1,000 B.", "a cat", "",
           "B. Pushing", "(c)", "答案是B", "Answer: E", "A, B or C?", "  D\n", "'C'", "none of them"]


def test_parsers_match_lmms_eval_source():
    mcq = _official("_task_utils/mcq_extract.py", "extract_mcq_answer")
    mvb = _official("mvbench/utils.py", "mcq_acc")
    ego = _official("egoschema/utils.py", "parse_multi_choice_response", random=_NoRandom())
    nqa = _official("nextqa/utils.py", "parse_multi_choice_response", random=_NoRandom())
    lvb = _official("longvideobench/utils.py", "parse_multi_choice_response", random=_NoRandom())
    letters = list("ABCDE")
    ego_opts = {c: f"{c}. option {c}" for c in letters}
    nqa_opts = {"A": "roll the handle", "B": "tap their feet", "C": "strum the string", "D": "hit", "E": "pat"}
    for a in ANSWERS:
        assert V.extract_mcq_answer(a, "ABCD") == mcq(a, choices=["A", "B", "C", "D"]), a
        for gt in letters:
            assert V.mvbench_mcq_acc(gt, a) == mvb(gt, a), (gt, a)
        assert V.parse_mmmu_first(a, letters, ego_opts, _NoRandom()) == ego(a, letters, ego_opts)[0], a
        assert V.parse_mmmu_last(a, letters, nqa_opts, _NoRandom()) == nqa(a, letters, nqa_opts), a
        assert V.parse_longvideobench(a, letters[:4], _NoRandom()) == lvb(a, letters[:4], {}), a


# --------------------------------------------------------------------------- end to end, through the sweep

def test_bench_runs_a_video_task(tmp_path):
    """``tokenprune bench`` on tiny-qwen2-vl with the local VideoMME copy: one row per sample and run,
    the broken and missing videos recorded as skipped."""
    from tokenprune.benchmarks.sweep import load_config, read_rows, run_sweep

    root = videomme_dir(tmp_path / "videomme")
    args = {"model": "tiny-qwen2-vl", "tasks": "videomme", "data_dir": str(root), "methods": "random", "ratios": "0.5",
            "limit": "all", "batch_size": 2, "output": str(tmp_path / "run"), "bootstrap": 20, "max_new_tokens": 2,
            "task_options": {"videomme": {"frames": 2}}}
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    rows = read_rows(out / "samples.jsonl")
    assert sorted((r["method"], r["sample_id"]) for r in rows) == [("none", "001-1"), ("none", "002-1"),
                                                                    ("random", "001-1"), ("random", "002-1")]
    full = {r["sample_id"]: r["visual_tokens_in"] for r in rows if r["method"] == "none"}
    kept = {r["sample_id"]: r["visual_tokens_kept"] for r in rows if r["method"] == "random"}
    assert all(n > 0 for n in full.values()) and all(kept[k] < full[k] for k in full)
    assert all(set(r["scores"]) == {"accuracy"} and r["category"] in ("short", "medium") for r in rows)
    assert (out / "summary.csv").exists()
    skipped = json.loads((out / "skipped.json").read_text())["videomme"]
    assert [s["id"] for s in skipped] == ["003-1", "004-1"] and "broken.mp4" in skipped[0]["reason"]


def test_task_specs_carry_their_options_like_method_specs():
    from tokenprune.benchmarks.sweep import SweepConfig, normalise

    cfg = normalise(SweepConfig(tasks=["videomme:sampler=llava_onevision:frames=2", "easy_vqa"], methods="fopru_rank",
                                task_options={"videomme": {"frames": 4, "fps": None}}))
    assert cfg.tasks == ["videomme", "easy_vqa"]
    assert cfg.task_options["videomme"] == {"frames": 2, "fps": None, "sampler": "llava_onevision"}  # the spec wins
    with pytest.raises(tp.OptionError, match="sampler") as err:
        normalise(SweepConfig(tasks=["videomme:sampler=nope"], methods="fopru_rank"))
    assert "\n" not in str(err.value)


def test_answers_are_cut_at_lmms_evals_default_stop_string():
    """lmms-eval stops these tasks' generation at "\\n\\n" (no `until` in their YAML): the bench cuts the same."""
    task = tp.get_task("videomme")
    assert task.cut("The square moves\n\nC") == "The square moves"
    assert task.cut("C. a red square") == "C. a red square"
    assert tp.get_task("easy_vqa").cut("red\n\nblue") == "red\n\nblue"  # image tasks: unchanged
