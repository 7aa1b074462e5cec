"""Parity of tokenprune's torchvision-free video preprocessors with transformers' own video processors.

tokenprune ships its own video preprocessors (``tokenprune/media/processors/{qwen,frames,internvl}.py``,
attached by each family adapter's ``PrunableLVLM.video_processor()``) because transformers' video
processors refuse to build without torchvision. This script runs both on the same frames, in an
environment WHERE TORCHVISION IMPORTS (never the project's CPU venv), and prints per family and case:

* direct calls (``video_processor(videos, **processor.videos_kwargs, do_sample_frames=False)``):
  output keys, shapes and grids identical, max / mean |ours - HF| of the pixel tensors;
* the full Hugging Face processor (``processor(text=..., videos=...)``), once with ours attached
  through the adapter's own path (``adapter.prepare``) and once with transformers' video processor:
  ``input_ids`` (placeholder runs, Qwen3-VL timestamps, InternVL ``Frame{i}:`` lines),
  ``attention_mask``, ``mm_token_type_ids``, ``video_grid_thw``, ``second_per_grid_ts`` and pixels;
* Qwen families: a checkpoint's SAVED video processor settings (``video_preprocessor_config.json``)
  read by the adapter, against transformers' processor loaded from the same folder.

Cases: frames already at the model's size (no resize: pixels must agree to 1e-5), and frames that need
a resize (bicubic: transformers resizes with torchvision, tokenprune with ``F.interpolate``; the
kernels differ, so only the size, keys, grids and token text must agree; the pixel gap is reported).

Exit status: 1 when any keys / shapes / grids / token ids differ, a no-resize case differs by more
than 1e-5, or a check raises; 0 otherwise. Families whose modules are not there yet are SKIPped
(``--strict``: a skip fails too).

Side environment (large download, CUDA build of torch: it runs on CPU). The machine's pip config adds
``/opt/wheels`` (a ``torch 2.13.0+cpu`` wheel); PyPI's ``torchvision 0.28.0`` (the release for torch
2.13) is built against PyPI's CUDA torch and its C++ ops fail to register beside the ``+cpu`` torch
(``RuntimeError: operator torchvision::nms does not exist``), so pip is told to ignore that config:

    python3 -m venv /work/sideenv
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= /work/sideenv/bin/pip install \\
        --cert /etc/ssl/certs/ca-certificates.crt --index-url https://pypi.org/simple \\
        "torch==2.13.0" "torchvision==0.28.0" "transformers==5.25.0" pillow numpy av pyyaml scipy tqdm
    /work/sideenv/bin/pip install --no-deps -e /work/main

Run (from /work/main; 20-50 s on 2 CPU cores):

    /work/sideenv/bin/python benchmarks/video_processor_parity.py
    /work/sideenv/bin/python benchmarks/video_processor_parity.py --families qwen3_vl,internvl --strict
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl")
ZOO_NAMES = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl",
             "llava_onevision": "tiny-llava-onevision", "llava_next_video": "tiny-llava-next-video",
             "internvl": "tiny-internvl"}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
NO_RESIZE_TOL = 1e-5
PIXEL_KEYS = ("pixel_values_videos", "pixel_values")


# ---------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------
def noise_clip(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """``[t, h, w, 3]`` uint8 uniform noise (the worst case for resampling differences)."""
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def smooth_clip(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """``[t, h, w, 3]`` uint8 smooth content (low-frequency sinusoids moving across frames): what
    natural video looks like to a resampler, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for k in range(t):
        chans = []
        for c in range(3):
            fy, fx, ph = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi)
            chans.append(127.5 + 120 * np.sin(fy * y + fx * x + ph + 0.3 * k))
        frames.append(np.stack(chans, -1))
    return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)


@dataclass
class Case:
    """One input: a list of clips (one per video; in the full-processor check, one per sample)."""

    name: str
    clips: list[np.ndarray]
    resize: bool  # True: the frames need a resize (bicubic), so pixels are compared loosely
    kwargs: dict = field(default_factory=dict)  # extra video processor call options (direct check only)

    @property
    def desc(self) -> str:
        return ", ".join(f"{c.shape[0]}x{c.shape[1]}x{c.shape[2]}" for c in self.clips)


