"""tokenprune as an lmms-eval model: every lmms-eval task, with any registered pruner.

    python -m lmms_eval --model tokenprune \
        --model_args pretrained=tokenprune-demo,method=fopru_rank,ratio=0.25 --tasks <task> ...

Model arguments (``--model_args k=v,...``):

* ``pretrained``: a hub id, a local path or a zoo name (``tokenprune-demo``, ``tiny-llava``, ...).
* ``method``: a pruner name or spec (``fastv``, ``fastv:k=3``); ``none`` (the default) runs the
  unpruned model. ``ratio``: the fraction of visual tokens kept. Every other unknown argument is a
  pruner option (``k=3``; a list in brackets: ``layers=[2,8,16]``), checked by the pruner.
* ``position_policy``: ``keep`` / ``compact`` (default: the pruner's own convention).
* ``chat_template``: ``false`` passes each context to the model as given, for a paper's exact
  prompt format written with the task's ``pre_prompt`` / ``post_prompt`` (e.g. LLaVA-1.5's
  ``USER: <image>\n`` ... `` ASSISTANT:``); the context must hold the image placeholder once
  (``<image>``, mapped to the family's own, see ``PrunableLVLM.image_placeholder``). Default ``true``.
* ``dtype`` (``float16``, ``bfloat16``, ...), ``device_map`` (``auto``, ...), ``revision``,
  ``attn_implementation``, ``trust_remote_code``: given to ``from_pretrained``.
* ``batch_size`` (here or ``--batch_size``; this one wins), ``device`` (or ``--device``; default
  ``cuda:<local rank>`` when CUDA is available, else ``cpu``), ``max_new_tokens`` (used when a
  task sets none; default 1024).
* ``sampler``, ``frames``, ``fps``: how a video file is sampled (:meth:`tokenprune.Video.from_file`);
  default: the rule of lmms-eval's own model class for the family (:data:`VIDEO_SAMPLERS`).
* ``frame_list``: what a list of several images is: ``auto`` (default, as lmms-eval's own
  classes) a multi-image question, unless the task's ``metadata`` says ``task_type: video`` and
  ``sample_frames: k`` (then one video of ``k`` of them, picked as lmms-eval's ``llava_onevision``);
  ``video`` / ``images``: always one video / always images.

Requests: ``generate_until`` answers with :meth:`~tokenprune.adapters.PrunableLVLM.generate`
(greedy only: sampling options are refused; the answer is cut at the first ``until`` string);
``loglikelihood`` (``multiple_choice`` tasks) scores continuations with
:meth:`~tokenprune.adapters.PrunableLVLM.loglikelihood` on the pruned prefill and returns
lmms-eval's ``(loss, is_greedy)`` pair, the loss being the summed negative log-likelihood
(lmms-eval picks the choice with the smallest value); ``generate_until_multi_round`` runs the
task's rounds one after another. The task's context text is the user prompt: the model's chat
template is applied once, by tokenprune (so ``--apply_chat_template`` is refused), with the
images at the context's ``<image>`` s (one per image) or first, a video at its ``<video>`` (else
its first ``<image>``) or first.

Visuals (``doc_to_visual`` 's list): one image; several images (a multi-image question, see
``frame_list``); or one video file path (any path that is not an image file, as lmms-eval's own
classes read them), decoded with PyAV and sampled by ``sampler``. A file that cannot be read (a
damaged or missing video or image) costs one logged error line; that question is answered with an
empty string (multiple choice: every choice scores ``inf``), as lmms-eval's ``llava_hf`` answers an
unreadable video, and the rest of the batch and the run go on.

Per request, the sample logs (``--log_samples``) hold ``token_counts``: ``input_tokens`` (tokens
entering the LLM), ``output_tokens`` (generated or scored tokens) and tokenprune's cost:
``visual_tokens_in`` / ``visual_tokens_kept`` / ``visual_tokens_avg``, ``text_tokens``,
``prefill_tokens`` (summed over layers) and ``tflops`` (with its ``tflops_vision`` /
``tflops_prefill`` / ``tflops_decode`` parts, :mod:`tokenprune.cost`), with ``video_frames`` (a
video's sampled frames) or ``images`` (a question's images); a skipped question has
``media_error`` instead. The results file's
``throughput`` section sums them over every request of every rank (lmms-eval prefixes each key
with ``avg_``: ``avg_tokenprune_total_tflops`` is the sum, ``avg_tokenprune_tflops_per_request``
the mean per request) and ``efficiency`` sums the input and output tokens per task.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import yaml
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from ...adapters.common import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ...errors import OptionError
from ...media import SAMPLERS, MediaError, Video, sample_indices

# from_pretrained keywords; every other unknown model argument is a pruner option
HF_OPTIONS = ("revision", "attn_implementation", "trust_remote_code", "cache_dir", "local_files_only", "max_memory",
              "offload_folder", "offload_buffers", "low_cpu_mem_usage")
# generation options that do not change greedy decoding, read as lmms-eval's own models read them
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp")
# A video file's default sampler per adapter family: the rule of lmms-eval 0.7.3's own model class
# for that family, so that both see the same frames (each sampler's default count is that class's).
VIDEO_SAMPLERS = {
    "llava_onevision": "llava_onevision",  # llava_onevision: decord, linspace(0, n - 1, 32, dtype=int)
    # HF LLaVA-NeXT-Video checkpoints run in lmms-eval's llava_hf, whose load_video is the same rule
    # with max_frames_num=32 (lmms-eval's llava_vid, for the original LLaVA-NeXT code, reads 1 fps up to
    # 20 frames instead: for videos longer than 20 s that is frames=20 here).
    "llava_next_video": "llava_onevision",
    "qwen2_vl": "qwen2_5_vl",  # qwen2_vl and qwen2_5_vl: qwen_vl_utils at 2 fps, then at most 32 (+ last)
    "qwen3_vl": "qwen3_vl",  # Qwen3-VL's processor rule (2 fps, 4..768 frames)
    "internvl": "internvl",  # internvl2 / internvl3: get_index, 32 segment centres
}
DEFAULT_SAMPLER = "uniform"  # families without video (the adapter then refuses the video in one line)
FRAME_LIST_MODES = ("auto", "video", "images")


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus tokenprune's visual tokens and FLOPs.

    ``input_tokens``: tokens entering the LLM's first layer; ``output_tokens``: generated (or, for
    log-likelihoods, scored) tokens; the rest as in ``tokenprune bench``'s ``samples.jsonl``.
    """

    visual_tokens_in: int | None = None
    visual_tokens_kept: int | None = None
    visual_tokens_avg: float | None = None
    text_tokens: int | None = None
    prefill_tokens: int | None = None
    tflops: float | None = None
    tflops_vision: float | None = None
    tflops_prefill: float | None = None
    tflops_decode: float | None = None
    video_frames: int | None = None
    images: int | None = None
    media_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        base = {f.name for f in fields(TokenCounts)}
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in base and getattr(self, f.name) is not None})
        return out


