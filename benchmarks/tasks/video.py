"""Video benchmark tasks: the data, prompts and metrics of lmms-eval 0.7.3's video tasks.

Each task reads the annotation rows lmms-eval reads (same Hub dataset, config and split, or a local
copy with ``--data-dir``), finds each row's video file where lmms-eval's ``doc_to_visual`` looks for
it, builds the prompt of its ``doc_to_text`` and scores answers with its ``process_results`` and
aggregation, reproduced here (lmms-eval itself is not imported). ``Sample.image`` is a
:class:`tokenprune.Video` holding the frames the chosen sampler picks.

==========================  ==========================================  ===============================
task                        lmms-eval 0.7.3 task (tasks/<dir>/)          headline (lmms-eval's number)
==========================  ==========================================  ===============================
``videomme``                ``videomme`` (videomme/)                     ``videomme_perception_score``
``mvbench``                 the 20 ``mvbench_*`` tasks (mvbench/)        ``mvbench_accuracy``
``egoschema_subset``        ``egoschema_subset`` (egoschema/)            ``score``
``mlvu_dev``                ``mlvu_dev`` (mlvu/)                         ``mlvu_percetion_score`` (sic)
``longvideobench_val_v``    ``longvideobench_val_v`` (longvideobench/)   ``lvb_acc``
``nextqa_mc_test``          ``nextqa_mc_test`` (nextqa/)                 ``exact_match``
==========================  ==========================================  ===============================

Frames: which frames a model sees is a task option, not a property of the data. lmms-eval decodes
frames inside each model class, so a task cannot know the model's rule: pass ``sampler=`` (a name
in :data:`tokenprune.media.SAMPLERS`, e.g. ``llava_onevision`` to see exactly the 32 frames
lmms-eval's ``llava_onevision`` model sees), ``frames=`` and ``fps=`` as task options (``task_options``
in a sweep config). The default is ``sampler="uniform"`` with its default of 8 frames, ends
included: cheap, and the same for every model -- not any evaluator's setting.

Where the videos are: without ``--data-dir``, where lmms-eval keeps them (``$HF_HOME/<cache_dir>``,
``cache_dir`` from the task's YAML, default ``HF_HOME=~/.cache/huggingface``), so a machine that has
run lmms-eval's task reuses its videos; with ``--data-dir DIR`` (a local copy of the Hub dataset
repository, its video archives extracted in place), under ``DIR``; ``video_dir=`` overrides both.
A video that is missing or does not decode skips its sample, recorded in ``TaskData.skipped``
(lmms-eval stops the run instead).

Answer parsers that fall back to a random option when nothing can be read (EgoSchema, NExT-QA,
LongVideoBench, as lmms-eval and the papers do) draw it from ``random.Random("<task>/<sample id>")``,
so a run scores the same every time (lmms-eval uses the process-wide ``random``, so its draw
depends on the order the samples are scored in).
"""
from __future__ import annotations

import json
import os
import random
import re
import string
from abc import abstractmethod
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from ...errors import OptionError
from ...media import SAMPLERS, MediaError, Video, sample_indices
from .base import LOCAL_FORMATS, DatasetUnavailableError, Sample, Task, register_task