def cases_for(family: str) -> list[Case]:
    """The cases of a family: sizes chosen against the tiny zoo models' processors.

    Qwen2/2.5-VL: patch 8 -> 16 px tokens, 4..64 tokens per frame; Qwen3-VL: patch 16 -> 32 px tokens,
    8..256 tokens over ``t*h*w``; OneVision: 40x40 frames; NeXT-Video: shortest edge 32 + 32x32 crop;
    InternVL: 32x32 tiles.
    """
    if family in QWEN:
        at = (64, 96)  # multiples of 16 and 32, within both budgets: no resize
        return [
            Case("a1 at size", [noise_clip(4, *at, 1)], False),
            # 2x64x64: t*h*w = 8192 = Qwen3-VL's minimum here, so neither family resizes it
            Case("a2 at size, odd T, 2 clips", [noise_clip(5, *at, 2), noise_clip(2, 64, 64, 3)], False),
            Case("b1 resize (noise)", [noise_clip(4, 50, 70, 4)], True),
            Case("b2 resize (smooth)", [smooth_clip(4, 50, 70, 5)], True),
            Case("b3 resize down, 2 clips", [noise_clip(4, 120, 200, 6), smooth_clip(3, 200, 120, 7)], True),
            # qwen-vl-utils' total-pixel cap (off by default in transformers 5.25): shrinks these 8 frames
            Case("c1 cap_pixels_per_frame", [smooth_clip(8, 128, 192, 8)], True,
                 dict(cap_pixels_per_frame=True, max_video_tokens=12)),
        ]
    at = {"llava_onevision": (40, 40), "llava_next_video": (32, 32), "internvl": (32, 32)}[family]
    return [
        Case("a1 at size", [noise_clip(4, *at, 1)], False),
        Case("a2 at size, 2 clips", [noise_clip(3, *at, 2), noise_clip(3, *at, 3)], False),
        Case("b1 resize (noise)", [noise_clip(4, 50, 70, 4)], True),
        Case("b2 resize (smooth)", [smooth_clip(4, 50, 70, 5)], True),
        Case("b3 resize down, 2 clips", [noise_clip(3, 120, 200, 6), smooth_clip(3, 120, 200, 7)], True),
    ]


# ---------------------------------------------------------------------------------------------------
# Building both processors
# ---------------------------------------------------------------------------------------------------
def _size_dict(size: Any) -> dict[str, int] | None:
    """A transformers ``SizeDict`` / dict as a plain dict without ``None`` entries."""
    if size is None:
        return None
    if not isinstance(size, dict):
        size = {k: v for k, v in vars(size).items()}
    return {k: int(v) for k, v in size.items() if v is not None}


def build(family: str):
    """``(model, processor, adapter)`` of the family's tiny zoo model (a fresh processor each call)."""
    import tokenprune
    from tokenprune.zoo import zoo_builder

    builder = zoo_builder(ZOO_NAMES[family])
    if builder is None:
        raise ModuleNotFoundError(f"no zoo entry {ZOO_NAMES[family]!r}")
    model, processor = builder()
    return model, processor, tokenprune.wrap(model, processor)


