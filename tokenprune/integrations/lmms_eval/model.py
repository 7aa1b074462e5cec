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

Requests: ``generate_until`` answers with :meth:`~tokenprune.adapters.PrunableLVLM.generate`
(greedy only: sampling options are refused; the answer is cut at the first ``until`` string);
``loglikelihood`` (``multiple_choice`` tasks) scores continuations with
:meth:`~tokenprune.adapters.PrunableLVLM.loglikelihood` on the pruned prefill and returns
lmms-eval's ``(loss, is_greedy)`` pair, the loss being the summed negative log-likelihood
(lmms-eval picks the choice with the smallest value); ``generate_until_multi_round`` runs the
task's rounds one after another. The task's context text is the user prompt: the model's chat
template is applied once, by tokenprune (so ``--apply_chat_template`` is refused), with the image
at the context's ``<image>`` or first. One image per question.

Per request, the sample logs (``--log_samples``) hold ``token_counts``: ``input_tokens`` (tokens
entering the LLM), ``output_tokens`` (generated or scored tokens) and tokenprune's cost:
``visual_tokens_in`` / ``visual_tokens_kept`` / ``visual_tokens_avg``, ``text_tokens``,
``prefill_tokens`` (summed over layers) and ``tflops`` (with its ``tflops_vision`` /
``tflops_prefill`` / ``tflops_decode`` parts, :mod:`tokenprune.cost`). The results file's
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
from PIL import Image
from tqdm import tqdm

from ...errors import OptionError
from ...adapters.common import IMAGE_PLACEHOLDER

# from_pretrained keywords; every other unknown model argument is a pruner option
HF_OPTIONS = ("revision", "attn_implementation", "trust_remote_code", "cache_dir", "local_files_only", "max_memory",
              "offload_folder", "offload_buffers", "low_cpu_mem_usage")