DEFAULT_SAMPLER = "uniform"  # with the sampler's default frame count (8): see the module docstring
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")  # a folder of these is a video given as frames


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _hf_home() -> Path:
    """lmms-eval's ``HF_HOME`` (its video tasks default it to ``~/.cache/huggingface``)."""
    return Path(os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface")))


# ------------------------------------------------------------------------------------------------
# Answer extraction, ported rule for rule from lmms-eval 0.7.3 (see each docstring for the source).

_MCQ_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
]
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                 "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] = ("A", "B", "C", "D")) -> str:
    """The option letter in a free-form answer, ``""`` if none: lmms-eval's
    ``tasks/_task_utils/mcq_extract.py::extract_mcq_answer`` (VideoMME and MLVU call it with A-D).

    Every letter found in one of the formats ``(B)``, ``B.``, ``B:``, ``B)``, ``"B "``, after an answer
    phrase (``"the answer is B"``), at the very start or end is a candidate; the highest-priority
    format wins (start > end > phrase > parentheses > period > colon > right paren > space), the
    last occurrence within a format. Only when nothing matched, any occurrence of a letter counts
    (so ``"Bird"`` reads as ``B``, as in lmms-eval).
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    found: list[tuple[str, int, str]] = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        for ch in choices:
            if pattern.format(ch) in text:
                found.append((ch, text.rfind(pattern.format(ch)), fmt))
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            for ch in choices:
                pos = text.find(ch, idx + len(phrase))
                if pos != -1:
                    found.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((ch, len(text) - 1, "end"))
    if not found:
        found = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not found:
        return ""
    found.sort(key=lambda c: (_MCQ_PRIORITY[c[2]], c[1]), reverse=True)
    return found[0][0]


_MVB_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", as in lmms-eval
_MVB_COMMA = re.compile(r"(\d)(\,)(\d)")
_MVB_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_MVB_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)


def _mvbench_process(answer: str) -> str:
    """lmms-eval's ``mvbench/utils.py::mcq_acc.process``: ``"B. text"`` -> ``"B"``; otherwise
    punctuation handled as the VQA evaluation, lower-cased, and the first standalone letter a-e
    (any case: ``"a cat"`` reads as ``A``) upper-cased, else the cleaned text."""
    match = _MVB_OPTION.match(answer.strip())
    if match:
        return match.group(1).upper()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _MVB_PUNCT:
        if (p + " " in text or " " + p in text) or _MVB_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _MVB_PERIOD.sub("", out, re.UNICODE)  # sic: re.UNICODE lands in `count` (32), as in lmms-eval
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", out, re.IGNORECASE)
    return letter.group(1).upper() if letter else out


def mvbench_mcq_acc(answer: str, prediction: str) -> float:
    """lmms-eval's ``mvbench/utils.py::mcq_acc``: 1.0 when the prediction and the reference option
    letter read the same after :func:`_mvbench_process`, else 0.0."""
    return float(_mvbench_process(prediction) == _mvbench_process(answer))


def parse_mmmu_first(response: str, choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random) -> str:
    """EgoSchema's answer parser, lmms-eval ``egoschema/utils.py::parse_multi_choice_response``
    (MMMU-derived): candidates ``(B)``, ``"B "``, ``B.`` (all three kinds collected); for a long
    answer (> 5 words) without any, the options whose text it contains. Several candidates: the one
    whose LAST occurrence comes FIRST (``np.argmin`` of ``rfind``). None: a random letter."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    by_letter = True
    found: list[str] = []
    for pattern in ("({})", "{} ", "{}."):
        found += [pattern.format(c) for c in choices if pattern.format(c) in response]
    if not found and len(response.split()) > 5:
        found = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_letter = not found
    if not found:
        return rng.choice(list(choices))
    if len(found) > 1:
        if by_letter:
            starts = [response.rfind(c) for c in found]
        else:
            starts = [response.lower().rfind(index2ans[c].lower()) for c in found]
        pick = found[min(range(len(starts)), key=starts.__getitem__)]  # first minimum, as np.argmin
    else:
        pick = found[0]
    return pick.replace("(", "").replace(")", "").replace(".", "").strip()


