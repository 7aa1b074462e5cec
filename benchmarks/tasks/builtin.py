"""The built-in benchmark tasks, with the data, prompts and metrics lmms-eval uses for LLaVA-1.5.

Each class names its Hub dataset (``dataset_path``/``dataset_name``/``split``, overridable), the
columns it reads, the LLaVA-1.5 prompt and the official metric. Importing this module registers them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ...errors import OptionError
from .base import OPTION_LETTER, SHORT_ANSWER, Sample, Task, register_task
from .metrics import extract_option, normalize_exact, parse_yes_no, vqa_accuracy


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------------------------
@register_task("pope")
class POPE(Task):
    """POPE object hallucination (adversarial / popular / random); headline: F1 averaged over the splits."""

    dataset_path = "lmms-lab/POPE"
    split = "test"
    headline = "f1"
    max_new_tokens = 16
    SPLITS = ("adversarial", "popular", "random")

    def row_id(self, row, index):
        return str(row["question_id"])

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"].lower().strip()], category=row["category"])

    def prompt(self, sample):
        return sample.question.strip() + SHORT_ANSWER

    def score(self, prediction, sample):
        pred = prediction.lower().strip()
        # POPE answers are read by their first word, as the POPE evaluation does ("Yes, there is...").
        first = pred.replace(".", " ").replace(",", " ").split()
        said_yes = float(bool(first) and first[0] == "yes")
        truth_yes = float(sample.answers[0] == "yes")
        return {"accuracy": float(said_yes == truth_yes), "said_yes": said_yes, "truth_yes": truth_yes}

    @staticmethod
    def _confusion(scores) -> dict[str, float]:
        tp = sum(s["said_yes"] * s["truth_yes"] for s in scores)
        fp = sum(s["said_yes"] * (1 - s["truth_yes"]) for s in scores)
        fn = sum((1 - s["said_yes"]) * s["truth_yes"] for s in scores)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"accuracy": _mean([s["accuracy"] for s in scores]), "precision": precision, "recall": recall,
                "f1": f1, "yes_ratio": _mean([s["said_yes"] for s in scores])}

    def aggregate(self, scores, samples):
        out: dict[str, float] = {}
        f1s = []
        for split in self.SPLITS:
            part = [s for s, x in zip(scores, samples) if x.category == split]
            if part:
                metrics = self._confusion(part)
                out.update({f"{split}_{k}": v for k, v in metrics.items()})
                f1s.append(metrics["f1"])
        overall = self._confusion(scores)
        out.update({f"all_{k}": v for k, v in overall.items()})
        out["f1"] = _mean(f1s)  # the papers' POPE number: F1 averaged over the splits present
        return out


# ------------------------------------------------------------------------------------------------
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@register_task("mme")
class MME(Task):
    """MME yes/no pairs; per subtask accuracy + accuracy+ (both questions of an image right), summed.

    Headline: the perception score (10 subtasks, max 2000); cognition (max 800) alongside.
    """

    dataset_path = "lmms-lab/MME"
    split = "test"
    headline = "perception"
    max_new_tokens = 16

    def row_id(self, row, index):
        # question_id is the image file, shared by the two questions of a pair: add the question.
        return f"{row['question_id']}::{row['question']}"

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"].lower().strip().replace(".", "")],
                      category=row["category"], extra={"pair": str(row["question_id"])})

    def prompt(self, sample):
        # LLaVA-1.5 replaces MME's own suffix with the short-answer instruction.
        return sample.question.strip().replace(" Please answer yes or no.", "") + SHORT_ANSWER

    def score(self, prediction, sample):
        return {"accuracy": float(parse_yes_no(prediction) == sample.answers[0])}

    def aggregate(self, scores, samples):
        by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s, x in zip(scores, samples):
            by_cat[x.category][x.extra["pair"]].append(s["accuracy"])
        out: dict[str, float] = {}
        for cat, pairs in by_cat.items():
            acc = _mean([v for p in pairs.values() for v in p])
            acc_plus = _mean([float(all(p) and len(p) == 2) for p in pairs.values()])
            out[f"{cat}_acc"], out[f"{cat}_acc_plus"] = acc, acc_plus
            out[cat] = 100 * (acc + acc_plus)
        out["perception"] = sum(out.get(c, 0.0) for c in MME_PERCEPTION)
        out["cognition"] = sum(out.get(c, 0.0) for c in MME_COGNITION)
        return out


# ------------------------------------------------------------------------------------------------
@register_task("gqa")
class GQA(Task):
    """GQA testdev-balanced; exact match after lower-casing and removing punctuation.

    Questions and images are two configs of the dataset, joined on ``imageId``.
    """

    dataset_path = "lmms-lab/GQA"
    dataset_name = "testdev_balanced_instructions"
    images_config = "testdev_balanced_images"
    split = "testdev"
    headline = "exact_match"

    def prepare_rows(self, rows, data_dir):
        images = self.load_rows(data_dir, config=self.images_config)
        self._images = {row_id: i for i, row_id in enumerate(images["id"])}
        self._image_rows = images
        return rows

    def row_image(self, row):
        index = self._images.get(row["imageId"])
        return None if index is None else self._image_rows[index]["image"]

    def row_id(self, row, index):
        return str(row["id"])

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], extra={"image_id": row["imageId"]})

    def prompt(self, sample):
        return sample.question + SHORT_ANSWER

    def score(self, prediction, sample):
        return {"exact_match": float(normalize_exact(prediction) == normalize_exact(sample.answers[0]))}


# ------------------------------------------------------------------------------------------------
class _VQAAccuracyTask(Task):
    """Shared by the VQA-accuracy tasks: question ids, 10 human answers, the official metric."""

    split = "validation"
    headline = "vqa_accuracy"

    def row_id(self, row, index):
        return str(row["question_id"])

    def prompt(self, sample):
        return sample.question + SHORT_ANSWER

    def score(self, prediction, sample):
        return {"vqa_accuracy": vqa_accuracy(prediction, sample.answers)}


@register_task("textvqa_val")
class TextVQA(_VQAAccuracyTask):
    """TextVQA validation; VQA accuracy over the 10 human answers (official normalisation)."""

    dataset_path = "lmms-lab/textvqa"

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], list(row["answers"]))

    def prompt(self, sample):
        return sample.question.capitalize() + SHORT_ANSWER  # as lmms-eval's TextVQA prompt


@register_task("vqav2_val")
class VQAv2(_VQAAccuracyTask):
    """VQAv2 validation; VQA accuracy over the 10 human answers (official normalisation)."""

    dataset_path = "lmms-lab/VQAv2"

    def make_sample(self, row, sample_id, image):
        answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
        return Sample(sample_id, image, row["question"], answers, category=row.get("answer_type") or "")

    def aggregate(self, scores, samples):
        out = super().aggregate(scores, samples)
        for kind in sorted({x.category for x in samples if x.category}):
            out[f"{kind}_vqa_accuracy"] = _mean([s["vqa_accuracy"] for s, x in zip(scores, samples) if x.category == kind])
        return out


# ------------------------------------------------------------------------------------------------
def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


@register_task("scienceqa_img")
class ScienceQAImg(Task):
    """ScienceQA, questions with an image (test split); option-letter accuracy as LLaVA scores it."""

    dataset_path = "lmms-lab/ScienceQA"
    dataset_name = "ScienceQA-IMG"
    split = "test"
    headline = "accuracy"

    def filter_rows(self, rows):
        # The IMG config holds image questions only; a row without an image is skipped (counted).
        return list(range(len(rows)))

    def row_id(self, row, index):
        return f"{self.split}-{index}"  # the dataset has no id column; the row index is stable per revision

    def make_sample(self, row, sample_id, image):
        letters = _letters(len(row["choices"]))
        return Sample(sample_id, image, row["question"], [letters[row["answer"]]], category=row.get("subject") or "",
                      extra={"choices": list(row["choices"]), "hint": row.get("hint") or ""})

    def prompt(self, sample):
        choices = "\n".join(f"{c}. {t}" for c, t in zip(_letters(len(sample.extra["choices"])), sample.extra["choices"]))
        context = f"Context: {sample.extra['hint']}\n" if sample.extra["hint"] else ""
        return f"{context}{sample.question}\n{choices}{OPTION_LETTER}"

    def score(self, prediction, sample):
        pred, target = prediction.strip(), sample.answers[0]
        if pred == target:
            return {"accuracy": 1.0}
        # LLaVA's rule: "B. some text" counts by its leading letter.
        return {"accuracy": float(len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0] == target)}


# ------------------------------------------------------------------------------------------------
CIRCULAR_OFFSET = 1_000_000  # MMBench: index + k * 1e6 is the k-th circular shift of question `index`


@register_task("mmbench_en_dev")
class MMBenchEnDev(Task):
    """MMBench (English, dev); option extracted from the answer by rules (no LLM judge).

    ``circular=True``: a question counts only if every circular shift of its options is answered
    right (MMBench's CircularEval); otherwise only the original questions are scored.
    """

    dataset_path = "lmms-lab/MMBench"
    dataset_name = "en"
    split = "dev"
    headline = "accuracy"
    max_new_tokens = 16
    OPTIONS = ("A", "B", "C", "D", "E")

    def __init__(self, dataset_path: str | None = None, revision: str | None = None, circular: bool = False):
        super().__init__(dataset_path, revision)
        if not isinstance(circular, bool):
            raise OptionError(f"circular must be true or false, got {circular!r}")
        self.circular = circular

    def filter_rows(self, rows):
        if self.circular:
            return list(range(len(rows)))
        return [i for i, idx in enumerate(rows["index"]) if int(idx) < CIRCULAR_OFFSET]

    def row_id(self, row, index):
        return str(row["index"])

    def make_sample(self, row, sample_id, image):
        options = {c: row[c] for c in self.OPTIONS if c in row and _present(row[c])}
        hint = row.get("hint")
        return Sample(sample_id, image, row["question"], [row["answer"]], category=row.get("category") or "",
                      extra={"options": options, "hint": hint if _present(hint) else "",
                             "group": int(row["index"]) % CIRCULAR_OFFSET})

    def prompt(self, sample):
        options = "There are several options:\n" + "\n".join(f"{k}. {v}" for k, v in sorted(sample.extra["options"].items()))
        head = f"{sample.extra['hint']} {sample.question}" if sample.extra["hint"] else sample.question
        return f"{head} {options}{OPTION_LETTER}"

    def score(self, prediction, sample):
        return {"accuracy": float(extract_option(prediction, sample.extra["options"]) == sample.answers[0])}

    def aggregate(self, scores, samples):
        groups: dict[int, list[float]] = defaultdict(list)
        for s, x in zip(scores, samples):
            groups[x.extra["group"]].append(s["accuracy"])
        out = {"accuracy": _mean([float(all(v)) for v in groups.values()])}
        by_cat: dict[str, list[float]] = defaultdict(list)
        seen = set()
        for x in samples:
            if x.extra["group"] not in seen:
                seen.add(x.extra["group"])
                by_cat[x.category].append(float(all(groups[x.extra["group"]])))
        out.update({f"{c}_accuracy": _mean(v) for c, v in by_cat.items() if c})
        return out


def _present(value) -> bool:
    return value is not None and str(value) not in ("", "nan", "None")


# ------------------------------------------------------------------------------------------------
@register_task("seedbench")
class SEEDBench(Task):
    """SEED-Bench, image questions only; option accuracy (first character of the answer)."""

    dataset_path = "lmms-lab/SEED-Bench"
    split = "test"
    headline = "accuracy"

    def filter_rows(self, rows):
        return [i for i, kind in enumerate(rows["data_type"]) if kind == "image"]

    def row_id(self, row, index):
        return str(row["question_id"])

    def make_sample(self, row, sample_id, image):
        options = {c: row[f"choice_{c.lower()}"] for c in "ABCD"}
        return Sample(sample_id, image, row["question"], [row["answer"]],
                      category=str(row.get("question_type_id", "")), extra={"options": options})

    def prompt(self, sample):
        options = "\n".join(f"{k}. {v}" for k, v in sample.extra["options"].items())
        return f"{sample.question}\n{options}{OPTION_LETTER}"

    def score(self, prediction, sample):
        pred = prediction.strip()
        return {"accuracy": float(pred[:1] == sample.answers[0])}


# ------------------------------------------------------------------------------------------------
@register_task("easy_vqa")
class EasyVQA(Task):
    """easy-VQA (shapes and colours; the ``easy-vqa`` package's test split); exact match over its 13 answers.

    Runs offline: the data ship in the ``easy-vqa`` PyPI package (install with ``--no-deps``).
    """

    dataset_path = "easy-vqa"
    split = "test"
    headline = "accuracy"
    max_new_tokens = 6

    def load_rows(self, data_dir=None, config=None, split=None):
        import json
        from pathlib import Path

        import datasets

        from ...zoo.convert import package_file

        root = Path(data_dir) if data_dir is not None else package_file("easy_vqa", "data")
        split = split or self.split
        questions = json.loads((root / split / "questions.json").read_text())
        self.answer_set = [a.strip() for a in (root / "answers.txt").read_text().splitlines() if a.strip()]
        images = root / split / "images"
        return datasets.Dataset.from_dict(
            {"question": [q[0] for q in questions], "answer": [q[1] for q in questions],
             "image_id": [int(q[2]) for q in questions], "image": [str(images / f"{q[2]}.png") for q in questions]},
            features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                        "image_id": datasets.Value("int32"), "image": datasets.Image(decode=False)}),
        )

    def row_id(self, row, index):
        return f"{self.split}-{index}"

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], extra={"image_id": row["image_id"]})

    def prompt(self, sample):
        return sample.question + SHORT_ANSWER

    def score(self, prediction, sample):
        pred = normalize_exact(prediction)
        return {"accuracy": float(pred == normalize_exact(sample.answers[0])),
                "valid": float(pred in getattr(self, "answer_set", [pred]))}
