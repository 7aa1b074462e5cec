"""Document functions of the offline video / multi-image check tasks (see run.py).

Paths in the jsonl files are relative to this file's folder (the task folder run.py writes).
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def video_doc_to_visual(doc):
    """``[path]`` of one mp4, as lmms-eval's video tasks (VideoMME, MVBench, ...) hand it over."""
    return [os.path.join(HERE, doc["video"])]


def frames_doc_to_visual(doc):
    """Every frame of the mp4 as PIL images, as lmms-eval's frame-list tasks (mvbench_frames,
    longvideobench_i) hand them over; the task's metadata says they are one video."""
    from tokenprune import Video

    return Video.from_file(os.path.join(HERE, doc["video"]), sampler="all").pil_frames()


def images_doc_to_visual(doc):
    """The document's images (PIL), in order: a multi-image question."""
    from PIL import Image

    out = []
    for path in doc["images"]:
        with Image.open(os.path.join(HERE, path)) as im:
            out.append(im.convert("RGB"))
    return out


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(doc["options"]))
    return f"{doc['question']}\n{options}\n{POST_PROMPT}"


def process_results(doc, results):
    pred = results[0].strip()
    letter = pred[:1].upper() if pred else ""
    return {"accuracy": float(letter == doc["answer"]), "answered": float(bool(pred))}