def parse_mmmu_last(response: str, choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random) -> str:
    """NExT-QA's answer parser, lmms-eval ``nextqa/utils.py::parse_multi_choice_response``: letters in
    ``(B)``; else ``"B "``; else ``B.`` (each tried only when the previous found nothing); else, for
    a long answer (> 5 words), the options whose text it contains. Several: the one occurring LAST
    (``np.argmax`` of ``rfind`` of ``(B)``, or of ``" B "`` -- -1 when it was found as ``"B."``).
    None: a random letter."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    by_letter, bracket = True, False
    found = [c for c in choices if f"({c})" in response]
    bracket = bool(found)
    if not found:
        found = [c for c in choices if f"{c} " in response]
    if not found:
        found = [c for c in choices if f"{c}." in response]
    if not found and len(response.split()) > 5:
        found = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_letter = not found
    if not found:
        return rng.choice(list(choices))
    if len(found) == 1:
        return found[0]
    if by_letter:
        starts = [response.rfind(f"({c})" if bracket else f" {c} ") for c in found]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in found]
    return found[max(range(len(starts)), key=starts.__getitem__)]  # first maximum, as np.argmax


_LVB_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:"]


def parse_longvideobench(response: str, choices: Sequence[str], rng: random.Random) -> str:
    """lmms-eval ``longvideobench/utils.py::parse_multi_choice_response``: answer prefixes removed
    (``"The best answer is"``...), then the FIRST capital A-E anywhere, even inside a word
    (``"D. A book"`` -> ``D``, ``"Based on the video, D"`` -> ``B``); none: a random option letter."""
    s = response.strip()
    for prefix in _LVB_PREFIXES:
        s = s.replace(prefix, "")
    match = re.search(r"[ABCDE]", s)
    return match[0] if match else rng.choice(list(choices))


# ------------------------------------------------------------------------------------------------
class VideoTask(Task):
    """Base class of video tasks: rows name a video file; samples carry the sampled :class:`Video`.

    Subclasses set ``cache_dir`` (lmms-eval's ``dataset_kwargs.cache_dir``, relative to ``HF_HOME``)
    and implement :meth:`video_candidates` besides the usual :class:`Task` methods.

    Args:
        dataset_path, revision: the Hub dataset and revision (defaults: lmms-eval's).
        sampler: frame sampler name (:data:`tokenprune.media.SAMPLERS`); default ``"uniform"``.
        frames: the sampler's frame count; ``None``: its default (``uniform``: 8; the lmms-eval
            model samplers: 32).
        fps: sampling rate for the rate-based samplers (``qwen2_5_vl``, ``qwen3_vl``, ``internvl_hf``).
        video_dir: the folder the row's video paths are relative to (default: ``--data-dir`` if
            given, else lmms-eval's ``$HF_HOME/<cache_dir>``).
        as_images: hand the model the sampled frames as a list of PIL images (a multi-image prompt,
            as lmms-eval's frame-list tasks do for image models) instead of a :class:`Video`.
        frame_fps: the frame rate a folder of frame images stands for (default 1.0).
        prompt_style: which of lmms-eval's ``lmms_eval_specific_kwargs`` prompts to use (``default``,
            or the model names the task's YAML lists: :attr:`PROMPTS`).
    """

    cache_dir: ClassVar[str]
    max_new_tokens = 16  # the tasks' YAML generation_kwargs (LongVideoBench: 32)
    # lmms-eval stops a generate_until task whose YAML names no `until` at its fewshot delimiter "\n\n"
    # (lmms_eval/api/task.py, TaskConfig.__post_init__); none of these six names one.
    until = ("\n\n",)
    # lmms_eval_specific_kwargs of the task's YAML: {style: {"pre_prompt": ..., "post_prompt": ...}}
    PROMPTS: ClassVar[dict[str, dict[str, str]]] = {"default": {"pre_prompt": "", "post_prompt": ""}}
    # split -> annotation file name of the Hub repository, for repositories that ship JSON files
    # instead of split-named shards (LongVideoBench)
    local_json: ClassVar[dict[str, str]] = {}

    def __init__(self, dataset_path: str | None = None, revision: str | None = None, sampler: str = DEFAULT_SAMPLER,
                 frames: int | None = None, fps: float | None = None, video_dir: str | os.PathLike | None = None,
                 as_images: bool = False, frame_fps: float = 1.0, prompt_style: str = "default"):
        super().__init__(dataset_path, revision)
        if sampler not in SAMPLERS:
            raise OptionError(f"task {self.name}: unknown frame sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        try:  # every other option error (frames=0, fps with a count sampler, ...) now, not mid-run
            sample_indices(sampler, 1000, 30.0, frames=frames, target_fps=fps)
        except OptionError as exc:
            raise OptionError(f"task {self.name}: {exc}") from None
        if not isinstance(as_images, bool):
            raise OptionError(f"task {self.name}: as_images must be true or false, got {as_images!r}")
        if not (isinstance(frame_fps, (int, float)) and frame_fps > 0):
            raise OptionError(f"task {self.name}: frame_fps must be a positive number, got {frame_fps!r}")
        if prompt_style not in self.PROMPTS:
            raise OptionError(f"task {self.name}: unknown prompt_style {prompt_style!r}: use one of {', '.join(self.PROMPTS)}")
        self.sampler, self.frames, self.fps = sampler, frames, fps
        self.video_dir = Path(os.path.expanduser(os.fspath(video_dir))) if video_dir is not None else None
        self.as_images, self.frame_fps, self.prompt_style = as_images, float(frame_fps), prompt_style
        self.data_dir: Path | None = None

    @property
    def prompt_kwargs(self) -> dict[str, str]:
        """The chosen ``lmms_eval_specific_kwargs`` entry."""
        return self.PROMPTS[self.prompt_style]

    # -- loading --------------------------------------------------------------------------------
    def load_rows(self, data_dir=None, config=None, split=None):
        """As :meth:`Task.load_rows`; a local copy may also hold the JSON annotation file the Hub
        repository ships (:attr:`local_json`), read directly."""
        split = split or self.split
        if data_dir is not None and split in self.local_json:
            root = Path(data_dir).expanduser()
            shards = [f for f in root.rglob(f"{split}[-_.]*") if f.suffix in LOCAL_FORMATS] if root.is_dir() else []
            found = sorted(root.rglob(self.local_json[split])) if root.is_dir() and not shards else []
            if found:
                return read_json_rows(found[0])
        return super().load_rows(data_dir, config, split)

    def prepare_rows(self, rows, data_dir):
        self.data_dir = Path(os.path.expanduser(os.fspath(data_dir))) if data_dir is not None else None
        return rows

    def video_root(self) -> Path:
        """The folder the rows' video paths are relative to: ``video_dir``, else ``--data-dir``,
        else lmms-eval's ``$HF_HOME/<cache_dir>``."""
        if self.video_dir is not None:
            return self.video_dir
        return self.data_dir if self.data_dir is not None else _hf_home() / self.cache_dir

    @abstractmethod
    def video_candidates(self, row: dict) -> list[str]:
        """Paths, relative to :meth:`video_root`, where lmms-eval's ``doc_to_visual`` looks for the
        row's video, in its order (the first that exists is used)."""

    def row_image(self, row: dict) -> str:
        """The row's video file (or folder of frames), the first of :meth:`video_candidates` that
        exists under :meth:`video_root`.

        Raises:
            MediaError: none exists (the sample is skipped and recorded).
        """
        root = self.video_root()
        candidates = self.video_candidates(row)
        for rel in candidates:
            path = root / rel
            if path.exists():
                return str(path)
        raise MediaError(f"video {candidates[0]!r} not found under {root}: pass the folder holding the videos "
                         f"as --data-dir or the task option video_dir")

    def load_visual(self, row: dict) -> Video | list:
        """The sampled frames of the row's video: a :class:`Video` (``as_images``: a list of PIL images).
        A folder of frame images is read as a video at ``frame_fps``, frames in file-name order."""
        path = Path(self.row_image(row))
        if path.is_dir():
            from PIL import Image

            files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise MediaError(f"frame folder {str(path)!r} holds no .jpg/.png frames: check the path")
            every = Video.from_frames([Image.open(f).convert("RGB") for f in files], fps=self.frame_fps)
            video = every.sample(self.sampler, frames=self.frames, fps=self.fps)
        else:
            video = Video.from_file(path, sampler=self.sampler, frames=self.frames, fps=self.fps)
        return video.pil_frames() if self.as_images else video


def read_json_rows(path: Path) -> list[dict]:
    """Rows of a JSON annotation file (a list of objects, as MVBench's and LongVideoBench's)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetUnavailableError(f"cannot read annotation file {path}: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetUnavailableError(f"annotation file {path} is not a JSON list of objects")
    return rows


def _letters(n: int) -> list[str]:
    return list(string.ascii_uppercase[:n])


def _rng(task: Task, sample: Sample) -> random.Random:
    """The random fallback's generator: seeded by task and sample (see the module docstring)."""
    return random.Random(f"{task.name}/{sample.id}")


# ------------------------------------------------------------------------------------------------
VIDEOMME_DURATIONS = ("short", "medium", "long")


@register_task("videomme")
class VideoMME(VideoTask):
    """Video-MME without subtitles; accuracy (percent) of the option letter lmms-eval extracts.

    lmms-eval 0.7.3 ``tasks/videomme/videomme.yaml`` + ``utils.py``: ``videomme_doc_to_visual``
    (``<cache>/data/<videoID>.mp4``, else ``.MP4``, else ``.mkv``), ``videomme_doc_to_text`` (and
    ``videomme_doc_to_text_qwen3vl`` for ``prompt_style="qwen3_vl"``), ``videomme_process_results``
    (``extract_characters_regex`` = :func:`extract_mcq_answer` over A-D) and
    ``videomme_aggregate_results``: ``100 * correct / answered`` over all questions (the headline),
    and the same per duration (``short`` / ``medium`` / ``long``), domain and task type, which
    lmms-eval logs.
    """

    dataset_path = "lmms-eval/Video-MME"
    split = "test"
    cache_dir = "videomme"
    headline = "videomme_perception_score"
    PROMPTS = {
        "default": {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."},
        "gpt4v": {"pre_prompt": "", "post_prompt": "Answer the question with A, B, C, or D."},
        "llava_vid": {"pre_prompt": "", "post_prompt": "The best answer is:"},
        "qwen3_vl": {"format": "qwen3_vl", "pre_prompt": "Question: ", "post_prompt": "Answer with the option letter only."},
    }
    OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                     "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")

    def row_id(self, row, index):
        return str(row["question_id"])

    def video_candidates(self, row):
        return [f"data/{row['videoID']}.{ext}" for ext in ("mp4", "MP4", "mkv")]

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], category=row["duration"],
                      extra={"options": list(row["options"]), "domain": row["domain"],
                             "sub_category": row["sub_category"], "task_type": row["task_type"],
                             "video_id": row["videoID"]})

    def prompt(self, sample):
        kw = self.prompt_kwargs
        options = "\n".join(sample.extra["options"])  # the options carry their letters: "A. ..."
        if kw.get("format") == "qwen3_vl":
            return f"{kw['pre_prompt']}{sample.question}\nOptions:\n{options}\n{kw['post_prompt']}"
        return f"{self.OPTION_PROMPT}\n{sample.question}\n{options}\n{kw['post_prompt']}"

    def score(self, prediction, sample):
        return {"accuracy": float(extract_mcq_answer(prediction, "ABCD") == sample.answers[0])}

    def aggregate(self, scores, samples):
        def pct(pairs):
            pairs = list(pairs)
            return 100 * sum(s["accuracy"] for s, _ in pairs) / len(pairs) if pairs else 0.0

        both = list(zip(scores, samples))
        out = {self.headline: pct(both)}
        for duration in VIDEOMME_DURATIONS:
            if any(x.category == duration for _, x in both):
                out[f"duration_{duration}"] = pct(p for p in both if p[1].category == duration)
        for key, prefix in (("domain", "domain"), ("task_type", "task")):
            for value in sorted({x.extra[key] for _, x in both}):
                out[f"{prefix}_{value}"] = pct(p for p in both if p[1].extra[key] == value)
        return out


