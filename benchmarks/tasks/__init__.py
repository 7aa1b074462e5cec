"""Benchmark tasks: datasets, LLaVA-1.5 evaluation prompts and official metrics, one registry."""
from .base import (
    OPTION_LETTER,
    SHORT_ANSWER,
    TASKS,
    DatasetUnavailableError,
    Sample,
    Skipped,
    Task,
    TaskData,
    get_task,
    list_tasks,
    register_task,
)
from .video import VideoTask  # the video task base (its six lmms-eval tasks register on import)

__all__ = [
    "DatasetUnavailableError", "OPTION_LETTER", "SHORT_ANSWER", "Sample", "Skipped", "TASKS", "Task", "TaskData",
    "get_task", "list_tasks", "register_task",
]