def hf_video_processor(family: str, model: Any, processor: Any, size: dict | None = None,
                       mean: Any = None, std: Any = None):
    """transformers' OWN video processor for ``family``, configured from the tiny model's config and its
    processor (patch / merge / temporal sizes, pixel budget, tile or crop size, mean / std, resample),
    ``do_sample_frames=False``. ``size`` / ``mean`` / ``std`` override those."""
    import transformers as T

    ip = processor.image_processor
    mean = list(ip.image_mean if mean is None else mean)
    std = list(ip.image_std if std is None else std)
    common = dict(image_mean=mean, image_std=std, do_sample_frames=False, resample=ip.resample)
    if family in QWEN:
        vc = model.config.vision_config
        size = size or _size_dict((getattr(processor, "videos_kwargs", None) or {}).get("size")) or _size_dict(ip.size)
        cls = T.Qwen3VLVideoProcessor if family == "qwen3_vl" else T.Qwen2VLVideoProcessor
        return cls(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                   merge_size=vc.spatial_merge_size, size=size, cap_pixels_per_frame=False, **common)
    if family == "llava_onevision":
        return T.LlavaOnevisionVideoProcessor(size=size or _size_dict(ip.size),
                                              do_center_crop=bool(getattr(ip, "do_center_crop", False)), **common)
    if family == "llava_next_video":
        return T.LlavaNextVideoVideoProcessor(size=size or _size_dict(ip.size), crop_size=_size_dict(ip.crop_size),
                                              do_center_crop=bool(getattr(ip, "do_center_crop", True)), **common)
    if family == "internvl":
        return T.InternVLVideoProcessor(size=size or _size_dict(ip.size), **common)
    raise ValueError(family)


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------
def _tensor(v: Any):
    import torch

    if torch.is_tensor(v):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
        return torch.tensor(v)
    return None


@dataclass
class Diff:
    """The comparison of two output dicts."""

    keys_same: bool = True
    shapes_same: bool = True
    ints_same: bool = True  # grids, token ids, masks, type ids: exact
    floats_same: bool = True  # non-pixel floats (second_per_grid_ts): to 1e-6
    pixel_max: float = 0.0
    pixel_mean: float = 0.0
    pixel_frac: float = 0.0  # share of pixel values differing by more than 1e-5
    notes: list[str] = field(default_factory=list)

    @property
    def structure_ok(self) -> bool:
        return self.keys_same and self.shapes_same and self.ints_same and self.floats_same


def compare(ours: dict, hf: dict, skip: tuple[str, ...] = ()) -> Diff:
    """Compare every tensor entry of ``ours`` and ``hf`` (keys in ``skip`` and keys starting ``tp_`` ignored)."""
    import torch

    d = Diff()
    ko = {k for k in ours if k not in skip and not k.startswith("tp_")}
    kh = {k for k in hf if k not in skip}
    if ko != kh:
        d.keys_same = False
        d.notes.append(f"keys only ours {sorted(ko - kh)}, only HF {sorted(kh - ko)}")
    for k in sorted(ko & kh):
        a, b = _tensor(ours[k]), _tensor(hf[k])
        if a is None or b is None:
            if k == "video_metadata":
                continue  # compared through what the processor derives from it (timestamps, second_per_grid_ts)
            if (a is None) != (b is None):
                d.notes.append(f"{k}: one side is not a tensor ({type(ours[k]).__name__} vs {type(hf[k]).__name__})")
                d.shapes_same = False
            continue
        if tuple(a.shape) != tuple(b.shape):
            d.shapes_same = False
            d.notes.append(f"{k}: shape ours {tuple(a.shape)} HF {tuple(b.shape)}")
            continue
        if k in PIXEL_KEYS:
            if a.dtype != b.dtype:
                d.notes.append(f"{k}: dtype ours {a.dtype} HF {b.dtype}")
            delta = (a.double() - b.double()).abs()
            if delta.numel():
                d.pixel_max = max(d.pixel_max, float(delta.max()))
                d.pixel_mean = max(d.pixel_mean, float(delta.mean()))
                d.pixel_frac = max(d.pixel_frac, float((delta > NO_RESIZE_TOL).double().mean()))
        elif a.is_floating_point() or b.is_floating_point():
            if not torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0):
                d.floats_same = False
                d.notes.append(f"{k}: ours {a.tolist()} HF {b.tolist()}")
        elif not torch.equal(a, b):
            d.ints_same = False
            where = (a != b).nonzero()
            d.notes.append(f"{k}: {int((a != b).sum())} entries differ, first at {where[0].tolist()}"
                           + (f" (ours {a.tolist()} HF {b.tolist()})" if a.numel() <= 12 else ""))
    return d