# ------------------------------------------------------------------------------------------------
# lmms-eval mvbench/utils.py DATA_LIST: each subtask's video folder under the cache dir.
MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation", "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
# The group's order in lmms-eval mvbench/mvbench.yaml.
MVBENCH_SUBTASKS = (
    "action_sequence", "moving_count", "action_prediction", "episodic_reasoning", "action_antonym", "action_count",
    "scene_transition", "object_shuffle", "object_existence", "fine_grained_pose", "unexpected_action",
    "moving_direction", "state_change", "object_interaction", "character_order", "action_localization",
    "counterfactual_inference", "fine_grained_action", "moving_attribute", "egocentric_navigation",
)


@register_task("mvbench")
class MVBench(VideoTask):
    """MVBench, its 20 subtasks (200 questions each); per-subtask accuracy (percent) and their mean.

    lmms-eval 0.7.3 ``tasks/mvbench/`` (``_default_template_yaml``, ``mvbench_<subtask>.yaml``,
    ``utils.py``): dataset ``OpenGVLab/MVBench`` revision ``video``, config = subtask, split
    ``train``; ``mvbench_doc_to_visual`` (``<cache>/<DATA_LIST[subtask]>/<video>``, else under
    ``data0613/``), ``mvbench_doc_to_text`` with post prompt ``"Only give the best option.\\n"``,
    ``mvbench_process_results`` (reference letter = the first candidate equal to ``answer``;
    :func:`mvbench_mcq_acc`) and ``mvbench_aggregate_results``: ``100 * correct / answered``,
    answered = non-empty predictions, per subtask (``mvbench_<subtask>``). lmms-eval's ``mvbench``
    group prints only the subtasks; the headline ``mvbench_accuracy`` is their unweighted mean, the
    MVBench paper's average.

    Args:
        subtasks: which subtasks (list or comma-separated string); default all 20.
        **options: as :class:`VideoTask`.

    A local copy (``--data-dir``) is the Hub repository: ``json/<subtask>.json`` and the video
    folders of ``DATA_LIST`` (``clevrer/video_validation/...``) beside it.
    """

    dataset_path = "OpenGVLab/MVBench"
    split = "train"
    cache_dir = "mvbench_video"
    headline = "mvbench_accuracy"
    PROMPTS = {"default": {"pre_prompt": "", "post_prompt": "Only give the best option.\n"}}

    def __init__(self, dataset_path: str | None = None, revision: str | None = None,
                 subtasks: str | Sequence[str] | None = None, **options: Any):
        super().__init__(dataset_path, "video" if revision is None else revision, **options)
        if subtasks is None:
            subtasks = MVBENCH_SUBTASKS
        elif isinstance(subtasks, str):
            subtasks = [t.strip() for t in subtasks.split(",") if t.strip()]
        unknown = [t for t in subtasks if t not in MVBENCH_FOLDERS]
        if unknown or not subtasks:
            raise OptionError(f"task mvbench: unknown subtasks {unknown or subtasks!r}: use some of {', '.join(MVBENCH_SUBTASKS)}")
        self.subtasks = list(subtasks)

    def load_rows(self, data_dir=None, config=None, split=None):
        rows: list[dict] = []
        missing = []
        for sub in self.subtasks:
            if data_dir is None:
                part = super().load_rows(None, config=sub, split=split)
            else:
                root = Path(data_dir).expanduser()
                if not root.is_dir():
                    raise DatasetUnavailableError(f"--data-dir {root} is not a directory")
                # The Hub layout (json/<subtask>.json); else a folder of shards per subtask. Never
                # load_dataset(root) itself: it would read every subtask's JSON as this one.
                found = sorted(root.rglob(f"{sub}.json"), key=lambda f: (f.parent.name != "json", str(f)))
                if found:
                    part = read_json_rows(found[0])
                elif (root / sub).is_dir():
                    part = super().load_rows(data_dir, config=sub, split=split)
                else:
                    missing.append(sub)
                    continue
            rows += [{**dict(r), "sub_task": sub, "index": i} for i, r in enumerate(part)]
        if missing:
            raise DatasetUnavailableError(f"--data-dir {data_dir} has no annotations for MVBench subtasks {', '.join(missing)} "
                                          f"(expected json/<subtask>.json): add them, or choose the task option subtasks")
        return rows

    def row_id(self, row, index):
        return f"{row['sub_task']}-{row['index']}"  # MVBench rows have no id; the position is stable per revision

    def video_candidates(self, row):
        folder = MVBENCH_FOLDERS[row["sub_task"]]
        return [f"{folder}/{row['video']}", f"data0613/{folder}/{row['video']}"]

    def make_sample(self, row, sample_id, image):
        candidates = [str(c) for c in row["candidates"]]
        letter = next((chr(ord("A") + i) for i, c in enumerate(candidates) if c == row["answer"]), "")
        return Sample(sample_id, image, row["question"], [letter], category=row["sub_task"],
                      extra={"candidates": candidates, "answer_text": str(row["answer"])})

    def prompt(self, sample):
        options = "".join(f"({string.ascii_uppercase[i]}) {c}\n" for i, c in enumerate(sample.extra["candidates"]))
        return "Question:" + sample.question + "\nOption:\n" + options + self.prompt_kwargs["post_prompt"]

    def score(self, prediction, sample):
        # An answer that is none of the candidates has no letter: nothing can match it (lmms-eval fails on it).
        correct = mvbench_mcq_acc(sample.answers[0], prediction) if sample.answers[0] else 0.0
        return {"accuracy": correct, "answered": float(prediction != "")}

    def aggregate(self, scores, samples):
        by_sub: dict[str, list[dict]] = defaultdict(list)
        for s, x in zip(scores, samples):
            by_sub[x.category].append(s)
        out: dict[str, float] = {}
        for sub in [t for t in MVBENCH_SUBTASKS if t in by_sub]:
            answered = [s for s in by_sub[sub] if s["answered"]]
            out[f"mvbench_{sub}"] = 100 * sum(s["accuracy"] for s in answered) / len(answered) if answered else 0.0
        answered = [s for s in scores if s["answered"]]
        out["overall"] = 100 * sum(s["accuracy"] for s in answered) / len(answered) if answered else 0.0
        out[self.headline] = _mean([v for k, v in out.items() if k.startswith("mvbench_")])
        return out