# generation options that do not change greedy decoding, read as lmms-eval's own models read them
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp")


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
                 max_new_tokens: int = 1024, chat_template: bool | str = True, **options: Any) -> None:
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
        self._totals = dict.fromkeys(("requests", "visual_tokens_in", "visual_tokens_kept", "input_tokens",
                                      "output_tokens", "tflops", "seconds"), 0.0)

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
            items.append((i, task, split, doc_id, gen_kwargs, lambda d, f=doc_to_visual, c=context: (f(d), c)))
        return self._generate(requests, items, "generate_until")

    def _generate(self, requests, items, kind: str) -> list[GenerationResult]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for item in items:
            i, task, split, doc_id, gen_kwargs, _ = item
            groups.setdefault((task, split, repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0]))), []).append(item)
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokenprune {kind}") as bar:
            for (task, split, _), group in groups.items():
                max_new, until = decoding_options(group[0][4], self.max_new_tokens)
                group.sort(key=lambda it: it[3])
                for chunk in _chunks(group, self.batch_size):
                    images, prompts, ids = [], [], []
                    for _, task, split, doc_id, _, inputs in chunk:
                        visuals, context = inputs(self.task_dict[task][split][doc_id])
                        images.append(one_image(visuals, task, doc_id))
                        prompts.append(context)
                        ids.append(f"{task}/{split}/{doc_id}")
                    t0 = time.perf_counter()
                    out = self.lvlm.generate(images, prompts, pruner=self.pruner, max_new_tokens=max_new,
                                             position_policy=self.position_policy, sample_ids=ids,
                                             chat_template=self.use_chat_template)
                    share = (time.perf_counter() - t0) / len(chunk)
                    for j, item in enumerate(chunk):
                        results[item[0]] = GenerationResult(text=cut_at_stop(out.texts[j], until),
                                                            token_counts=self._counts(out.stats[j], share))
                    bar.update(len(chunk))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(summed negative log-likelihood, is_greedy)`` per request, on the pruned prefill.

        lmms-eval's multiple-choice scoring takes the choice with the *smallest* value, so the
        loss is returned, not the log-probability. The choices of one question share one vision
        pass and one prefill. The pair travels as a ``GenerationResult``'s ``text`` (lmms-eval 0.7.3
        turns a bare tuple into its string) with the request's token counts.
        """
        items = []
        for i, req in enumerate(requests):
            if len(req.args) != 6:
                raise OptionError("tokenprune scores continuations of an image question only; this request has no "
                                  "image (acc_mutual_info's unconditional requests are not supported)")
            context, target, doc_to_visual, doc_id, task, split = req.args
            items.append((i, task, split, doc_id, context, target, doc_to_visual))
        items.sort(key=lambda it: (str(it[1]), str(it[2]), it[3]))
        contexts: dict[tuple, list] = {}
        for item in items:
            contexts.setdefault((item[1], item[2], item[3], item[4]), []).append(item)
        results: list[Any] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="tokenprune loglikelihood") as bar:
            for chunk in _chunks(list(contexts.items()), self.batch_size):
                images, prompts, conts, ids, order = [], [], [], [], []
                for (task, split, doc_id, context), members in chunk:
                    doc = self.task_dict[task][split][doc_id]
                    image = one_image(members[0][6](doc), task, doc_id)  # one object: one shared prefill
                    for item in members:
                        target = item[5](doc) if callable(item[5]) else item[5]
                        images.append(image)
                        prompts.append(context)
                        conts.append(str(target))
                        ids.append(f"{task}/{split}/{doc_id}")
                        order.append(item[0])
                t0 = time.perf_counter()
                out = self.lvlm.loglikelihood(images, prompts, conts, pruner=self.pruner,
                                              position_policy=self.position_policy, sample_ids=ids,
                                              chat_template=self.use_chat_template)
                share = (time.perf_counter() - t0) / len(order)
                for j, i in enumerate(order):
                    results[i] = GenerationResult(text=(-out.logprobs[j], out.greedy[j]),
                                                  token_counts=self._counts(out.stats[j], share))
                bar.update(len(order))
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

            results.append(self._rounds(doc, task, split, doc_id, gen_kwargs, visuals, context, next_round))
        return results

    def _rounds(self, doc, task, split, doc_id, gen_kwargs, visuals, prompt, next_round) -> GenerationResult:
        max_new, until = decoding_options(gen_kwargs, self.max_new_tokens)
        answers: list[str] = []
        counts = None
        info = None
        image = one_image(visuals, task, doc_id)
        for r in range(1, 10_000):
            t0 = time.perf_counter()
            out = self.lvlm.generate([image], [prompt], pruner=self.pruner, max_new_tokens=max_new,
                                     position_policy=self.position_policy, sample_ids=[f"{task}/{split}/{doc_id}/{r - 1}"],
                                     chat_template=self.use_chat_template)
            c = self._counts(out.stats[0], time.perf_counter() - t0)
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
                image = one_image(new_visuals, task, doc_id)
            prompt = prompt_next
        return GenerationResult(text=answers, token_counts=counts)

    # -- accounting ------------------------------------------------------------------------------
    def _counts(self, st, seconds: float) -> PrunedTokenCounts:
        """One request's :class:`PrunedTokenCounts`, added to the run's totals."""
        cost = self._sample_cost(self.lvlm.model.config, self._vision_spec, st)
        counts = PrunedTokenCounts(
            input_tokens=int(st.tokens_per_layer[0]) if st.tokens_per_layer else None, output_tokens=int(st.new_tokens),
            visual_tokens_in=int(st.visual_tokens_in), visual_tokens_kept=int(st.visual_tokens_kept),
            visual_tokens_avg=float(st.visual_tokens_avg), text_tokens=int(st.text_tokens),
            prefill_tokens=int(sum(st.tokens_per_layer)), tflops=cost.total / 1e12, tflops_vision=cost.vision / 1e12,
            tflops_prefill=cost.prefill / 1e12, tflops_decode=(cost.decode + cost.lm_head) / 1e12)
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
        if self.rank == 0 and t["requests"] > 0:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            n = t["requests"]
            log_metrics(
                total_elapsed_time=t["seconds"], total_gen_tokens=int(t["output_tokens"]),
                avg_speed=t["output_tokens"] / t["seconds"] if t["seconds"] > 0 else 0.0,
                additional_metrics={
                    "tokenprune_requests": int(n),
                    "tokenprune_total_visual_tokens_in": int(t["visual_tokens_in"]),
                    "tokenprune_total_visual_tokens_kept": int(t["visual_tokens_kept"]),
                    "tokenprune_total_input_tokens": int(t["input_tokens"]),
                    "tokenprune_total_tflops": t["tflops"],
                    "tokenprune_visual_tokens_kept_per_request": t["visual_tokens_kept"] / n,
                    "tokenprune_tflops_per_request": t["tflops"] / n,
                })
        super().clean()


class TokenPruneChat(TokenPrune):
    """lmms-eval's *chat* interface: the task's ``doc_to_messages`` (one user turn, one image) becomes
    the same prompt the simple interface builds (image where the messages put it)."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        items = []
        for i, req in enumerate(requests):
            context, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            items.append((i, task, split, doc_id, gen_kwargs,
                          lambda d, f=doc_to_messages, t=task, di=doc_id: messages_to_prompt(f(d), t, di)))
        return self._generate(requests, items, "generate_until")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[Any] = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tokenprune multi-round"):
            context, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals, prompt = messages_to_prompt(doc_to_messages(doc), task, doc_id)

            def next_round(r, answers, info, f=doc_to_messages, d=doc):
                return f(d, round_idx=r, previous_output=answers, previous_round_info=info)

            results.append(self._rounds(doc, task, split, doc_id, gen_kwargs, visuals, prompt, next_round))
        return results


# -- helpers -------------------------------------------------------------------------------------
def one_image(visuals: Any, task: str, doc_id: Any) -> Image.Image:
    """The one RGB image of a question (``doc_to_visual`` 's list; image paths are opened)."""
    flat = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    flat = [v for v in flat if v is not None]
    if len(flat) != 1 or not (isinstance(flat[0], Image.Image)
                              or (isinstance(flat[0], str) and flat[0].lower().endswith(IMAGE_EXTENSIONS))):
        kinds = ", ".join(type(v).__name__ for v in flat) or "none"
        raise OptionError(f"task {task}, doc {doc_id}: tokenprune answers about one image per question, got "
                          f"{len(flat)} visual(s) ({kinds}); multi-image, video and text-only questions are not supported")
    image = flat[0] if isinstance(flat[0], Image.Image) else Image.open(flat[0])
    return image.convert("RGB")


def messages_to_prompt(messages: Any, task: str, doc_id: Any) -> tuple[list, str]:
    """``(visuals, prompt)`` from lmms-eval chat messages: one user turn; the prompt holds the text
    parts (joined by newlines) with ``<image>`` where the image is."""
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
        elif c["type"] == "image":
            visuals.append(c.get("url", c.get("image")))
            parts.append(IMAGE_PLACEHOLDER)
        else:
            raise OptionError(f"task {task}, doc {doc_id}: tokenprune answers about images; got a {c['type']} input")
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