def capture_texts(processor: Any) -> list:
    """Record the expanded prompt texts ``processor`` tokenizes (placeholder runs, Qwen3-VL's
    ``<t seconds>`` timestamps, InternVL's ``Frame{i}:`` lines): the tiny zoo tokenizers map such text
    to ``<unk>``, so ``input_ids`` alone cannot tell two timestamps apart."""
    seen: list = []
    original = processor.get_text_with_replacements

    def wrapped(*args, **kwargs):
        text, offsets = original(*args, **kwargs)
        seen.append(list(text))
        return text, offsets

    processor.get_text_with_replacements = wrapped
    return seen


def squeeze(text: str) -> str:
    """``text`` with runs of one repeated special token written ``<tok>xN`` and newlines as ``\\n``."""
    return re.sub(r"((<[^<>]+>)\2+)", lambda m: f"{m.group(2)}x{len(m.group(1)) // len(m.group(2))}",
                  text).replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    family: str
    check: str
    case: str
    frames: str
    diff: Diff | None
    resize: bool
    error: str | None = None
    extra: str = ""

    @property
    def ok(self) -> bool:
        if self.error is not None or self.diff is None:
            return False
        if not self.diff.structure_ok:
            return False
        return self.resize or self.diff.pixel_max <= NO_RESIZE_TOL


def direct_rows(family: str) -> list[Row]:
    """Both video processors called directly, as the HF processor calls them."""
    model, processor, adapter = build(family)
    ours = adapter.video_processor()
    hf = hf_video_processor(family, model, processor)
    kwargs = dict(getattr(processor, "videos_kwargs", None) or {})
    kwargs.update(do_sample_frames=False, return_tensors="pt")
    rows = []
    for case in cases_for(family):
        try:
            call = {**copy.deepcopy(kwargs), **case.kwargs}
            a = ours([c.copy() for c in case.clips], **call)
            b = hf([c.copy() for c in case.clips], **copy.deepcopy(call))
            rows.append(Row(family, "direct", case.name, case.desc, compare(dict(a), dict(b)), case.resize))
        except Exception as e:  # noqa: BLE001 -- reported in the table, fails the run
            rows.append(Row(family, "direct", case.name, case.desc, None, case.resize, error=_err(e)))
    if family in QWEN:
        # The HF processor asks the video processor for token counts (_get_num_multimodal_tokens): ours
        # must give the patch count HF's processing actually produces (its grid). HF's own count is
        # shown where it disagrees with its own processing (a transformers inconsistency, not ours).
        for case in cases_for(family):
            call = {**copy.deepcopy(kwargs), **case.kwargs}
            vk = {k: v for k, v in call.items() if k in ("size", "cap_pixels_per_frame", "max_video_tokens")}
            for c in case.clips:
                t, h, w = c.shape[:3]
                try:
                    grid = hf([c.copy()], **copy.deepcopy(call))["video_grid_thw"][0]
                    actual = int(grid.prod())
                    n_ours = ours.get_num_of_video_patches(t, h, w, dict(vk))
                    n_hf = hf.get_num_of_video_patches(t, h, w, dict(vk))
                    d = Diff(ints_same=n_ours == actual)
                    d.notes.append(f"get_num_of_video_patches: ours {n_ours}, HF-processed grid {grid.tolist()} = "
                                   f"{actual}" + ("" if n_hf == actual else f"; HF's own get_num_of_video_patches "
                                                  f"{n_hf} disagrees with HF's processing (transformers)"))
                    if n_ours != actual or n_hf != actual:
                        rows.append(Row(family, "num_patches", case.name, f"{t}x{h}x{w}", d, True))
                except Exception as e:  # noqa: BLE001
                    rows.append(Row(family, "num_patches", case.name, f"{t}x{h}x{w}", None, True, error=_err(e)))
    return rows