# ------------------------------------------------------------------------------------------------
@register_task("egoschema_subset")
class EgoSchemaSubset(VideoTask):
    """EgoSchema, the 500-question subset with public answers; accuracy (fraction) of the option.

    lmms-eval 0.7.3 ``tasks/egoschema/egoschema_subset.yaml`` + ``utils.py``: config ``Subset``,
    ``egoschema_doc_to_visual`` (``<cache>/videos/<video_idx>.mp4``, else ``.MP4``),
    ``egoschema_doc_to_text`` (question, then each option on its own line, then
    ``"\\nAnswer with the option's letter from the given choices directly."``),
    ``egoschema_process_results_generation`` (:func:`parse_mmmu_first`, letter -> index 0-4, -1
    for anything else) and ``egoschema_aggregate_score``: the fraction with ``str(index) ==
    str(answer)``. The full 5,031-question ``egoschema`` task is scored by EgoSchema's web server
    (answers not public), so it is not offered here.
    """

    dataset_path = "lmms-eval/egoschema"
    dataset_name = "Subset"
    split = "test"
    cache_dir = "egoschema"
    headline = "score"
    LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."
    PROMPTS = {
        "default": {"pre_prompt": "", "post_prompt": LETTER_PROMPT},
        "aria": {"pre_prompt": "Please answer the question about the video:\n", "post_prompt": LETTER_PROMPT},
    }

    def row_id(self, row, index):
        return str(row["question_idx"])

    def video_candidates(self, row):
        return [f"videos/{row['video_idx']}.{ext}" for ext in ("mp4", "MP4")]

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [str(row["answer"])],
                      extra={"options": [str(o) for o in row["option"]], "video_idx": row["video_idx"]})

    def prompt(self, sample):
        question = sample.question + "".join("\n" + op for op in sample.extra["options"])
        # egoschema_doc_to_text: rows with options always end with the letter instruction.
        return f"{self.prompt_kwargs['pre_prompt']}{question}{self.LETTER_PROMPT}"

    def score(self, prediction, sample):
        letters = _letters(5)  # get_multi_choice_info: always the five options A-E
        index2ans = {c: sample.extra["options"][i].strip() for i, c in enumerate(letters)}
        parsed = parse_mmmu_first(prediction, letters, index2ans, _rng(self, sample))
        index = {c: i for i, c in enumerate(letters)}.get(parsed, -1)
        return {"score": float(str(index) == sample.answers[0])}