def decoding_options(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[int, list[str]]:
    """``(max_new_tokens, until)`` from a task's generation options; sampling ones are refused.

    Decoding is greedy when ``do_sample`` is false (or absent with ``temperature`` 0 / unset, as
    lmms-eval's models read it) and ``num_beams`` is 1; ``top_p`` / ``top_k`` / ``temperature``
    are then ignored, as Hugging Face ignores them. Other options are ignored.
    """
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise OptionError(f"generation option until={until!r} must be a string or a list of strings")
    do_sample = gen_kwargs.get("do_sample")
    temperature = gen_kwargs.get("temperature")
    beams = gen_kwargs.get("num_beams")
    penalty = gen_kwargs.get("repetition_penalty")
    bad = None
    if do_sample:
        bad = f"do_sample={do_sample!r}"
    elif do_sample is None and temperature not in (None, 0, 0.0):
        bad = f"temperature={temperature!r}"
    elif beams not in (None, 1):
        bad = f"num_beams={beams!r}"
    elif penalty not in (None, 1, 1.0):
        bad = f"repetition_penalty={penalty!r}"
    if bad is not None:
        raise OptionError(f"generation option {bad} is not supported: tokenprune decodes greedily "
                          "(use do_sample=false, temperature=0, num_beams=1)")
    max_new = gen_kwargs.get("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise OptionError(f"max_new_tokens must be a positive integer, got {max_new!r}")
    return max_new, list(until)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (stripped)."""
    end = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:end].strip()


def _option_value(value: Any) -> Any:
    """A pruner option from lmms-eval's ``k=v`` parsing: strings are read as YAML scalars / lists."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _flag(value: Any, name: str) -> bool:
    """A boolean model argument: a bool, or ``true`` / ``false`` (also 1/0, yes/no) as text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise OptionError(f"{name} must be true or false, got {value!r}")


def _video_options(sampler: str, frames: Any, fps: Any) -> tuple[str, int | None, float | None]:
    """``(sampler, frames, fps)`` from model arguments (text from ``--model_args``), checked now
    rather than at the first video: a known sampler, a positive frame count, a positive rate, and
    a combination the sampler takes."""
    sampler = str(sampler).strip()
    if sampler not in SAMPLERS:
        raise OptionError(f"sampler={sampler!r} is not a frame sampler; choose one of {', '.join(SAMPLERS)}")
    if frames not in (None, ""):
        try:
            frames = int(frames)
        except (TypeError, ValueError):
            frames = 0
        if frames < 1:
            raise OptionError("frames must be a positive number of frames per video (e.g. frames=32)")
    else:
        frames = None
    if fps not in (None, ""):
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            fps = 0.0
        if not fps > 0:
            raise OptionError("fps must be a positive sampling rate in frames per second (e.g. fps=2)")
    else:
        fps = None
    sample_indices(sampler, 64, 30.0, frames=frames, target_fps=fps)  # the sampler refuses what it does not take
    return sampler, frames, fps


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


class TokenPrune(lmms):
    """lmms-eval's *simple* model interface over a :class:`~tokenprune.adapters.PrunableLVLM` and a pruner.

    See the module docstring for the model arguments.
    """

    is_simple = True

    def __init__(self, pretrained: str = "tokenprune-demo", method: str | None = "none", ratio: float | None = None,
                 position_policy: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None, dtype: str | None = "auto", device_map: str | None = None,
                 max_new_tokens: int = 1024, chat_template: bool | str = True, sampler: str | None = None,
                 frames: int | str | None = None, fps: float | str | None = None, frame_list: str = "auto",
                 **options: Any) -> None:
        super().__init__()
        from ... import load
        from ...cost import sample_cost

        self._sample_cost = sample_cost
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise OptionError(f"batch_size must be a positive integer, got {batch_size!r} ('auto' is not supported)")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.position_policy = position_policy or None
        # not self.chat_template: lmms-eval reads that attribute as the model's template (None here)
        self.use_chat_template = _flag(chat_template, "chat_template")
        self.pretrained = str(pretrained)
        self.method = "none" if method in (None, "", "none") else str(method)
        hf = {k: options.pop(k) for k in list(options) if k in HF_OPTIONS}
        self.pruner = self._make_pruner(self.method, ratio, {k: _option_value(v) for k, v in options.items()})
        self.ratio = 1.0 if self.pruner is None else getattr(self.pruner, "ratio", ratio)

        self.frame_list = str(frame_list).strip().lower()
        if self.frame_list not in FRAME_LIST_MODES:
            raise OptionError(f"frame_list must be one of {', '.join(FRAME_LIST_MODES)}, got {frame_list!r}")
        if sampler:  # checked before the model loads; the family's default sampler after
            _video_options(sampler, frames, fps)

        self._rank, self._world_size = _init_distributed(device)
        if dtype not in (None, "auto"):
            value = getattr(torch, str(dtype), None)
            if not isinstance(value, torch.dtype):
                raise OptionError(f"dtype={dtype!r} is not a torch dtype (e.g. float32, float16, bfloat16, auto)")
            hf["dtype"] = value
        if device_map:
            hf["device_map"] = device_map
        self.lvlm = load(self.pretrained, **hf)
        if not device_map:
            self.lvlm.model.to(_pick_device(device))
        self._device = self.lvlm.device
        self._vision_spec = self.lvlm.vision_spec()
        self.sampler, self.frames, self.fps = _video_options(sampler or VIDEO_SAMPLERS.get(self.lvlm.family, DEFAULT_SAMPLER),
                                                            frames, fps)
        self._totals = dict.fromkeys(("requests", "visual_tokens_in", "visual_tokens_kept", "input_tokens",
                                      "output_tokens", "tflops", "seconds", "media_errors"), 0.0)

    @staticmethod
    def _make_pruner(method: str, ratio: float | None, options: dict[str, Any]):
        from ...pruner import pruner_from_spec

        if method == "none":
            if options:
                raise OptionError(f"method=none runs the unpruned model; options {', '.join(sorted(options))} "
                                  "need a method (e.g. method=fastv)")
            if ratio not in (None, 1, 1.0):
                raise OptionError(f"method=none runs the unpruned model; ratio={ratio} needs a method (e.g. method=fopru_rank)")
            return None
        if ratio is not None:
            options["ratio"] = float(ratio)
        return pruner_from_spec(method, **options)

    # -- lmms-eval's model interface ------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TokenPrune":
        """The model from ``--model_args``; lmms-eval's ``--batch_size`` / ``--device`` fill in only
        what ``--model_args`` leaves out (lmms-eval would pass both and fail on the duplicate)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the model's input-embedding device); lmms-eval puts its collectives' tensors here."""
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    chat_template = None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise OptionError("tokenprune applies the model's chat template itself (once, with the image); "
                          "run without --apply_chat_template")

    # -- requests --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy answers, batched per task and generation options in document order."""
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            items.append((i, task, split, doc_id, gen_kwargs, lambda d, f=doc_to_visual, c=context: (f(d), c),
                          req.metadata))
        return self._generate(requests, items, "generate_until")

    def _generate(self, requests, items, kind: str) -> list[GenerationResult]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for item in items:
            i, task, split, doc_id, gen_kwargs, _, _ = item
            groups.setdefault((task, split, repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0]))), []).append(item)
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokenprune {kind}") as bar:
            for (task, split, _), group in groups.items():
                max_new, until = decoding_options(group[0][4], self.max_new_tokens)
                group.sort(key=lambda it: it[3])
                for chunk in _chunks(group, self.batch_size):
                    visuals, prompts, ids, members = [], [], [], []
                    for item in chunk:
                        i, task, split, doc_id, _, inputs, metadata = item
                        try:  # a damaged / missing file (read here or by the task): this question only
                            raw, context = inputs(self.task_dict[task][split][doc_id])
                            visual = self.load_visual(raw, task, doc_id, metadata)
                        except MediaError as e:
                            results[i] = GenerationResult(text="", token_counts=self._skipped(e, task, doc_id))
                            continue
                        visuals.append(visual)
                        prompts.append(prompt_for(visual, context))
                        ids.append(f"{task}/{split}/{doc_id}")
                        members.append(i)
                    if members:
                        t0 = time.perf_counter()
                        out = self.lvlm.generate(visuals, prompts, pruner=self.pruner, max_new_tokens=max_new,
                                                 position_policy=self.position_policy, sample_ids=ids,
                                                 chat_template=self.use_chat_template)
                        share = (time.perf_counter() - t0) / len(members)
                        for j, i in enumerate(members):
                            results[i] = GenerationResult(text=cut_at_stop(out.texts[j], until),
                                                          token_counts=self._counts(out.stats[j], share, visuals[j]))
                    bar.update(len(chunk))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(summed negative log-likelihood, is_greedy)`` per request, on the pruned prefill.

        lmms-eval's multiple-choice scoring takes the choice with the *smallest* value, so the
        loss is returned, not the log-probability. The choices of one question share one vision
        pass and one prefill. The pair travels as a ``GenerationResult``'s ``text`` (lmms-eval 0.7.3
        turns a bare tuple into its string) with the request's token counts. A question whose
        visual cannot be read scores ``(inf, False)`` for every choice (one logged line).
        """
        items = []
        for i, req in enumerate(requests):
            if len(req.args) != 6:
                raise OptionError("tokenprune scores continuations of an image or video question only; this request "
                                  "has no visual (acc_mutual_info's unconditional requests are not supported)")
            context, target, doc_to_visual, doc_id, task, split = req.args
            items.append((i, task, split, doc_id, context, target, doc_to_visual, req.metadata))
        items.sort(key=lambda it: (str(it[1]), str(it[2]), it[3]))
        contexts: dict[tuple, list] = {}
        for item in items:
            contexts.setdefault((item[1], item[2], item[3], item[4]), []).append(item)
        results: list[Any] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="tokenprune loglikelihood") as bar:
            for chunk in _chunks(list(contexts.items()), self.batch_size):
                visuals, prompts, conts, ids, order = [], [], [], [], []
                for (task, split, doc_id, context), members in chunk:
                    doc = self.task_dict[task][split][doc_id]
                    try:  # one object for all choices: one shared vision pass and prefill
                        visual = self.load_visual(members[0][6](doc), task, doc_id, members[0][7])
                    except MediaError as e:
                        counts = self._skipped(e, task, doc_id)
                        for item in members:
                            results[item[0]] = GenerationResult(text=(float("inf"), False), token_counts=counts)
                        continue
                    for item in members:
                        target = item[5](doc) if callable(item[5]) else item[5]
                        visuals.append(visual)
                        prompts.append(prompt_for(visual, context))
                        conts.append(str(target))
                        ids.append(f"{task}/{split}/{doc_id}")
                        order.append(item[0])
                if order:
                    t0 = time.perf_counter()
                    out = self.lvlm.loglikelihood(visuals, prompts, conts, pruner=self.pruner,
                                                  position_policy=self.position_policy, sample_ids=ids,
                                                  chat_template=self.use_chat_template)
                    share = (time.perf_counter() - t0) / len(order)
                    for j, i in enumerate(order):
                        results[i] = GenerationResult(text=(-out.logprobs[j], out.greedy[j]),
                                                      token_counts=self._counts(out.stats[j], share, visuals[j]))
                bar.update(sum(len(members) for _, members in chunk))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's rounds in turn: round 0 from the context, later rounds from the task's
        ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` until it
        signals the end. Returns the list of round answers per request."""
        results: list[Any] = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tokenprune multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc)

            def next_round(r, answers, info):
                return doc_to_text(doc, previous_output=answers, round_idx=r, previous_round_info=info)

            results.append(self._rounds(task, split, doc_id, gen_kwargs, visuals, context, next_round, req.metadata))
        return results

    def _rounds(self, task, split, doc_id, gen_kwargs, visuals, prompt, next_round, metadata) -> GenerationResult:
        max_new, until = decoding_options(gen_kwargs, self.max_new_tokens)
        answers: list[str] = []
        counts = None
        info = None
        try:
            visual = self.load_visual(visuals, task, doc_id, metadata)
        except MediaError as e:
            return GenerationResult(text=[""], token_counts=self._skipped(e, task, doc_id))
        for r in range(1, 10_000):
            t0 = time.perf_counter()
            out = self.lvlm.generate([visual], [prompt_for(visual, prompt)], pruner=self.pruner, max_new_tokens=max_new,
                                     position_policy=self.position_policy, sample_ids=[f"{task}/{split}/{doc_id}/{r - 1}"],
                                     chat_template=self.use_chat_template)
            c = self._counts(out.stats[0], time.perf_counter() - t0, visual)
            counts = c if counts is None else _add_counts(counts, c)
            answers.append(cut_at_stop(out.texts[0], until))
            step = next_round(r, list(answers), info)
            if not isinstance(step, tuple) or len(step) not in (4, 5):
                raise OptionError(f"task {task}: round {r} of doc {doc_id} returned {type(step).__name__}, expected "
                                  "lmms-eval's multi-round tuple")
            if len(step) == 5:  # simple tasks: (visuals, text, terminal, previous_output, info)
                new_visuals, prompt_next, terminal, _, info = step
            else:  # chat tasks: (messages, terminal, previous_output, info)
                messages, terminal, _, info = step
                new_visuals, prompt_next = (None, None) if terminal else messages_to_prompt(messages, task, doc_id)
            if terminal:
                break
            if new_visuals:
                try:
                    visual = self.load_visual(new_visuals, task, doc_id, metadata)
                except MediaError as e:  # the rounds so far stand; the failed round answers empty
                    self._skipped(e, task, doc_id)
                    answers.append("")
                    break
            prompt = prompt_next
        return GenerationResult(text=answers, token_counts=counts)

    # -- visuals ---------------------------------------------------------------------------------
    def load_visual(self, visuals: Any, task: str, doc_id: Any, metadata: dict | None = None) -> Any:
        """One question's visual for :meth:`~tokenprune.adapters.PrunableLVLM.generate`, from
        ``doc_to_visual`` 's list (nested lists are flattened, ``None`` dropped):

        * one video file path (any path that is not an image file, as lmms-eval's own classes
          read them) -> a :class:`~tokenprune.Video` sampled with this model's ``sampler`` /
          ``frames`` / ``fps``; a :class:`~tokenprune.Video` is taken as it is;
        * one image (PIL or an image path) -> that RGB image;
        * several images -> a list of RGB images (a multi-image question), or one video of them
          (``Video.from_frames``, 1 fps) when ``frame_list`` says so: ``video``, or ``auto`` with the
          task's ``metadata`` ``task_type: video`` and ``sample_frames: k`` (lmms-eval's
          ``llava_onevision`` condition); ``k`` frames are then picked by its rule
          (``linspace(0, n - 1, k, dtype=int)``; with ``frame_list=video`` and no ``k``, all).

        Raises:
            MediaError: a file that cannot be read (the caller answers that question empty).
            OptionError: no visual, several videos, a video with images, or an unsupported object.
        """
        flat = _flatten(visuals)
        where = f"task {task}, doc {doc_id}"
        if not flat:
            raise OptionError(f"{where}: tokenprune answers about images or a video; this question has none "
                              "(text-only questions are not supported)")
        videos = [v for v in flat if isinstance(v, Video) or (_is_path(v) and not _is_image_path(v))]
        if videos:
            if len(flat) != 1:
                raise OptionError(f"{where}: tokenprune takes one video per question (and no images with it), got "
                                  f"{len(videos)} video(s) and {len(flat) - len(videos)} image(s)")
            if isinstance(videos[0], Video):
                return videos[0]
            return Video.from_file(videos[0], sampler=self.sampler, frames=self.frames, fps=self.fps)
        images = []
        for v in flat:
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB"))
            elif _is_path(v):
                images.append(_open_image(os.fspath(v)))
            else:
                raise OptionError(f"{where}: tokenprune takes PIL images, image paths or one video path, not "
                                  f"{type(v).__name__}")
        if len(images) == 1:
            return images[0]
        metadata = metadata or {}
        k = metadata.get("sample_frames")
        # lmms-eval's llava_onevision reads a list as a video only when the task says both
        if self.frame_list == "video" or (self.frame_list == "auto" and metadata.get("task_type") == "video" and k):
            video = Video.from_frames(images)
            return video.sample("llava_onevision", frames=int(k)) if k else video
        return images

    def _skipped(self, error: Exception, task: str, doc_id: Any) -> PrunedTokenCounts:
        """One logged line for a question whose visual cannot be read; its counts name the cause."""
        eval_logger.error(f"tokenprune: task {task}, doc {doc_id} answered empty: {error}")
        self._totals["media_errors"] += 1
        return PrunedTokenCounts(output_tokens=0, media_error=str(error))

    # -- accounting ------------------------------------------------------------------------------
    def _counts(self, st, seconds: float, visual: Any = None) -> PrunedTokenCounts:
        """One request's :class:`PrunedTokenCounts` (for ``visual``: a video's sampled frames or the
        number of images), added to the run's totals."""
        cost = self._sample_cost(self.lvlm.model.config, self._vision_spec, st)
        counts = PrunedTokenCounts(
            input_tokens=int(st.tokens_per_layer[0]) if st.tokens_per_layer else None, output_tokens=int(st.new_tokens),
            visual_tokens_in=int(st.visual_tokens_in), visual_tokens_kept=int(st.visual_tokens_kept),
            visual_tokens_avg=float(st.visual_tokens_avg), text_tokens=int(st.text_tokens),
            prefill_tokens=int(sum(st.tokens_per_layer)), tflops=cost.total / 1e12, tflops_vision=cost.vision / 1e12,
            tflops_prefill=cost.prefill / 1e12, tflops_decode=(cost.decode + cost.lm_head) / 1e12,
            video_frames=visual.num_frames if isinstance(visual, Video) else None,
            images=len(visual) if isinstance(visual, list) else 1 if isinstance(visual, Image.Image) else None)
        t = self._totals
        t["requests"] += 1
        t["visual_tokens_in"] += counts.visual_tokens_in
        t["visual_tokens_kept"] += counts.visual_tokens_kept
        t["input_tokens"] += counts.input_tokens or 0
        t["output_tokens"] += counts.output_tokens
        t["tflops"] += counts.tflops
        t["seconds"] += seconds
        return counts

    def clean(self) -> None:
        """After the last request (every rank calls it): the cost summed over all ranks goes to
        lmms-eval's throughput summary (rank 0's), then lmms-eval's own clean-up."""
        keys = list(self._totals)
        totals = torch.tensor([self._totals[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        t = dict(zip(keys, totals.tolist()))
        self._totals = dict.fromkeys(keys, 0.0)
        if self.rank == 0 and (t["requests"] > 0 or t["media_errors"] > 0):
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            n = max(t["requests"], 1)
            log_metrics(
                total_elapsed_time=t["seconds"], total_gen_tokens=int(t["output_tokens"]),
                avg_speed=t["output_tokens"] / t["seconds"] if t["seconds"] > 0 else 0.0,
                additional_metrics={
                    "tokenprune_requests": int(t["requests"]),
                    "tokenprune_total_visual_tokens_in": int(t["visual_tokens_in"]),
                    "tokenprune_total_visual_tokens_kept": int(t["visual_tokens_kept"]),
                    "tokenprune_total_input_tokens": int(t["input_tokens"]),
                    "tokenprune_total_tflops": t["tflops"],
                    "tokenprune_visual_tokens_kept_per_request": t["visual_tokens_kept"] / n,
                    "tokenprune_tflops_per_request": t["tflops"] / n,
                    "tokenprune_media_errors": int(t["media_errors"]),
                })
        super().clean()


class TokenPruneChat(TokenPrune):
    """lmms-eval's *chat* interface: the task's ``doc_to_messages`` (one user turn: images or one
    video, and text) becomes the same prompt the simple interface builds (visuals where the
    messages put them)."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        items = []
        for i, req in enumerate(requests):
            context, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            items.append((i, task, split, doc_id, gen_kwargs,
                          lambda d, f=doc_to_messages, t=task, di=doc_id: messages_to_prompt(f(d), t, di), req.metadata))
        return self._generate(requests, items, "generate_until")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[Any] = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tokenprune multi-round"):
            context, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals, prompt = messages_to_prompt(doc_to_messages(doc), task, doc_id)

            def next_round(r, answers, info, f=doc_to_messages, d=doc):
                return f(d, round_idx=r, previous_output=answers, previous_round_info=info)

            results.append(self._rounds(task, split, doc_id, gen_kwargs, visuals, prompt, next_round, req.metadata))
        return results


# -- helpers -------------------------------------------------------------------------------------
def _flatten(visuals: Any) -> list:
    """``doc_to_visual`` 's answer as a flat list (lists of lists flattened, ``None`` dropped)."""
    flat: list = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    return [v for v in flat if v is not None]


def _is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike))


def _is_image_path(v: Any) -> bool:
    return os.fspath(v).lower().endswith(IMAGE_EXTENSIONS)


def _open_image(path: str) -> Image.Image:
    """An image file as RGB (decoded now, so a damaged file fails here, as a :class:`MediaError`)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise MediaError(f"cannot read image {path!r} ({reason}): check that the file exists and opens") from None


def prompt_for(visual: Any, context: str) -> str:
    """The context as the prompt for ``visual``. A video goes where the context writes ``<video>``,
    else where it writes its first ``<image>`` (video tasks written for image-token models); any
    further ``<image>`` marks frames that are now inside the one video, so they are dropped."""
    if not isinstance(visual, Video) or VIDEO_PLACEHOLDER in context or IMAGE_PLACEHOLDER not in context:
        return context
    head, _, tail = context.partition(IMAGE_PLACEHOLDER)
    if IMAGE_PLACEHOLDER in tail:  # lines that held only a frame mark go; inline marks are removed
        tail = "\n".join(line.replace(IMAGE_PLACEHOLDER, "") for line in tail.split("\n")
                         if line.strip() != IMAGE_PLACEHOLDER)
    return head + VIDEO_PLACEHOLDER + tail


def messages_to_prompt(messages: Any, task: str, doc_id: Any) -> tuple[list, str]:
    """``(visuals, prompt)`` from lmms-eval chat messages: one user turn; the prompt holds the text
    parts (joined by newlines) with ``<image>`` where an image is and ``<video>`` where the video
    is. When the text already writes one ``<image>`` per image (e.g. frames interleaved with
    subtitles), the images go there and the image parts add none."""
    if hasattr(messages, "model_dump"):
        messages = messages.model_dump()["messages"]
    turns = [m if isinstance(m, dict) else m.model_dump() for m in messages]
    if [t["role"] for t in turns] != ["user"]:
        raise OptionError(f"task {task}, doc {doc_id}: tokenprune's chat model takes one user turn, got roles "
                          f"{[t['role'] for t in turns]}")
    content = turns[0]["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    visuals, parts = [], []
    for c in content:
        if c["type"] == "text":
            parts.append(c["text"])
        elif c["type"] in ("image", "video"):
            url = c.get("url", c.get(c["type"]))
            if isinstance(url, dict):  # lmms-eval's clip references carry video_start / video_end
                raise OptionError(f"task {task}, doc {doc_id}: tokenprune reads whole video files; this question gives "
                                  f"a clip ({', '.join(sorted(k for k in url if k.startswith('video_')))})")
            visuals.append(url)
            parts.append(IMAGE_PLACEHOLDER if c["type"] == "image" else VIDEO_PLACEHOLDER)
        else:
            raise OptionError(f"task {task}, doc {doc_id}: tokenprune answers about images and videos; got a "
                              f"{c['type']} input")
    n_images = sum(c["type"] == "image" for c in content)
    texts = [c["text"] for c in content if c["type"] == "text"]
    if n_images and sum(t.count(IMAGE_PLACEHOLDER) for t in texts) == n_images:
        parts = [p for p in parts if p != IMAGE_PLACEHOLDER]
    return visuals, "\n".join(parts)


def _add_counts(a: PrunedTokenCounts, b: PrunedTokenCounts) -> PrunedTokenCounts:
    """Counts of two rounds of one request, summed."""
    return PrunedTokenCounts(**{f.name: (None if getattr(a, f.name) is None else getattr(a, f.name) + (getattr(b, f.name) or 0))
                                for f in fields(a)})


def _pick_device(device: str | None) -> torch.device:
    """``device`` (``cuda`` means this rank's GPU), or ``cuda:<local rank>`` when CUDA is available, else CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local}")
    return torch.device(device)


def _init_distributed(device: str | None) -> tuple[int, int]:
    """``(rank, world size)``; under torchrun / accelerate (``WORLD_SIZE`` > 1) a process group is
    started if lmms-eval has not (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if _pick_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
