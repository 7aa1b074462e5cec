"""The Task interface: load samples, build prompts, score answers with the official metric.

A task loads its dataset with ``datasets.load_dataset`` from the Hub id lmms-eval uses
(configurable id and revision), or from a local copy (``data_dir``). Visuals (images, or videos for
the tasks in :mod:`.video`) are decoded one by one as samples are read, so a broken or missing file
skips that sample -- counted and reported in :attr:`TaskData.skipped` -- instead of failing the run.
"""
from __future__ import annotations

import io
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Container, Iterator, Sequence, Union

from PIL import Image

from ...errors import OptionError, TokenpruneError
from ...registry import Registry

if TYPE_CHECKING:
    from ...media import Video

# What a sample hands the model: one image, several (a multi-image prompt or a video's frames as
# images), or a video. ``None`` only for samples rebuilt from results files (no pixels needed).
Visual = Union[Image.Image, "list[Image.Image]", "Video", None]

# LLaVA-1.5 evaluation prompt suffixes (as lmms-eval's default prompts).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class DatasetUnavailableError(TokenpruneError):
    """A dataset that is neither reachable nor cached nor given locally."""


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: stable id (the dataset's question id); seeds random pruners, keys results.
        image: the visual, decoded: an RGB PIL image, a list of them (a multi-image prompt, or a
            video's sampled frames as images), or a :class:`tokenprune.Video` (video tasks). The
            name stays ``image`` because every entry point reads it as "the sample's visual".
        question: the raw question (the prompt is built by :meth:`Task.prompt`).
        answers: reference answer(s): one for most tasks, ten human answers for VQA tasks.
        category: subtask / split / category used by the aggregate metric.
        extra: task-specific fields (options, pair ids, ...).
    """

    id: str
    image: Visual
    question: str
    answers: list[str]
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A row that could not be used: its id and why."""

    id: str
    reason: str


class TaskData:
    """The samples of a task, decoded lazily; rows with unusable images or videos are skipped and
    recorded.

    Iterate it to get :class:`Sample` s; ``skipped`` fills up as rows are read.
    """

    def __init__(self, task: "Task", rows: Any, indices: Sequence[int]):
        self.task = task
        self.rows = rows
        self.indices = list(indices)
        self.skipped: list[Skipped] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def ids(self) -> list[str]:
        """The sample ids, in order, without decoding any image."""
        return [self.task.row_id(self.rows[i], i) for i in self.indices]

    def samples(self, exclude: Container[str] = (), only: Container[str] | None = None) -> Iterator[Sample]:
        """The samples, decoded one at a time; ids in ``exclude`` (or, with ``only``, not in it) are
        passed over undecoded.

        ``skipped`` is reset and refilled by each pass (rows passed over are not decoded, so a
        broken image or video among them is not counted again).
        """
        self.skipped = []
        for i in self.indices:
            row = self.rows[i]
            sid = self.task.row_id(row, i)
            if sid in exclude or (only is not None and sid not in only):
                continue
            try:
                visual = self.task.load_visual(row)
            except Exception as exc:  # noqa: BLE001 -- any decoding failure skips the row
                self.skipped.append(Skipped(sid, f"{type(exc).__name__}: {exc}"))
                continue
            yield self.task.make_sample(row, sid, visual)

    def report(self) -> str:
        """One line: how many rows were used and skipped."""
        used = len(self.indices) - len(self.skipped)
        line = f"{self.task.name}: {used} samples used, {len(self.skipped)} skipped"
        if self.skipped:
            line += f" (first: {self.skipped[0].id}: {self.skipped[0].reason})"
        return line


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from a ``datasets`` image cell (``{'bytes', 'path'}``), a PIL image or a path."""
    if value is None:
        raise ValueError("no image")
    if isinstance(value, list):  # SEED-Bench stores a list of frames; image questions have one
        if not value:
            raise ValueError("no image")
        value = value[0]
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("empty image cell")
    else:
        image = Image.open(value)
    image.load()  # decode now: a truncated file fails here, not inside the model
    return image.convert("RGB")


class Task(ABC):
    """Base class of benchmark tasks. Subclasses set the dataset location and implement the
    row accessors, the prompt and the metric.

    Class attributes:
        name: registry name (``pope``, ``mme``, ...).
        dataset_path / dataset_name / split: what ``load_dataset`` loads by default.
        image_column: the column holding the image(s).
        headline: the key of :meth:`aggregate` 's output that summarises the task.
        max_new_tokens: answer budget used by the runner.
    """

    name: ClassVar[str] = "unregistered"
    dataset_path: ClassVar[str]
    dataset_name: ClassVar[str | None] = None
    split: ClassVar[str] = "test"
    image_column: ClassVar[str] = "image"
    headline: ClassVar[str]
    max_new_tokens: ClassVar[int] = 16
    until: ClassVar[tuple[str, ...]] = ()  # stop strings: the answer is cut at the first (see :meth:`cut`)

    def __init__(self, dataset_path: str | None = None, revision: str | None = None):
        if dataset_path is not None:
            self.dataset_path = dataset_path
        self.revision = revision

    # -- loading --------------------------------------------------------------------------------
    def load_rows(self, data_dir: str | Path | None = None, config: str | None = None, split: str | None = None):
        """The raw ``datasets.Dataset`` of ``config`` / ``split``, images left undecoded."""
        import datasets

        config = config if config is not None else self.dataset_name
        split = split or self.split
        source = self.dataset_path
        kwargs: dict[str, Any] = {"split": split}
        if data_dir is not None:
            root = Path(data_dir).expanduser()  # "~/data/x" from a YAML config: no shell expanded it
            if not root.is_dir():
                raise DatasetUnavailableError(f"--data-dir {root} is not a directory")
            # A local copy of the Hub repository keeps each config in a folder of its name.
            folder = root / config if config and (root / config).is_dir() else root
            source = str(folder)
            # Shards are named "<split>-00000-of-00001.parquet"; load_dataset only infers the usual
            # split names from file names, so name the files of this split explicitly.
            files = sorted(str(f) for f in folder.rglob(f"{split}[-_.]*") if f.suffix in LOCAL_FORMATS)
            if files:
                source = LOCAL_FORMATS[Path(files[0]).suffix]
                kwargs["data_files"] = {split: files}
        else:
            kwargs.update(name=config, revision=self.revision)
        try:
            ds = datasets.load_dataset(source, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- offline, missing, gated: all end the same way
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"{source}" + (f" ({config})" if config and data_dir is None else "")
            raise DatasetUnavailableError(
                f"cannot load dataset {where}, split {split!r}: {cause[:200]}. Without hub access, copy the "
                f"dataset to this machine and pass --data-dir DIR (a folder load_dataset reads, e.g. a clone "
                f"of https://huggingface.co/datasets/{self.dataset_path})"
            ) from None
        for column in self.undecoded_columns(ds):
            ds = ds.cast_column(column, _undecoded(ds.features[column]))
        return ds

    @staticmethod
    def undecoded_columns(ds) -> list[str]:
        """Image columns, which we decode ourselves so that one broken file skips one sample."""
        import datasets

        out = []
        for name, feat in ds.features.items():
            inner = feat.feature if isinstance(feat, (datasets.Sequence, datasets.List)) else feat
            if isinstance(inner, datasets.Image):
                out.append(name)
        return out

    def filter_rows(self, rows) -> list[int]:
        """Indices of the rows this task evaluates (default: all)."""
        return list(range(len(rows)))

    def load(self, data_dir: str | Path | None = None, limit: int | None = None, seed: int | None = None) -> TaskData:
        """The task's samples: all, or ``limit`` of them (the first ones, or a ``seed`` ed sample)."""
        if limit is not None and limit < 1:
            raise OptionError(f"limit must be >= 1, got {limit}")
        rows = self.prepare_rows(self.load_rows(data_dir), data_dir)
        indices = self.filter_rows(rows)
        if seed is not None:
            indices = sorted(random.Random(seed).sample(indices, min(limit or len(indices), len(indices))))
        elif limit is not None:
            indices = indices[:limit]
        return TaskData(self, rows, indices)

    def prepare_rows(self, rows, data_dir):
        """Hook for tasks whose images live in another config (GQA)."""
        return rows

    # -- per row --------------------------------------------------------------------------------
    def row_image(self, row: dict) -> Any:
        """The row's undecoded visual (an image cell, a path, ...), as :meth:`load_visual` reads it."""
        return row[self.image_column]

    def load_visual(self, row: dict) -> Visual:
        """The row's decoded visual, which becomes :attr:`Sample.image` (default: the RGB image of
        :meth:`row_image`). Any exception skips the row, recorded in :attr:`TaskData.skipped`;
        video tasks override this to decode the sampled frames of a video file."""
        return decode_image(self.row_image(row))

    @abstractmethod
    def row_id(self, row: dict, index: int) -> str:
        """The row's stable id (``index``: its position in the split, for datasets without ids)."""

    @abstractmethod
    def make_sample(self, row: dict, sample_id: str, image: Visual) -> Sample:
        """A :class:`Sample` from a raw row and its decoded visual (:meth:`load_visual`)."""

    # -- prompt and metric ----------------------------------------------------------------------
    @abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The user prompt (without chat template or image placeholder: the adapter adds those)."""

    def cut(self, prediction: str) -> str:
        """``prediction`` up to the first of :attr:`until` (as an evaluator's ``until`` stops generation)."""
        for stop in self.until:
            prediction = prediction.split(stop, 1)[0]
        return prediction

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> dict[str, float]:
        """Per-sample scores; every key is a float in [0, 1] that :meth:`aggregate` reads."""

    def aggregate(self, scores: Sequence[dict[str, float]], samples: Sequence[Sample]) -> dict[str, float]:
        """Task metrics from per-sample scores (default: the mean of each key)."""
        keys = scores[0].keys() if scores else []
        return {k: sum(s[k] for s in scores) / len(scores) for k in keys}


def _undecoded(feature):
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(datasets.Image(decode=False))
    return datasets.Sequence(datasets.Image(decode=False))


TASKS: Registry[type[Task]] = Registry("task", "tokenprune.tasks", builtin_modules=(
    "tokenprune.benchmarks.tasks.builtin", "tokenprune.benchmarks.tasks.shapes_scene", "tokenprune.benchmarks.tasks.video",
    "tokenprune.benchmarks.tasks.shapes_video"))


def register_task(name: str):
    """Class decorator registering a :class:`Task` subclass under ``name``."""

    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        return TASKS.register(name)(cls)

    return decorator


def get_task(name: str, **options: Any) -> Task:
    """An instance of the task registered as ``name`` (unknown names list the known tasks)."""
    return TASKS.get(name)(**options)


def list_tasks() -> list[str]:
    """Names of every available task."""
    return TASKS.names()