# ------------------------------------------------------------------------------------------------
MLVU_DEV_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


@register_task("mlvu_dev")
class MLVUDev(VideoTask):
    """MLVU dev, multiple choice; mean over its 7 task types of each type's accuracy (percent).

    lmms-eval 0.7.3 ``tasks/mlvu/mlvu_dev.yaml`` + ``utils.py``: ``mlvu_doc_to_visual_dev``
    (``<cache>/<video_name>``), ``mlvu_doc_to_text`` (the question, which holds the options, then
    ``"\\nOnly give the best option.\\nBest option: ("``), ``mlvu_process_results``
    (:func:`extract_mcq_answer` over A-D against ``answer``) and ``mlvu_aggregate_results_dev``:
    ``100 * correct / answered`` per task type, averaged over all 7 types -- a type with no
    question in the run counts 0, as in lmms-eval (``accuracy``: the plain accuracy, for subsets).
    """

    dataset_path = "sy1998/MLVU_dev"
    split = "test"
    cache_dir = "mlvu"
    headline = "mlvu_percetion_score"  # sic, lmms-eval's metric name
    PROMPTS = {
        "default": {"pre_prompt": "", "post_prompt": "\nOnly give the best option.\nBest option: ("},
        "plm": {"pre_prompt": "", "post_prompt": "\nOnly give the best option."},
    }

    def row_id(self, row, index):
        qid = row.get("question_id")
        return str(qid) if qid not in (None, "") else f"{self.split}-{index}"

    def video_candidates(self, row):
        return [row["video_name"]]

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [row["answer"]], category=row["task_type"],
                      extra={"candidates": [str(c) for c in row.get("candidates") or []]})

    def prompt(self, sample):
        kw = self.prompt_kwargs
        return kw["pre_prompt"] + sample.question + kw["post_prompt"]

    def score(self, prediction, sample):
        return {"accuracy": float(extract_mcq_answer(prediction, "ABCD") == sample.answers[0])}

    def aggregate(self, scores, samples):
        by_type: dict[str, list[float]] = defaultdict(list)
        for s, x in zip(scores, samples):
            by_type[x.category].append(s["accuracy"])
        out = {f"type_{t}": 100 * _mean(by_type[t]) for t in MLVU_DEV_TYPES}
        out[self.headline] = sum(out.values()) / len(MLVU_DEV_TYPES)
        out["accuracy"] = 100 * _mean([s["accuracy"] for s in scores])
        return out


