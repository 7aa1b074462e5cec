"""The model-agnostic half of every adapter: pruning, sequence assembly, generation, stats.

A family adapter (LLaVA, Qwen2-VL, InternVL, ...) implements four things -- build the processor
batch, encode the images into :class:`View` s (tokens, grid, where they sit in the sequence, and
the vision attention a pruner asked for), the full position ids, and where the decoder lives.
Everything else (running pre-LLM pruners, cutting the sequence, position policies, padding,
decoding, statistics) is here, once.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import OptionError
from ..pruner import PrunerNeeds, Stage, TokenPruner, validate_choice
from .decoder import DecoderRunner, LLMInputs, compact_positions, gather_seq, left_pack
from .devices import model_devices, synchronizer
from .pre_llm import prune_views, text_after_images
from .visuals import transform_visuals

POSITION_POLICIES = ("keep", "compact")


@dataclass
class View:
    """The visual tokens of one image view (an image, a tile, an anyres crop).

    Attributes:
        sample: batch index of the sample the view belongs to.
        tokens: ``[N, D]`` visual tokens after the projector, raster order over ``grid``.
        grid: ``(h, w)``, ``h * w == N``.
        seq_index: ``[N]`` positions of these tokens in the sample's ``input_ids`` row.
        vision_attention: ``[T, T]`` (or ``[prefix, T]``) head-averaged vision attention, if asked.
        vision_features: ``[N, Dv]`` what the projector reads for each token, if asked.
        vision_prefix_features: ``[prefix, Dv]`` the CLS/prefix tokens' features, where projectable.
        vision_keys: ``[prefix + N, d]`` head-averaged keys of the scored vision layer, if asked.
        vision_queries / vision_keys_full: ``[prefix + N, H*d]`` each, the scored layer's query and key
            projections, heads concatenated (``needs.vision_qk``).
        vision_received: ``[N]`` for views whose tokens pool the tower's patches (LLaVA-OneVision and
            LLaVA-NeXT-Video frames), with all rows of vision attention asked: the attention each
            patch receives averaged over every query of the unpooled map, then pooled as the tokens
            are -- what a column mean of the pooled ``vision_attention`` cannot give back.
        vision_attention2 / vision_received2: the same, of the pruner's second vision layer
            (``PrunerNeeds.vision_attention_layer2``), if asked.
        crop_attention: ``[C, R, T]`` LLaVA-NeXT's high-res view, with vision attention asked: its crops'
            own maps (every cell, padded ones included; rows as asked), before stitching and unpadding.
        crop_layout: ``[N]`` long, with ``crop_attention``: each token's ``crop * s^2 + cell``.
        vision_prefix: CLS/register tokens leading the vision sequence.
        patch_merge: vision patches per token, patches in merge order.
        encoder_seqs: lengths of the vision-encoder sequences this view cost (FLOPs accounting).
        encoder_windows: attention-window lengths of windowed vision layers (Qwen2.5-VL).
        prunable: ``False`` for structural embeddings that are placed but never pruned nor counted
            as visual tokens (LLaVA-NeXT's row newlines).
        deepstack: ``[levels, N, D]`` per-token features the decoder adds to these tokens' hidden
            states after its first layers (Qwen3-VL's DeepStack); pruning cuts and merges them with
            the tokens (see :attr:`~tokenprune.adapters.decoder.LLMInputs.deepstack`).
        patches: vision patches the tower embedded for this view, where that is not
            ``N * patch_merge`` (a frame average-pooled before the projector: LLaVA-NeXT-Video).
        image: index of the image this view belongs to among its sample's images (prompt order),
            ``None`` for a video frame.
        clip: index of the video this view belongs to among its sample's videos, ``None`` for an image.
        frame: for a video view, the index (in the sampled frames) of the first frame it covers (Qwen
            packs 2 frames into one temporal patch: frames ``frame`` and ``frame + 1``).
        time: for a video view, that frame's time in seconds from the start of the source video.
        vision_origin: ``[k]`` for a view an in-vision pruner already cut inside the tower (``tokens``
            is then ``[k, D]``, fewer than the ``N`` placeholders of ``seq_index``): the original token
            each kept or merged token takes its position id from (the earliest patch it covers).
        vision_members: ``[N]`` with ``vision_origin``: the token (of the ``k``) each original patch
            ended in, ``-1`` if it was dropped (for pictures).
        encoder_blocks: with ``vision_origin``, per tower block run, ``(tokens its attention saw,
            tokens its MLP saw)`` (FLOPs accounting; ``encoder_seqs`` is then the uncut length).
        vision_protected: ``[k]`` bool with ``vision_origin``: the tokens the in-vision pruner marked
            (:meth:`~tokenprune.in_vision.VisionReduction.mark`), handed to its in-LLM stages as
            ``PruningInputs.protected``; ``None``: none marked.
    """

    sample: int
    tokens: torch.Tensor
    grid: tuple[int, int]
    seq_index: torch.Tensor
    vision_attention: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    vision_prefix_features: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    vision_queries: torch.Tensor | None = None
    vision_keys_full: torch.Tensor | None = None
    vision_received: torch.Tensor | None = None
    vision_attention2: torch.Tensor | None = None
    vision_received2: torch.Tensor | None = None
    crop_attention: torch.Tensor | None = None
    crop_layout: torch.Tensor | None = None
    vision_prefix: int = 0
    patch_merge: int = 1
    prunable: bool = True
    encoder_seqs: tuple[int, ...] = ()
    encoder_windows: tuple[int, ...] = ()
    deepstack: torch.Tensor | None = None
    patches: int | None = None
    image: int | None = 0
    clip: int | None = None
    frame: int | None = None
    time: float | None = None
    vision_origin: torch.Tensor | None = None
    vision_members: torch.Tensor | None = None
    encoder_blocks: tuple[tuple[int, int], ...] = ()
    vision_protected: torch.Tensor | None = None


@dataclass
class SampleStats:
    """Per-sample accounting of one :meth:`PrunableLVLM.generate` call.

    ``tokens_per_layer[i]`` is the sequence length decoder layer ``i`` processed at prefill;
    ``visual_per_layer[i]`` the visual tokens among them; ``vision_seqs`` the lengths of the
    vision-encoder sequences (one per image / tile / crop) that produced the visual tokens;
    ``vision_blocks`` (in-vision pruners), one entry per sequence, the ``(attention, MLP)`` tokens of
    each tower block run (empty: every block of the tower saw the whole sequence);
    ``visual_tokens_projected`` the tokens the projector ran on (fewer than ``visual_tokens_in`` when
    an in-vision pruner cut inside the tower).
    ``cache_per_layer[i]``: the tokens layer ``i``'s KV cache held when decoding began, where a decode
    plan cut it after prefill (MustDrop); empty: what prefill cached (``tokens_per_layer``).
    """

    visual_tokens_in: int
    visual_tokens_kept: int
    text_tokens: int
    tokens_per_layer: list[int]
    visual_per_layer: list[int]
    new_tokens: int
    vision_patches: int
    vision_seqs: list[int] = field(default_factory=list)
    vision_windows: list[int] = field(default_factory=list)
    vision_blocks: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    visual_tokens_projected: int | None = None
    cache_per_layer: list[int] = field(default_factory=list)

    @property
    def visual_tokens_avg(self) -> float:
        """Visual tokens per decoder layer, averaged over layers (multi-stage methods' "equivalent tokens")."""
        return sum(self.visual_per_layer) / max(len(self.visual_per_layer), 1)


@dataclass
class GenerationOutput:
    """``texts``: decoded answers (prompt excluded); ``stats``: one :class:`SampleStats` each.

    ``token_ids`` ``[B, T]`` and ``first_logits`` ``[B, V]`` are kept for exactness checks;
    ``timings`` holds wall-clock seconds of the batch: ``vision`` (processor + vision tower +
    projector), ``llm`` (placing tokens + ``prefill`` + ``decode``), and ``prefill`` / ``decode``.
    """

    texts: list[str]
    stats: list[SampleStats]
    token_ids: torch.Tensor
    first_logits: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class LoglikelihoodOutput:
    """Result of :meth:`PrunableLVLM.loglikelihood`, one entry per (prompt, continuation) pair.

    ``logprobs[i]``: the summed log-probability of continuation ``i``; ``greedy[i]``: every one of
    its tokens is the argmax (greedy decoding would produce it); ``token_logprobs[i]``: the
    per-token log-probabilities (``[C_i]``); ``stats``: one :class:`SampleStats` each (the
    prompt's prefill, with ``new_tokens`` = the continuation's length); ``first_logits`` ``[B, V]``
    the logits after each prompt (as :meth:`PrunableLVLM.generate` returns them).
    """

    logprobs: list[float]
    greedy: list[bool]
    token_logprobs: list[list[float]]
    stats: list[SampleStats]
    first_logits: torch.Tensor

    @property
    def results(self) -> list[tuple[float, bool]]:
        """``[(sum log-prob, is_greedy), ...]``: lm-eval's loglikelihood pairs."""
        return list(zip(self.logprobs, self.greedy))


@dataclass
class EncodedImages:
    """A processed, vision-encoded batch, reusable by every pruner that needs the same thing.

    A sweep runs many methods and ratios on the same samples; pre-LLM pruners with equal
    :class:`~tokenprune.pruner.PrunerNeeds` (and all in-LLM ones, which need nothing from the
    vision side) can share one vision pass. ``batch`` is the processor output on the model's device,
    ``views`` what :meth:`PrunableLVLM.encode_images` returned, ``seconds`` the wall clock this
    encoding took (reported as the ``vision`` timing of every batch that uses it).
    """

    batch: dict[str, Any]
    views: list[View]
    needs: PrunerNeeds
    seconds: float


# Batch entries tokenprune adds to a processor batch with videos (dropped before any Hugging Face call,
# which never sees them: ``tp_`` keys): each video's frame times in seconds ``[V, T]`` float64,
# NaN-padded, and the batch row of each video ``[V]`` long (rows hold one video each, in order).
VIDEO_TIMES = "tp_video_times"
VIDEO_SAMPLES = "tp_video_samples"


def video_times(samples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([V, T] float64 seconds, NaN-padded; [V] long batch rows)`` of the videos among ``samples``
    (:class:`~tokenprune.adapters.visuals.SampleVisuals`), prompt order: where each view's ``time`` comes from."""
    rows = [(b, v) for b, s in enumerate(samples) for v in s.videos]
    times = torch.full((len(rows), max(v.num_frames for _, v in rows)), float("nan"), dtype=torch.float64)
    for i, (_, v) in enumerate(rows):
        times[i, : v.num_frames] = torch.as_tensor(v.times, dtype=torch.float64)
    return times, torch.tensor([b for b, _ in rows], dtype=torch.long)


GREEDY_EQUIVALENT = {"do_sample": (False,), "num_beams": (1,), "temperature": (0, 0.0, None), "top_p": (1, 1.0, None),
                     "top_k": (None,), "use_cache": (True,)}


def _check_greedy(gen_kwargs: dict[str, Any]) -> None:
    for key, value in gen_kwargs.items():
        if key not in GREEDY_EQUIVALENT or value not in GREEDY_EQUIVALENT[key]:
            raise OptionError(
                f"generation option {key}={value!r} is not supported: tokenprune decodes greedily "
                f"(accepted: {', '.join(f'{k}={v[0]!r}' for k, v in GREEDY_EQUIVALENT.items())})"
            )


class PrunableLVLM(ABC):
    """A Hugging Face vision-language model that runs any registered pruner.

    Use :func:`tokenprune.load` or :func:`tokenprune.wrap` rather than a subclass directly.
    """

    family: ClassVar[str] = "?"
    model_types: ClassVar[tuple[str, ...]] = ()
    mrope: ClassVar[bool] = False  # 3-D (M-RoPE) position ids
    # hands pre-LLM pruners the scored vision layer's raw q / k projections (PrunerNeeds.vision_qk)
    provides_vision_qk: ClassVar[bool] = False

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        text_model, lm_head = self.decoder()
        # Our decoder loop passes 4-D boolean masks: SDPA's format only. Hugging Face's eager function adds the
        # mask to the scores, so a boolean one adds 0 / 1 and masks nothing (a model loaded with eager attention
        # gave logits 0.2 off HF's own eager forward on tiny-llava): the decoder always runs SDPA.
        if text_model.config._attn_implementation != "sdpa":
            text_model.config._attn_implementation = "sdpa"
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.runner = DecoderRunner(text_model, lm_head, pad_id=pad, eos_ids=self.eos_ids())

    # -- what a family provides -----------------------------------------------------------------
    def decoder(self) -> tuple[nn.Module, nn.Module]:
        """``(text_model, lm_head)``: the decoder stack and the output projection (the layout of
        every transformers LVLM supported; override for others)."""
        return self.model.model.language_model, self.model.lm_head

    @property
    def image_placeholder(self) -> str:
        """The text that marks the image in a prompt given with ``chat_template=False`` (the
        processor's image token, e.g. LLaVA's ``<image>``; families whose image needs more, like
        Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>``, override it)."""
        from .common import IMAGE_PLACEHOLDER

        return getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER

    @property
    def video_placeholder(self) -> str:
        """The text that marks a video in a prompt given with ``chat_template=False`` (the processor's
        video token, e.g. ``<video>``; Qwen's wrap it in vision start/end markers)."""
        from .visuals import VIDEO_PLACEHOLDER

        return getattr(self.processor, "video_token", None) or VIDEO_PLACEHOLDER

    def prompt_texts(self, prompts: Sequence[str], chat_template: bool = True,
                     visuals: Sequence[Any] | None = None) -> list[str]:
        """The processor's text input for each prompt: through the chat template (the processor's,
        else the family's documented default, else a one-line error), or, with
        ``chat_template=False``, as given (it must hold :attr:`image_placeholder` once per image, or
        :attr:`video_placeholder` for a video). ``visuals``: each sample's image, list of images or
        video (default: one image each), placed first or at the prompt's ``<image>`` / ``<video>``."""
        from .common import chat_prompts, chat_template_for, raw_prompts
        from .visuals import split_visuals

        samples = split_visuals(visuals) if visuals is not None else None
        placeholder = self.image_placeholder
        if not chat_template:
            return raw_prompts(prompts, placeholder, self.family, samples, self.video_placeholder)
        template = chat_template_for(self.processor, self.model.config.model_type, self.family, placeholder)
        return chat_prompts(self.processor, prompts, template, placeholder, samples,
                            self.video_placeholder if samples is not None and any(s.videos for s in samples) else None)

    def prepare(self, images: Sequence[Any], prompts: Sequence[str],
                chat_template: bool = True) -> dict[str, torch.Tensor]:
        """Processor batch (left-padded ``input_ids``, ``attention_mask``, pixel inputs, video inputs)
        for one visual per sample -- a PIL image, a list of PIL images, or a
        :class:`tokenprune.media.Video` -- with the model's chat template and placeholders applied
        to each prompt (``chat_template=False``: prompts as given, see :meth:`prompt_texts`)."""
        from .visuals import split_visuals

        samples = split_visuals(images)
        texts = self.prompt_texts(prompts, chat_template, images)
        videos = [v for s in samples for v in s.videos]
        extra = self.video_inputs(videos) if videos else {}
        batch = dict(self.processor(images=self.image_inputs(samples), text=texts, padding=True,
                                    return_tensors="pt", **extra))
        if videos:
            batch[VIDEO_TIMES], batch[VIDEO_SAMPLES] = video_times(samples)
        return batch

    def image_inputs(self, samples: Sequence[Any]) -> list | None:
        """The processor's ``images`` argument for the samples' images (:class:`~tokenprune.adapters.visuals.SampleVisuals`):
        one flat list in prompt order, or ``None`` when there are none (a family whose processor tells
        multi-image samples apart by nesting, like LLaVA-OneVision's, overrides it)."""
        flat = [im for s in samples for im in s.images]
        return flat or None

    def context_length(self) -> int | None:
        """The longest sequence the LLM takes (its ``max_position_embeddings``), ``None`` if it names none."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def check_context(self, batch: dict[str, Any]) -> None:
        """Refuse samples of a processor ``batch`` whose prompt does not fit the model's context.

        Raises:
            ContextOverflowError: one line naming the samples, their lengths and what to lower;
                ``.rows`` lists their batch indices.
        """
        from ..errors import ContextOverflowError

        limit = self.context_length()
        if limit is None:
            return
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = [i for i, n in enumerate(lengths) if n > limit]
        if rows:
            worst = max(lengths[i] for i in rows)
            raise ContextOverflowError(
                f"sample{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))} of the batch take{'' if len(rows) > 1 else 's'} "
                f"up to {worst} tokens, more than the model's context of {limit}: sample fewer frames "
                "(Video.from_file(..., frames=N), a task's frames= option) or give smaller images", rows)

    def video_inputs(self, videos: Sequence[Any]) -> dict[str, Any]:
        """The processor keyword arguments that hand it ``videos`` (:class:`tokenprune.media.Video`,
        prompt order): by default ``videos=[frames [T, H, W, 3] uint8, ...]``, after making sure the
        processor has a video processor (a torchvision-free one from :meth:`video_processor`
        when it was built without). Families whose processors need more (fps, metadata) override it."""
        if getattr(self.processor, "video_processor", None) is None:
            self.processor.video_processor = self.video_processor()
        return {"videos": [v.frames for v in videos]}

    def video_processor(self) -> Any:
        """A torchvision-free video processor for this family's processor (transformers' own need
        torchvision); families that take video override it.

        Raises:
            OptionError: this family takes no video.
        """
        raise OptionError(f"the {self.family} adapter takes images only, not video; video-capable families: "
                          "qwen2_vl, qwen2_5_vl, qwen3_vl, llava_onevision, llava_next_video, internvl")

    @abstractmethod
    def encode_images(self, batch: dict[str, torch.Tensor], needs: PrunerNeeds) -> list[View]:
        """Vision encoder + projector: every view of every sample, in sequence order."""

    def position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-sequence position ids, ``[B, L]`` (1-D RoPE; M-RoPE families return ``[3, B, L]``)."""
        mask = batch["attention_mask"].bool()
        return (mask.long().cumsum(1) - 1).clamp_min(0)

    @staticmethod
    def compact_positions(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions renumbered without gaps, for ``position_policy="compact"``
        (see :func:`tokenprune.adapters.decoder.compact_positions`)."""
        return compact_positions(positions, mask)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """The projector applied to vision features ``[..., Dv]`` (pre-LLM merges before it)."""
        return self.model.model.multi_modal_projector(features)

    def vision_spec(self):
        """The vision tower's shape for FLOPs accounting (:class:`tokenprune.cost.VisionSpec`)."""
        from ..cost import vision_spec_from_config

        return vision_spec_from_config(self.model.config)

    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return [i for i in ids if i is not None]

    def _position_policy(self, requested: str | None, pruner: TokenPruner | None, visuals: Sequence[Any]) -> str:
        """The position policy of a call: ``requested``, else the pruner's own convention.

        ``"compact"`` renumbers positions without gaps; on a video's 3-D M-RoPE positions that is
        undefined (time, height and width advance differently, and transformers 5.x even starts the
        text after a Qwen2/2.5-VL video below the video's temporal positions), so there a method whose
        own convention is compact keeps the original positions, and asking for compact is refused.
        """
        from .visuals import split_visuals

        video = self.mrope and any(s.videos for s in split_visuals(visuals))
        if requested is None:
            requested = pruner.default_position_policy(self.mrope) if pruner is not None else "keep"
            if video:
                requested = "keep"
        validate_choice(requested, "position_policy", POSITION_POLICIES)
        if video and requested == "compact":
            raise OptionError("position_policy='compact' renumbers 1-D positions; this model's video positions are "
                              "3-D (M-RoPE), where it is undefined: use position_policy='keep'")
        return requested

    def _stage_policy(self, requested: str | None, pruner: TokenPruner | None, visuals: Sequence[Any]) -> str:
        """The position policy the decoder applies at the pruner's in-LLM stages: the call's (:meth:`_position_policy`),
        unless the call asked for none and the pruner's own convention there differs
        (:attr:`~tokenprune.pruner.TokenPruner.llm_position_policy`: PruneVid renumbers before the LLM and keeps
        positions at its layer-10 cut). On M-RoPE models the pruner's M-RoPE convention holds throughout."""
        if requested is None and pruner is not None and pruner.llm_position_policy is not None and not self.mrope:
            return pruner.llm_position_policy
        return self._position_policy(requested, pruner, visuals)

    # -- the shared pipeline ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device inputs go to: the execution device of the input embeddings (their accelerate
        hook's on a model dispatched with a ``device_map``, whose first weights may be offloaded to
        ``meta``). Processor outputs, visual tokens handed to pre-LLM pruners and the decoder's
        per-token state live here; each module's hook moves what it reads to its own device."""
        return self.runner.device

    def _synchronizer(self):
        """Waits for every CUDA device of the model (timing boundaries); a no-op off CUDA."""
        return synchronizer(model_devices(self.model)) if self.device.type == "cuda" else (lambda: None)

    @staticmethod
    def _views_to(views: list[View], device: torch.device) -> list[View]:
        """``views`` with every tensor on ``device`` (a vision tower or projector on another device
        leaves its outputs there); views already there are returned as they are."""
        out = []
        for v in views:
            moved = {f.name: getattr(v, f.name).to(device) for f in fields(v)
                     if torch.is_tensor(getattr(v, f.name)) and getattr(v, f.name).device != device}
            out.append(replace(v, **moved) if moved else v)
        return out

    @staticmethod
    def vision_needs(pruner: TokenPruner | None) -> PrunerNeeds:
        """What the vision pass must compute for ``pruner``: its needs if it prunes before the LLM, the
        pruner itself if it cuts inside the tower, else nothing."""
        if pruner is not None and pruner.acts_in(Stage.IN_VISION):
            return PrunerNeeds(in_vision=pruner)
        return pruner.needs if pruner is not None and pruner.acts_in(Stage.PRE_LLM) else PrunerNeeds()

    def in_vision_refusal(self) -> str | None:
        """Why this family cannot run an in-vision pruner (one line), or ``None`` if it can (families
        that run their tower through :mod:`tokenprune.adapters.vision_blocks` override it)."""
        return (f"the {self.family} adapter cannot prune inside its vision tower; in-vision methods (tome, flowcut, "
                "mustdrop) run on LLaVA-1.5-style models (CLIP, SigLIP or DINOv2 tower; flowcut also on LLaVA-NeXT)")

    @torch.no_grad()
    def encode(self, images: Sequence[Any], prompts: Sequence[str], needs: PrunerNeeds | None = None,
               chat_template: bool = True) -> EncodedImages:
        """Processor + vision tower + projector for a batch, to pass to :meth:`generate` as ``encoded``
        (once for several pruners with the same ``needs``); ``chat_template`` as in :meth:`generate`."""
        if len(images) != len(prompts):
            raise OptionError(f"got {len(images)} visuals and {len(prompts)} prompts; give one image, list of "
                              "images or video per prompt")
        needs = needs or PrunerNeeds()
        if needs.in_vision is not None and (refusal := self.in_vision_refusal()) is not None:
            raise OptionError(refusal)
        if needs.vision_qk and not self.provides_vision_qk:
            raise OptionError(f"the {self.family} adapter does not hand pruners the vision layer's raw query / key "
                              "projections (PruMerge's single-head attention); they run on family llava (LLaVA-1.5 "
                              "style, one grid per image)")
        sync = self._synchronizer()
        t0 = time.perf_counter()
        device = self.device
        # An image-level method (downsample) changes the visuals themselves, before the processor.
        images = transform_visuals(images, needs)
        # The keyword only when off: an adapter overriding prepare(images, prompts) keeps working.
        raw = self.prepare(images, prompts) if chat_template else self.prepare(images, prompts, chat_template=False)
        self.check_context(raw)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in raw.items()}
        views = self.encode_images(batch, needs)
        if needs.vision_attention_layer2 is not None:
            # A second layer's map in the very layout of the first (crops composed, windows undone, frames
            # pooled): the family's own encode_images once more, asked for that layer's attention alone.
            second = self.encode_images(batch, PrunerNeeds(vision_attention_layer=needs.vision_attention_layer2,
                                                           vision_attention_rows=needs.vision_attention_rows))
            views = [replace(v, vision_attention2=s.vision_attention, vision_received2=s.vision_received)
                     for v, s in zip(views, second)]
        views = self._views_to(views, device)
        sync()
        return EncodedImages(batch=batch, views=views, needs=needs, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        pruner: TokenPruner | None = None,
        max_new_tokens: int = 16,
        position_policy: str | None = None,
        sample_ids: Sequence[str] | None = None,
        use_cache: bool = True,
        ignore_eos: bool = False,
        encoded: EncodedImages | None = None,
        chat_template: bool = True,
        **gen_kwargs: Any,
    ) -> GenerationOutput:
        """Answer ``prompts[i]`` about ``images[i]`` with ``pruner`` applied (greedy decoding).

        Args:
            images: one visual per sample: a PIL image, a list of PIL images (a multi-image prompt) or
                a :class:`tokenprune.media.Video` (frames sampled as its sampler chose); a batch may
                mix them.
            prompts: one question per sample; the chat template and image placeholder are added
                (the image first, or where the prompt writes ``<image>``).
            pruner: any registered pruner, or ``None`` for the unpruned model.
            max_new_tokens: generation budget per sample.
            position_policy: ``"keep"`` kept visual tokens keep their original position ids;
                ``"compact"`` positions are renumbered without gaps (for in-LLM pruners, after
                each stage); ``None``: the pruner's own convention (``pruner.position_policy``).
            sample_ids: stable ids (seed random pruners); default: the batch index.
            use_cache: ``False`` re-runs the whole pruned sequence per token (a reference).
            ignore_eos: decode exactly ``max_new_tokens`` (fixed-length latency measurements).
            encoded: :meth:`encode` of these images and prompts, to skip the vision pass (its
                ``needs`` must be the pruner's); its measured time is reported as ``vision``.
            chat_template: ``False`` passes each prompt to the processor as given, for an exact
                prompt format (a paper's, an evaluation harness's): it must hold the family's
                :attr:`image_placeholder` once (or tokenprune's ``<image>``, which is mapped to it);
                no chat template, system prompt or generation prompt is added.
            gen_kwargs: Hugging Face generation options; decoding is greedy, so only values that
                mean greedy (``do_sample=False``, ``num_beams=1``, ``temperature=0``, ``top_p=1``)
                are accepted, anything else is refused rather than silently ignored.
        """
        _check_greedy(gen_kwargs)
        if len(images) != len(prompts):
            raise OptionError(f"got {len(images)} visuals and {len(prompts)} prompts; give one image, list of "
                              "images or video per prompt")
        if max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        llm_policy = self._stage_policy(position_policy, pruner, images)
        position_policy = self._position_policy(position_policy, pruner, images)
        ids = [str(s) for s in sample_ids] if sample_ids is not None else [str(i) for i in range(len(prompts))]
        needs = self.vision_needs(pruner)
        sync = self._synchronizer()

        if encoded is None:
            encoded = self.encode(images, prompts, needs, chat_template=chat_template)
        elif encoded.needs != needs:
            raise OptionError(f"the encoded batch was computed for {encoded.needs.describe() or 'no pruner needs'}, "
                              f"this pruner needs {needs.describe() or 'nothing'}; encode with its needs")
        elif int(encoded.batch["input_ids"].shape[0]) != len(prompts):
            raise OptionError(f"the encoded batch holds {encoded.batch['input_ids'].shape[0]} samples, got {len(prompts)} prompts")
        batch, views = encoded.batch, encoded.views
        t1 = time.perf_counter()
        in_llm = self._in_llm(pruner)
        llm_inputs, n_in, n_kept, patches, (seqs, windows, blocks, projected) = self._assemble(
            batch, views, pruner, self._assembly_policy(pruner, position_policy), ids, prompts)
        result = self.runner.generate(llm_inputs, max_new_tokens, pruner=in_llm, use_cache=use_cache,
                                     ignore_eos=ignore_eos, position_policy=llm_policy)
        sync()
        t2 = time.perf_counter()

        cut_caches = [[] for _ in prompts]  # a decode plan's cut: what each layer's cache held from then on
        if result.cache_tokens is not None:
            prefill = result.prefill_tokens.tolist()
            for i, row in enumerate(result.cache_tokens.tolist()):
                if row != prefill[i]:
                    cut_caches[i] = row
        texts = self.tokenizer.batch_decode(
            [row[: int(n)] for row, n in zip(result.tokens.tolist(), result.new_tokens.tolist())],
            skip_special_tokens=True,
        )
        text_tokens = (llm_inputs.mask & ~llm_inputs.image_mask).sum(1).tolist()
        stats = [
            SampleStats(
                # kept = what reaches the last decoder layer (FastV prunes inside the LLM)
                visual_tokens_in=n_in[i], visual_tokens_kept=min(n_kept[i], int(result.visual_tokens[i].min())),
                text_tokens=text_tokens[i],
                tokens_per_layer=result.prefill_tokens[i].tolist(), visual_per_layer=result.visual_tokens[i].tolist(),
                new_tokens=int(result.new_tokens[i]), vision_patches=patches[i], vision_seqs=seqs[i],
                vision_windows=windows[i], vision_blocks=blocks[i] if any(blocks[i]) else [],
                visual_tokens_projected=projected[i], cache_per_layer=cut_caches[i],
            )
            for i in range(len(prompts))
        ]
        timings = {"vision": encoded.seconds, "llm": t2 - t1, **result.timings}
        return GenerationOutput(texts=[t.strip() for t in texts], stats=stats, token_ids=result.tokens,
                                first_logits=result.first_logits, timings=timings)

    @torch.no_grad()
    def loglikelihood(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        continuations: Sequence[str],
        pruner: TokenPruner | None = None,
        position_policy: str | None = None,
        sample_ids: Sequence[str] | None = None,
        chat_template: bool = True,
    ) -> LoglikelihoodOutput:
        """Log-probability of ``continuations[i]`` as the answer to ``prompts[i]`` about ``images[i]``,
        with ``pruner`` applied: multiple-choice scoring with the pruned model.

        The prompt is built and pruned exactly as :meth:`generate` does (chat template, image
        placeholder, generation prompt); the continuation is tokenised on its own (no special
        tokens) and its ids are appended after the generation prompt, then teacher-forced through
        the KV cache (:meth:`~tokenprune.adapters.decoder.DecoderRunner.score`). Pairs with the
        same image object and prompt (the choices of one question) share one vision pass and one
        prefill.

        Args:
            images: one visual per pair (a PIL image, a list of them, or a video), as in :meth:`generate`.
            prompts: one question per pair (no chat template: it is added; with
                ``chat_template=False``, the whole prompt as given, as in :meth:`generate`).
            continuations: one answer text per pair, non-empty (e.g. ``"red"``; include a leading
                space only if the model would generate one).
            pruner / position_policy / sample_ids / chat_template: as in :meth:`generate`.

        Returns:
            :class:`LoglikelihoodOutput`; ``.results`` is ``[(sum log-prob, is_greedy), ...]``.
        """
        if not len(images) == len(prompts) == len(continuations):
            raise OptionError(f"got {len(images)} images, {len(prompts)} prompts and {len(continuations)} continuations; "
                              "give one of each per pair")
        llm_policy = self._stage_policy(position_policy, pruner, images)
        position_policy = self._position_policy(position_policy, pruner, images)
        ids = [str(s) for s in sample_ids] if sample_ids is not None else [str(i) for i in range(len(prompts))]
        token_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        for c, t in zip(continuations, token_ids):
            if not t:
                raise OptionError(f"continuation {c!r} has no tokens; give a non-empty answer text")
        unique: dict[tuple[int, str], int] = {}  # (image object, prompt) -> prompt row
        rows = [unique.setdefault((id(img), p), len(unique)) for img, p in zip(images, prompts)]
        first = {r: i for i, r in reversed(list(enumerate(rows)))}  # each prompt row's first pair
        u_images = [images[first[r]] for r in range(len(unique))]
        u_prompts = [prompts[first[r]] for r in range(len(unique))]
        u_ids = [ids[first[r]] for r in range(len(unique))]

        encoded = self.encode(u_images, u_prompts, self.vision_needs(pruner), chat_template=chat_template)
        in_llm = self._in_llm(pruner)
        llm_inputs, n_in, n_kept, patches, (seqs, windows, blocks, projected) = self._assemble(
            encoded.batch, encoded.views, pruner, self._assembly_policy(pruner, position_policy), u_ids, u_prompts)
        device = llm_inputs.embeds.device
        width = max(len(t) for t in token_ids)
        targets = torch.full((len(token_ids), width), self.runner.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(token_ids), width, dtype=torch.bool, device=device)
        for i, t in enumerate(token_ids):
            targets[i, : len(t)] = torch.tensor(t, device=device)
            mask[i, : len(t)] = True
        result = self.runner.score(llm_inputs, targets, mask, pruner=in_llm, position_policy=llm_policy,
                                   rows=torch.tensor(rows, device=device))
        text_tokens = (llm_inputs.mask & ~llm_inputs.image_mask).sum(1).tolist()
        stats = []
        for i, r in enumerate(rows):
            stats.append(SampleStats(
                visual_tokens_in=n_in[r], visual_tokens_kept=min(n_kept[r], int(result.visual_tokens[r].min())),
                text_tokens=text_tokens[r], tokens_per_layer=result.prefill_tokens[r].tolist(),
                visual_per_layer=result.visual_tokens[r].tolist(), new_tokens=len(token_ids[i]),
                vision_patches=patches[r], vision_seqs=seqs[r], vision_windows=windows[r],
                vision_blocks=blocks[r] if any(blocks[r]) else [], visual_tokens_projected=projected[r]))
        per_token = [result.logprobs[i, : len(t)].tolist() for i, t in enumerate(token_ids)]
        return LoglikelihoodOutput(logprobs=[float(sum(lp)) for lp in per_token],
                                   greedy=[bool(g) for g in result.greedy.all(1).tolist()],
                                   token_logprobs=per_token, stats=stats, first_logits=result.first_logits)

    @staticmethod
    def _in_llm(pruner: TokenPruner | None) -> TokenPruner | None:
        """The pruner the decoder runs: one with in-LLM stages or a decode plan, else ``None``."""
        if pruner is not None and (pruner.acts_in(Stage.IN_LLM) or pruner.acts_in(Stage.DECODE)):
            return pruner
        return None

    @staticmethod
    def _assembly_policy(pruner: TokenPruner | None, position_policy: str) -> str:
        """Positions of the sequence handed to the decoder: the call's policy, except for a pruner whose
        first cut is inside the LLM (its stages renumber there; the uncut input keeps its own)."""
        if pruner is not None and pruner.acts_in(Stage.IN_LLM) and not (
                pruner.acts_in(Stage.IN_VISION) or pruner.acts_in(Stage.PRE_LLM)):
            return "keep"
        return position_policy

    def _assemble(self, batch, views: list[View], pruner, position_policy, ids, prompts=None):
        """Embed the prompt, place the (pruned) visual tokens, cut and left-pack the sequence."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        b = input_ids.shape[0]
        positions = self.position_ids(batch)
        embeds = self.runner.embed(input_ids)
        pre = pruner if pruner is not None and pruner.acts_in(Stage.PRE_LLM) else None
        text = None
        if pre is not None and pre.needs.text:
            text = (*text_after_images(embeds, mask, views, input_ids), list(prompts) if prompts is not None else None)
        kept_views = (prune_views(views, pre, ids, self.project_features, text) if pre is not None
                      else [self._as_placed(v) for v in views])

        image_mask = torch.zeros_like(mask)
        keep = mask.clone()
        n_in, n_kept, patches, projected = [0] * b, [0] * b, [0] * b, [0] * b
        seqs: list[list[int]] = [[] for _ in range(b)]
        windows: list[list[int]] = [[] for _ in range(b)]
        blocks: list[list[tuple]] = [[] for _ in range(b)]
        for v in views:
            seqs[v.sample].extend(v.encoder_seqs)
            windows[v.sample].extend(v.encoder_windows)
            blocks[v.sample].extend([v.encoder_blocks] * len(v.encoder_seqs))
        prunable = [v for v in views if v.prunable]
        if prunable:
            rows_all = torch.cat([torch.full_like(v.seq_index, v.sample) for v in prunable])
            image_mask[rows_all, torch.cat([v.seq_index for v in prunable])] = True
            keep &= ~image_mask
        if len(prunable) < len(views):  # structural slots leave too unless placed (FlowCut's NeXT drops newlines)
            fixed = [v for v in views if not v.prunable]
            keep[torch.cat([torch.full_like(v.seq_index, v.sample) for v in fixed]),
                 torch.cat([v.seq_index for v in fixed])] = False
        if views:
            rows = torch.cat([torch.full_like(s, v.sample) for v, (s, *_) in zip(views, kept_views)])
            cols = torch.cat([s for s, *_ in kept_views])
            sources = torch.cat([p for _, _, p, _ in kept_views])
            if not torch.equal(sources, cols):  # merged tokens take their stated tokens' positions
                positions = positions.clone()
                positions[..., rows, cols] = positions[..., rows, sources]
            keep[rows, cols] = True
            image_span = torch.zeros_like(mask)
            image_span[rows, cols] = True
            embeds = embeds.index_put((rows, cols), torch.cat([t for _, t, *_ in kept_views]).to(embeds.dtype))
            deepstack = self._place_deepstack(views, kept_views, embeds)
            protected = self._place_protected(views, kept_views, mask) if pre is None else None
            for v, (s, *_) in zip(views, kept_views):
                if v.prunable:
                    n_in[v.sample] += v.seq_index.shape[0]
                    n_kept[v.sample] += s.shape[0]
                    projected[v.sample] += v.tokens.shape[0]
                    patches[v.sample] += v.patches if v.patches is not None else v.seq_index.shape[0] * v.patch_merge
        else:
            image_span, deepstack, protected = torch.zeros_like(mask), None, None
        index = left_pack(keep)
        new_mask = gather_seq(keep, index, 1)
        new_image = gather_seq(image_mask, index, 1) & new_mask
        new_pos = gather_seq(positions, index, positions.dim() - 1)
        if position_policy == "compact":
            new_pos = self.compact_positions(new_pos, new_mask)
        view_grids: list[tuple[tuple[int, int], ...]] = [()] * b
        for v, (s, *_) in zip(views, kept_views):  # encode_images returns views in sequence order
            if v.prunable:
                # a view cut inside the tower or before the LLM (by a pruner that also acts inside it) is no longer
                # a grid: its k tokens as one row (at scope clip the first view holds the clip's k, the others 0)
                cut = v.vision_origin is not None or (pre is not None and s.shape[0] != v.seq_index.shape[0])
                view_grids[v.sample] += ((1, s.shape[0]) if cut else v.grid,)
        return (
            LLMInputs(embeds=gather_seq(embeds, index, 1), mask=new_mask, positions=new_pos, image_mask=new_image,
                      sample_ids=ids, view_grids=view_grids, image_span=gather_seq(image_span, index, 1) & new_mask,
                      deepstack=None if deepstack is None else gather_seq(deepstack, index, 2),
                      protected=None if protected is None else gather_seq(protected, index, 1) & new_mask,
                      visual_in=torch.tensor(n_in, device=mask.device)),
            n_in, n_kept, patches, (seqs, windows, blocks, projected),
        )

    @staticmethod
    def _as_placed(v: View) -> tuple:
        """A view's tokens as placed without a pre-LLM pruner: all of them, or, for a view an in-vision
        pruner cut, its ``k`` tokens in the first ``k`` of its slots, in the order the tower left them,
        each with the position of the patch it stands for (``vision_origin``)."""
        if v.vision_origin is None:
            return (v.seq_index, v.tokens, v.seq_index, v.deepstack)
        k = v.tokens.shape[0]
        return (v.seq_index[:k], v.tokens, v.seq_index[v.vision_origin], None)

    @staticmethod
    def _place_protected(views: list[View], kept_views: list[tuple], mask: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]`` bool: the placed visual tokens an in-vision pruner marked (``View.vision_protected``),
        ``None`` when no view carries marks."""
        marked = [(v, s) for v, (s, *_) in zip(views, kept_views) if v.vision_protected is not None]
        if not marked:
            return None
        out = torch.zeros_like(mask)
        rows = torch.cat([torch.full_like(s, v.sample) for v, s in marked])
        out[rows, torch.cat([s for _, s in marked])] = torch.cat([v.vision_protected.to(out.device) for v, _ in marked])
        return out

    @staticmethod
    def _place_deepstack(views: list[View], kept_views: list[tuple], embeds: torch.Tensor) -> torch.Tensor | None:
        """``[levels, B, L, D]``: each kept (or merged) visual token's DeepStack features at the sequence
        position it takes, zeros elsewhere; ``None`` when no view carries any."""
        placed = [(v.sample, s, d) for v, (s, _, _, d) in zip(views, kept_views) if d is not None]
        if not placed:
            return None
        feats = torch.cat([d for _, _, d in placed], 1)  # [levels, K, D]
        out = embeds.new_zeros(feats.shape[0], *embeds.shape[:2], feats.shape[-1])
        rows = torch.cat([torch.full_like(s, b) for b, s, _ in placed])
        out[:, rows, torch.cat([s for _, s, _ in placed])] = feats.to(out.dtype)
        return out

    # The benchmark scripts' name for it (kept: it is how they time the text side of a pre-LLM pruner).
    _text_after_images = staticmethod(text_after_images)