def processor_rows(family: str) -> list[Row]:
    """The full HF processor: ours through ``adapter.prepare`` (the project's path), HF's video
    processor attached to a copy of the same processor, called with the same text and video kwargs."""
    from tokenprune.media import Video

    rows = []
    for case in cases_for(family):
        if case.kwargs:
            continue
        if family not in QWEN and len({c.shape for c in case.clips}) > 1:
            continue  # these processors stack a batch's clips into one tensor: one frame shape per batch
        try:
            model, processor, adapter = build(family)
            hf_proc = copy.deepcopy(processor)
            hf_proc.video_processor = hf_video_processor(family, model, processor)
            # fps 4, every third source frame: timestamps and second_per_grid_ts are not trivial
            videos = [Video.from_frames(c, fps=4.0, indices=[3 * i for i in range(len(c))], total_frames=3 * len(c))
                      for c in case.clips]
            prompts = ["describe the video ."] * len(videos)
            ours_texts = capture_texts(processor)  # adapter.prepare calls this very processor
            hf_texts = capture_texts(hf_proc)
            ours = adapter.prepare(videos, prompts)
            texts = adapter.prompt_texts(prompts, visuals=videos)
            kwargs = adapter.video_inputs(videos)
            hf = hf_proc(text=texts, padding=True, return_tensors="pt", **kwargs)
            diff = compare(dict(ours), dict(hf))
            if ours_texts != hf_texts:
                diff.ints_same = False
                diff.notes.append("expanded prompt text differs")
            extra = ""
            if family == "qwen3_vl" or ours_texts != hf_texts:
                extra = "HF text:   " + squeeze(hf_texts[-1][0] if hf_texts else "(none)")
                if ours_texts != hf_texts:
                    extra += "\n" + " " * 19 + "ours text: " + squeeze(ours_texts[-1][0] if ours_texts else "(none)")
            rows.append(Row(family, "processor", case.name, case.desc, diff, case.resize, extra=extra))
        except Exception as e:  # noqa: BLE001
            rows.append(Row(family, "processor", case.name, case.desc, None, case.resize, error=_err(e)))
    return rows


def saved_settings_rows(family: str) -> list[Row]:
    """Qwen: a checkpoint folder holding a saved ``video_preprocessor_config.json`` (a pixel budget and
    mean / std unlike the image processor's), found by the adapter through ``tokenizer.name_or_path``
    as for a hub checkpoint; ours from ``adapter.video_processor()`` vs transformers' loaded from it."""
    if family not in QWEN:
        return []
    import transformers as T

    model, processor, adapter = build(family)
    unit = (model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size) ** 2
    size = {"shortest_edge": unit * 6, "longest_edge": unit * 40}
    saved = hf_video_processor(family, model, processor, size=size, mean=[0.25, 0.5, 0.75], std=[0.2, 0.3, 0.4])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved.save_pretrained(tmp)
        cls = T.Qwen3VLVideoProcessor if family == "qwen3_vl" else T.Qwen2VLVideoProcessor
        hf = cls.from_pretrained(tmp)
        processor.tokenizer.name_or_path = tmp
        for case in cases_for(family)[:3]:
            try:
                ours = adapter.video_processor()
                a = ours([c.copy() for c in case.clips], do_sample_frames=False, return_tensors="pt")
                b = hf([c.copy() for c in case.clips], do_sample_frames=False, return_tensors="pt")
                # the saved budget (6..40 tokens' worth of pixels, Qwen3-VL over t*h*w) still holds the "at
                # size" clips, so they are not resized; the saved mean / std differ from the image processor's
                d = compare(dict(a), dict(b))
                rows.append(Row(family, "saved cfg", case.name, case.desc, d, case.resize,
                                extra=f"ours: {ours!r}" if not d.structure_ok else ""))
            except Exception as e:  # noqa: BLE001
                rows.append(Row(family, "saved cfg", case.name, case.desc, None, case.resize, error=_err(e)))
    return rows


def _err(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{f.filename.split('/work/main/')[-1]}:{f.lineno}" for f in reversed(tb) if "/work/main/" in f.filename),
                 f"{tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}" if tb else "?")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{where}]"