# ------------------------------------------------------------------------------------------------
@register_task("longvideobench_val_v")
class LongVideoBenchValV(VideoTask):
    """LongVideoBench validation, video input without subtitles; accuracy (fraction).

    lmms-eval 0.7.3 ``tasks/longvideobench/longvideobench_val_v.yaml`` + ``utils.py``:
    ``longvideobench_doc_to_visual_v`` (``<cache>/videos/<video_path>``, cache
    ``$HF_HOME/datasets/longvideobench``), ``longvideobench_doc_to_text`` (question, options
    ``"A. ..."`` skipping ``"N/A"``, post prompt ``"Answer with the option's letter from the given
    choices directly.\\n"``), ``longvideobench_process_results`` (:func:`parse_longvideobench`;
    reference ``chr(65 + correct_choice)``) and ``longvideobench_aggregate_results``: accuracy per
    duration group and per question category, overall = their size-weighted mean (= the plain
    accuracy), rounded to 5 decimals. A local copy holds ``lvb_val.json`` (or a
    ``validation-*.parquet``) and ``videos/``.
    """

    dataset_path = "longvideobench/LongVideoBench"
    split = "validation"
    cache_dir = "datasets/longvideobench"
    headline = "lvb_acc"
    max_new_tokens = 32
    PROMPTS = {"default": {"pre_prompt": "", "post_prompt": "Answer with the option's letter from the given choices directly.\n"}}
    local_json = {"validation": "lvb_val.json", "test": "lvb_test_wo_gt.json"}

    def row_id(self, row, index):
        return str(row["id"])

    def video_candidates(self, row):
        return [f"videos/{row['video_path']}"]

    def make_sample(self, row, sample_id, image):
        options = [row.get(f"option{i}") for i in range(5)]
        shown = [str(o) for o in options if o is not None and o != "N/A"]  # doc_to_text skips every N/A
        choices = []  # process_results stops at the first N/A
        for i, o in enumerate(options):
            if o is None or o == "N/A":
                break
            choices.append(chr(ord("A") + i))
        return Sample(sample_id, image, row["question"], [chr(ord("A") + int(row["correct_choice"]))],
                      category=str(row["duration_group"]),
                      extra={"options": shown, "choices": choices, "question_category": str(row["question_category"])})

    def prompt(self, sample):
        kw = self.prompt_kwargs
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(sample.extra["options"]))
        return f"{kw['pre_prompt']}{sample.question}\n{options}\n{kw['post_prompt']}"

    def score(self, prediction, sample):
        parsed = parse_longvideobench(prediction, sample.extra["choices"], _rng(self, sample))
        return {"accuracy": float(parsed == sample.answers[0])}

    def aggregate(self, scores, samples):
        groups: dict[str, list[float]] = defaultdict(list)
        for s, x in zip(scores, samples):
            groups[f"duration_{x.category}"].append(s["accuracy"])
            groups[f"category_{x.extra['question_category']}"].append(s["accuracy"])
        out = {k: round(_mean(v), 5) for k, v in groups.items()}
        total = sum(len(v) for v in groups.values())  # calculate_ins_level_acc: weighted by size
        out[self.headline] = round(sum(_mean(v) * len(v) for v in groups.values()) / total, 5) if total else 0.0
        return out


