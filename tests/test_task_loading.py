"""Loading through the real datasets.load_dataset path, on small local files in each dataset's schema.

Each test writes parquet shards laid out as in the Hub repository (a folder per config,
``<split>-00000-of-00001.parquet``), with the real columns, types and image encoding, and loads
them with ``--data-dir`` semantics. No mocks of ``datasets``.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys

import datasets
import pytest
from datasets import Features, Image as ImageFeature, List, Value
from PIL import Image

import tokenprune as tp
from tokenprune.benchmarks.tasks import DatasetUnavailableError


def png(color=(255, 0, 0), size=(8, 6)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


BROKEN = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": None}


def write(root, config, split, rows: dict, features: Features):
    folder = root / config if config else root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def load_all(task, root, **kw):
    data = task.load(data_dir=root, **kw)
    return data, list(data)


def test_pope(tmp_path):
    feats = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
                      "category": Value("string")})
    write(tmp_path, None, "test", {
        "id": ["0", "1", "2"], "question_id": ["1", "2", "3"], "question": ["Is there a dog in the image?"] * 3,
        "answer": ["yes", "no", "yes"], "image_source": ["COCO_val2014_000000310196"] * 3,
        "image": [png(), BROKEN, png((0, 255, 0))], "category": ["adversarial", "popular", "random"],
    }, feats)
    task = tp.get_task("pope")
    data, samples = load_all(task, tmp_path)
    assert [s.id for s in samples] == ["1", "3"]
    assert len(data.skipped) == 1 and data.skipped[0].id == "2"  # the broken image: skipped and counted
    assert "2 samples used, 1 skipped" in data.report()
    assert samples[1].image.getpixel((0, 0)) == (0, 255, 0) and samples[0].category == "adversarial"
    assert task.prompt(samples[0]) == "Is there a dog in the image?\nAnswer the question using a single word or phrase."


def test_mme(tmp_path):
    feats = Features({"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
                      "answer": Value("string"), "category": Value("string")})
    write(tmp_path, None, "test", {
        "question_id": ["code_reasoning/0020.png"] * 2, "image": [png(), png()],
        "question": ["Is a python code shown in the picture? Please answer yes or no.",
                     "Is a c++ code shown in the picture? Please answer yes or no."],
        "answer": ["Yes", "No"], "category": ["code_reasoning"] * 2,
    }, feats)
    task = tp.get_task("mme")
    _, samples = load_all(task, tmp_path)
    assert [s.answers for s in samples] == [["yes"], ["no"]] and samples[0].extra["pair"] == samples[1].extra["pair"]
    assert samples[0].id != samples[1].id
    out = task.aggregate([task.score("Yes", samples[0]), task.score("No", samples[1])], samples)
    assert out["cognition"] == 200.0


def test_gqa_joins_question_and_image_configs(tmp_path):
    q = Features({"id": Value("string"), "imageId": Value("string"), "question": Value("string"),
                  "answer": Value("string"), "fullAnswer": Value("string"), "isBalanced": Value("bool")})
    write(tmp_path, "testdev_balanced_instructions", "testdev", {
        "id": ["201307251", "201640614", "20161"], "imageId": ["n436", "n123", "missing"],
        "question": ["Is the sky blue?", "What color is the car?", "Where?"], "answer": ["yes", "red", "here"],
        "fullAnswer": ["Yes, it is.", "The car is red.", "Here."], "isBalanced": [True, True, True],
    }, q)
    write(tmp_path, "testdev_balanced_images", "testdev", {
        "id": ["n123", "n436"], "image": [png((0, 0, 255)), png((1, 2, 3))],
    }, Features({"id": Value("string"), "image": ImageFeature()}))
    data, samples = load_all(tp.get_task("gqa"), tmp_path)
    assert [(s.id, s.image.getpixel((0, 0))) for s in samples] == [("201307251", (1, 2, 3)), ("201640614", (0, 0, 255))]
    assert [s.id for s in data.skipped] == ["20161"]  # no image for it: skipped, counted


def test_textvqa(tmp_path):
    feats = Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                      "question_tokens": List(Value("string")), "image": ImageFeature(), "image_width": Value("int32"),
                      "image_height": Value("int32"), "flickr_original_url": Value("string"),
                      "flickr_300k_url": Value("string"), "answers": List(Value("string")),
                      "image_classes": List(Value("string")), "set_name": Value("string"),
                      "ocr_tokens": List(Value("string"))})
    write(tmp_path, None, "validation", {
        "image_id": ["003a8ae2ef43b901"], "question_id": [34602], "question": ["what is the brand of this camera?"],
        "question_tokens": [["what", "is", "the", "brand"]], "image": [png()], "image_width": [8], "image_height": [6],
        "flickr_original_url": [""], "flickr_300k_url": [""], "answers": [["nous les gosses"] * 4 + ["dakota"] * 6],
        "image_classes": [["Camera"]], "set_name": ["val"], "ocr_tokens": [["nous", "les"]],
    }, feats)
    task = tp.get_task("textvqa_val")
    _, samples = load_all(task, tmp_path)
    assert samples[0].id == "34602" and len(samples[0].answers) == 10
    assert task.score("Dakota", samples[0])["vqa_accuracy"] == 1.0


def test_vqav2(tmp_path):
    answer = {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
    feats = Features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                      "answers": List(answer), "image_id": Value("int64"), "answer_type": Value("string"),
                      "question_id": Value("int64"), "question": Value("string"), "image": ImageFeature()})
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["2"] * 7 + ["two"] + ["3"] * 2)]
    write(tmp_path, None, "validation", {
        "question_type": ["how many"], "multiple_choice_answer": ["2"], "answers": [answers], "image_id": [262148],
        "answer_type": ["number"], "question_id": [262148000], "question": ["How many dogs are there?"], "image": [png()],
    }, feats)
    task = tp.get_task("vqav2_val")
    _, samples = load_all(task, tmp_path)
    assert samples[0].answers[7] == "two" and samples[0].category == "number"
    assert task.score("2", samples[0])["vqa_accuracy"] == 1.0  # "two" normalises to "2": 8 matches
    assert task.score("3", samples[0])["vqa_accuracy"] == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_scienceqa_img(tmp_path):
    s = Value("string")
    feats = Features({"image": ImageFeature(), "question": s, "choices": List(s), "answer": Value("int8"),
                      "hint": s, "task": s, "grade": s, "subject": s, "topic": s, "category": s, "skill": s,
                      "lecture": s, "solution": s})
    write(tmp_path, "ScienceQA-IMG", "test", {
        "image": [png(), None], "question": ["Which of these states is farthest north?", "Which is a gas?"],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["air", "rock"]], "answer": [0, 0],
        "hint": ["", "Look."], "task": ["closed choice"] * 2, "grade": ["grade2"] * 2, "subject": ["social science", "natural science"],
        "topic": ["geography"] * 2, "category": ["Geography"] * 2, "skill": ["Read a map"] * 2, "lecture": [""] * 2,
        "solution": [""] * 2,
    }, feats)
    task = tp.get_task("scienceqa_img")
    data, samples = load_all(task, tmp_path)
    assert len(samples) == 1 and len(data.skipped) == 1 and data.skipped[0].reason == "ValueError: no image"
    assert samples[0].answers == ["A"] and "A. West Virginia\nB. Louisiana" in task.prompt(samples[0])


def _mmbench_rows():
    return {
        "index": [0, 1, 1_000_000], "question": ["What is the animal?"] * 3, "hint": ["nan", "A hint", "nan"],
        "A": ["dog", "cat", "cat"], "B": ["cat", "dog", "dog"], "C": ["bird", "nan", "bird"], "D": ["nan"] * 3,
        "answer": ["A", "B", "B"], "category": ["image_scene"] * 3, "image": [png()] * 3, "source": ["MMBench"] * 3,
        "L2-category": ["coarse_perception"] * 3, "comment": ["nan"] * 3, "split": ["dev"] * 3,
    }


def test_mmbench(tmp_path):
    s = Value("string")
    feats = Features({"index": Value("int64"), "question": s, "hint": s, "A": s, "B": s, "C": s, "D": s,
                      "answer": s, "category": s, "image": ImageFeature(), "source": s, "L2-category": s,
                      "comment": s, "split": s})
    write(tmp_path, "en", "dev", _mmbench_rows(), feats)
    plain = tp.get_task("mmbench_en_dev")
    _, samples = load_all(plain, tmp_path)
    assert [s.id for s in samples] == ["0", "1"]  # circular shifts only with circular=True
    assert samples[0].extra["options"] == {"A": "dog", "B": "cat", "C": "bird"}
    assert plain.prompt(samples[1]).startswith("A hint What is the animal? There are several options:\nA. cat\nB. dog")
    circ = tp.get_task("mmbench_en_dev", circular=True)
    _, all_rows = load_all(circ, tmp_path)
    assert [s.extra["group"] for s in all_rows] == [0, 1, 0]


def test_seedbench_image_subset(tmp_path):
    s = Value("string")
    feats = Features({"answer": s, "choice_a": s, "choice_b": s, "choice_c": s, "choice_d": s, "data_id": s,
                      "data_type": s, "question": s, "question_id": s, "question_type_id": Value("int16"),
                      "image": List(ImageFeature())})
    write(tmp_path, None, "test", {
        "answer": ["A", "B"], "choice_a": ["one", "x"], "choice_b": ["two", "y"], "choice_c": ["three", "z"],
        "choice_d": ["four", "w"], "data_id": ["1454426_2591111986", "v1"], "data_type": ["image", "video"],
        "question": ["How many towels are in the image?", "What happens?"], "question_id": ["101669", "v-1"],
        "question_type_id": [5, 10], "image": [[png()], [png(), png()]],
    }, feats)
    task = tp.get_task("seedbench")
    data, samples = load_all(task, tmp_path)
    assert [s.id for s in samples] == ["101669"] and len(data) == 1
    assert task.prompt(samples[0]).startswith("How many towels are in the image?\nA. one\nB. two")


def test_limit_and_seeded_subset(tmp_path):
    test_pope(tmp_path)
    task = tp.get_task("pope")
    assert len(task.load(data_dir=tmp_path, limit=2)) == 2
    a = task.load(data_dir=tmp_path, limit=2, seed=3).indices
    assert a == task.load(data_dir=tmp_path, limit=2, seed=3).indices and a == sorted(a)
    with pytest.raises(tp.OptionError, match="limit"):
        task.load(data_dir=tmp_path, limit=0)


def test_unreachable_dataset_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "tokenprune", "check-data", "pope"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot load dataset lmms-lab/POPE" in err[0] and "--data-dir" in err[0]
    with pytest.raises(DatasetUnavailableError, match="not a directory"):
        tp.get_task("pope").load(data_dir=tmp_path / "nope")


def test_check_data_command_reports_local_copy(tmp_path, capsys):
    from tokenprune.cli import main

    test_pope(tmp_path)
    assert main(["check-data", "pope", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pope: 2 samples used, 1 skipped" in out and "Answer the question using a single word" in out


def test_list_shows_tasks():
    out = subprocess.run([sys.executable, "-m", "tokenprune", "list", "tasks"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ["pope", "mme", "gqa", "textvqa_val", "vqav2_val", "scienceqa_img", "mmbench_en_dev", "seedbench"]:
        assert any(line.startswith(name + " ") for line in out.stdout.splitlines()), name
