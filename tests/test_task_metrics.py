"""Hand-computed metric cases for every task."""
from __future__ import annotations

import pytest
from PIL import Image

import tokenprune as tp
from tokenprune.benchmarks.tasks import Sample
from tokenprune.benchmarks.tasks.metrics import extract_option, normalize_vqa_answer, parse_yes_no, vqa_accuracy

IMG = Image.new("RGB", (4, 4))


@pytest.mark.parametrize("pred, ref", [("Two", "2"), ("a dog", "dog"), ("yes.", "yes"), ("dont", "don't"),
                                       ("The Red one", "red 1"), ("black-and-white", "black and white"),
                                       ("1,000", "1000"), ("2.5", "2.5")])
def test_vqa_normalisation_equates(pred, ref):
    assert normalize_vqa_answer(pred) == normalize_vqa_answer(ref)
    assert vqa_accuracy(pred, [ref] * 10) == 1.0


def test_vqa_normalisation_keeps_different_answers_apart():
    assert normalize_vqa_answer("2.5") != normalize_vqa_answer("25")
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 2 + ["3"] * 8
    # "2": each of the 2 matching answers left out -> 1 match -> 1/3; the 8 others -> 2 matches -> 2/3.
    assert vqa_accuracy("two", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_accuracy("3", answers) == 1.0
    # 3 matches: leaving a match out leaves 2 -> 2/3 (3 times); else 3 -> 1 (7 times)
    assert vqa_accuracy("4", ["4"] * 3 + ["5"] * 7) == pytest.approx((3 * (2 / 3) + 7) / 10)


def pope_sample(i, answer, split):
    return Sample(f"{split}-{i}", IMG, "Is there a dog in the image?", [answer], category=split)


def test_pope_f1_from_a_known_confusion_matrix():
    task = tp.get_task("pope")
    # adversarial: TP=4, FP=1, FN=2, TN=3 -> precision .8, recall 4/6, F1 = 8/11, accuracy .7, yes ratio .5
    cases = [("yes", "Yes")] * 4 + [("no", "Yes, there is.")] + [("yes", "No")] * 2 + [("no", "no")] * 3
    # random: perfect -> F1 1.0
    cases_r = [("yes", "yes")] * 2 + [("no", "no")] * 2
    samples, preds = [], []
    for i, (truth, pred) in enumerate(cases):
        samples.append(pope_sample(i, truth, "adversarial"))
        preds.append(pred)
    for i, (truth, pred) in enumerate(cases_r):
        samples.append(pope_sample(i, truth, "random"))
        preds.append(pred)
    scores = [task.score(p, s) for p, s in zip(preds, samples)]
    out = task.aggregate(scores, samples)
    assert out["adversarial_precision"] == pytest.approx(0.8)
    assert out["adversarial_recall"] == pytest.approx(4 / 6)
    assert out["adversarial_f1"] == pytest.approx(8 / 11)
    assert out["adversarial_accuracy"] == pytest.approx(0.7)
    assert out["adversarial_yes_ratio"] == pytest.approx(0.5)
    assert out["random_f1"] == 1.0
    assert out["f1"] == pytest.approx((8 / 11 + 1.0) / 2)  # the headline averages the splits present
    assert task.headline == "f1"


def test_mme_acc_plus_over_image_pairs():
    task = tp.get_task("mme")
    rows = [  # (image, truth, prediction)
        ("a.png", "yes", "Yes"), ("a.png", "no", "No."),       # pair right
        ("b.png", "yes", "yes"), ("b.png", "no", "yes"),       # one right
        ("c.png", "yes", "no"), ("c.png", "no", "maybe"),      # none right ("maybe" -> other)
    ]
    samples = [Sample(f"{img}::{i}", IMG, "Is it? Please answer yes or no.", [t], category="existence",
                      extra={"pair": img}) for i, (img, t, _) in enumerate(rows)]
    scores = [task.score(p, s) for (_, _, p), s in zip(rows, samples)]
    out = task.aggregate(scores, samples)
    assert out["existence_acc"] == pytest.approx(3 / 6)
    assert out["existence_acc_plus"] == pytest.approx(1 / 3)
    assert out["existence"] == pytest.approx(100 * (0.5 + 1 / 3))
    assert out["perception"] == pytest.approx(100 * (0.5 + 1 / 3)) and out["cognition"] == 0
    assert task.prompt(samples[0]) == "Is it?\nAnswer the question using a single word or phrase."


def test_mme_yes_no_reading():
    assert [parse_yes_no(x) for x in ["Yes", "no.", "y", "N", "Yes, it is", "Nope", "There is"]] == \
        ["yes", "no", "yes", "no", "yes", "no", "other"]


@pytest.mark.parametrize("answer, expected", [
    ("The answer is (B).", "B"), ("B", "B"), ("C. a cat", "C"), ("(D)", "D"), ("Answer: A", "A"),
    ("I think it is a cat", "C"), ("A dog sits on a mat", "B"), ("dog or cat", None), ("no idea", None),
])
def test_mmbench_option_extraction(answer, expected):
    options = {"A": "bird", "B": "dog", "C": "cat", "D": "fish"}
    assert extract_option(answer, options) == expected


def test_mmbench_circular_evaluation():
    task = tp.get_task("mmbench_en_dev", circular=True)
    opts = {"A": "dog", "B": "cat"}
    samples = [Sample(str(i), IMG, "q?", [ans], extra={"options": opts, "hint": "", "group": i % 1_000_000})
               for i, ans in [(1, "A"), (1_000_001, "B"), (2, "B"), (1_000_002, "A")]]
    preds = ["A", "B", "B", "B"]  # question 1 right in both shifts; question 2 wrong in its shift
    out = task.aggregate([task.score(p, s) for p, s in zip(preds, samples)], samples)
    assert out["accuracy"] == 0.5
    assert task.prompt(samples[0]).endswith("A. dog\nB. cat\nAnswer with the option's letter from the given choices directly.")


def test_scienceqa_llava_rule():
    task = tp.get_task("scienceqa_img")
    s = Sample("x", IMG, "Which?", ["B"], extra={"choices": ["x", "y", "z"], "hint": "A hint."})
    assert [task.score(p, s)["accuracy"] for p in ["B", "B. y", "The answer is B", "b", "A"]] == [1, 1, 0, 0, 0]
    assert task.prompt(s) == ("Context: A hint.\nWhich?\nA. x\nB. y\nC. z\n"
                              "Answer with the option's letter from the given choices directly.")


def test_seedbench_and_gqa_scoring():
    seed = tp.get_task("seedbench")
    s = Sample("1", IMG, "What?", ["C"], extra={"options": {"A": "a", "B": "b", "C": "c", "D": "d"}})
    assert [seed.score(p, s)["accuracy"] for p in ["C", "C. c", " C", "B"]] == [1, 1, 1, 0]
    gqa = tp.get_task("gqa")
    g = Sample("1", IMG, "Is the sky blue?", ["yes"])
    assert [gqa.score(p, g)["exact_match"] for p in ["Yes.", "yes", "no", "yes it is"]] == [1, 1, 0, 0]


def test_textvqa_and_vqav2_prompts_and_scores():
    text = tp.get_task("textvqa_val")
    s = Sample("1", IMG, "what brand is it?", ["Nike"] * 10)
    assert text.prompt(s) == "What brand is it?\nAnswer the question using a single word or phrase."
    assert text.score("nike.", s)["vqa_accuracy"] == 1.0
    vqa = tp.get_task("vqav2_val")
    v = [Sample("1", IMG, "How many?", ["2"] * 10, category="number"), Sample("2", IMG, "Is it?", ["yes"] * 10, category="yes/no")]
    out = vqa.aggregate([vqa.score("two", v[0]), vqa.score("no", v[1])], v)
    assert out == {"vqa_accuracy": 0.5, "number_vqa_accuracy": 1.0, "yes/no_vqa_accuracy": 0.0}


def test_unknown_task_lists_known_ones():
    with pytest.raises(tp.UnknownNameError) as info:
        tp.get_task("popee")
    msg = str(info.value)
    assert "Did you mean 'pope'" in msg and "mmbench_en_dev" in msg and "vqav2_val" in msg


def test_every_task_is_listed():
    assert set(tp.list_tasks()) >= {"pope", "mme", "gqa", "textvqa_val", "vqav2_val", "scienceqa_img",
                                     "mmbench_en_dev", "seedbench"}