# ------------------------------------------------------------------------------------------------
@register_task("nextqa_mc_test")
class NExTQAMCTest(VideoTask):
    """NExT-QA multiple choice, test split; exact match of the parsed option letter (fraction).

    lmms-eval 0.7.3 ``tasks/nextqa/nextqa_mc_test.yaml`` + ``utils.py``: config ``MC``,
    ``nextqa_doc_to_visual`` (``video_loader.get_video``: ``<cache>/NExTVideo/<video>.mp4``, else
    ``.MP4``), ``nextqa_doc_to_text_mc`` (question, then ``"A. <a0>"`` ... ``"E. <a4>"``, no
    instruction: the task sets no prompt kwargs), ``nextqa_mc_process_results``
    (:func:`parse_mmmu_last` against ``OPTIONS[answer]``) and ``mean`` aggregation; per question
    type (``type_CW``, ``type_TN``...) alongside.
    """

    dataset_path = "lmms-eval/NExTQA"
    dataset_name = "MC"
    split = "test"
    cache_dir = "nextqa"
    headline = "exact_match"
    OPTIONS = ("A", "B", "C", "D", "E")

    def row_id(self, row, index):
        return f"{row['video']}-{row['qid']}"  # qid numbers the questions of one video

    def video_candidates(self, row):
        name = str(row["video"])
        return [f"NExTVideo/{name}" if name.endswith(f".{ext}") else f"NExTVideo/{name}.{ext}" for ext in ("mp4", "MP4")]

    def make_sample(self, row, sample_id, image):
        return Sample(sample_id, image, row["question"], [self.OPTIONS[int(row["answer"])]], category=str(row.get("type") or ""),
                      extra={"options": [str(row[f"a{i}"]).strip() for i in range(5)]})

    def prompt(self, sample):
        return "\n".join([sample.question.strip()] + [f"{c}. {a}" for c, a in zip(self.OPTIONS, sample.extra["options"])])

    def score(self, prediction, sample):
        index2ans = dict(zip(self.OPTIONS, sample.extra["options"]))
        parsed = parse_mmmu_last(prediction, self.OPTIONS, index2ans, _rng(self, sample))
        return {"exact_match": float(parsed == sample.answers[0])}

    def aggregate(self, scores, samples):
        out = super().aggregate(scores, samples)
        for kind in sorted({x.category for x in samples if x.category}):
            out[f"type_{kind}"] = _mean([s["exact_match"] for s, x in zip(scores, samples) if x.category == kind])
        return out