def kernel_rows() -> list[str]:
    """Diagnostic (no pass / fail): on uint8 noise, how far each torch-only bicubic resize is from what
    transformers' CPU video path runs (torchvision's native uint8 bicubic + antialias kernel, which like
    PIL resizes width first and rounds / clamps to uint8 between the two passes) and from PIL (the
    image processors' backend), in grey levels."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    def one_pass(x, size):
        return F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)

    def two_pass(x, size):  # width, then height, uint8 in between
        x = one_pass(x, (x.shape[-2], size[1]))
        return one_pass(x, size)

    lines = [f"{'resize (noise, uint8)':<24}{'one-pass vs tv':>16}{'two-pass vs tv':>16}{'one-pass vs PIL':>17}"
             f"{'two-pass vs PIL':>17}{'tv vs PIL':>11}   (max |grey-level| difference)"]
    for (H, W), (h, w) in [((50, 70), (48, 64)), ((50, 70), (40, 40)), ((50, 70), (64, 96)), ((120, 200), (96, 160))]:
        a = noise_clip(1, H, W, H * W)[0]
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None]
        tv = tvF.resize(x, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True).double()
        pil = torch.from_numpy(np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)).copy()).permute(2, 0, 1)[None].double()
        o, t = one_pass(x, (h, w)).double(), two_pass(x, (h, w)).double()
        m = lambda u, v: int((u - v).abs().max())  # noqa: E731
        lines.append(f"{f'{H}x{W} -> {h}x{w}':<24}{m(o, tv):>16}{m(t, tv):>16}{m(o, pil):>17}{m(t, pil):>17}{m(tv, pil):>11}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def ready(family: str) -> str | None:
    """``None`` when the family's pieces import, else why not."""
    import importlib

    module = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "llava_onevision": "frames",
              "llava_next_video": "frames", "internvl": "internvl"}[family]
    try:
        importlib.import_module(f"tokenprune.media.processors.{module}")
        from tokenprune.zoo import zoo_builder

        if zoo_builder(ZOO_NAMES[family]) is None:
            return f"no zoo entry {ZOO_NAMES[family]}"
    except Exception as e:  # noqa: BLE001
        return _err(e)
    return None


def print_table(rows: list[Row]) -> None:
    head = f"{'family':<17}{'check':<12}{'case':<28}{'frames (TxHxW per clip)':<28}{'keys':<5}{'shapes':<7}" \
           f"{'ints':<5}{'floats':<7}{'max|d|':>10}{'mean|d|':>10}{'>1e-5':>7}  result"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.diff is None:
            print(f"{r.family:<17}{r.check:<12}{r.case:<28}{r.frames:<28}ERROR {r.error}")
            continue
        d = r.diff
        yn = lambda b: "yes" if b else "NO"  # noqa: E731
        result = "ok" if r.ok else "FAIL"
        if r.ok and r.resize:
            result = "ok (resize)"
        print(f"{r.family:<17}{r.check:<12}{r.case:<28}{r.frames:<28}{yn(d.keys_same):<5}{yn(d.shapes_same):<7}"
              f"{yn(d.ints_same):<5}{yn(d.floats_same):<7}{d.pixel_max:>10.3g}{d.pixel_mean:>10.3g}"
              f"{d.pixel_frac:>7.1%}  {result}")
        for n in d.notes:
            print(f"{'':<17}  note: {n}")
        if r.extra:
            print(f"{'':<17}  {r.extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    p.add_argument("--strict", action="store_true", help="a family that is not ready yet fails the run")
    args = p.parse_args(argv)
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"torchvision does not import ({_err(e)}): run this in the side environment, see the module docstring")
        return 2
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    rows: list[Row] = []
    skipped = []
    for fam in families:
        why = ready(fam)
        if why:
            skipped.append((fam, why))
            continue
        for check in (direct_rows, processor_rows, saved_settings_rows):
            try:
                rows += check(fam)
            except Exception as e:  # noqa: BLE001
                rows.append(Row(fam, check.__name__.replace("_rows", ""), "(setup)", "", None, False, error=_err(e)))
    print_table(rows)
    for fam, why in skipped:
        print(f"SKIP {fam}: {why}")
    print()
    print("\n".join(kernel_rows()))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows ok, {len(skipped)} families skipped; "
          f"no-resize pixel tolerance {NO_RESIZE_TOL:g}; resize cases: structure must match, pixels reported only")
    return 1 if failed or (args.strict and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
