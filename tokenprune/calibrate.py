"""``tokenprune calibrate vtw``: find VTW's withdrawal layer K for a model, as the official ``--findk`` does.

Official rule (``lzhxmu/VTW@a3d8cfc``): ``llava/model/language_model/VTW.py`` ``VTWLlamaModel.forward``
L234-265 reruns, for every ``drop_layer_idx in range(5, len(self.layers))``, the whole prefill without a
cache, withdrawing the image tokens at that layer, and keeps the final-norm hidden state of the last
token; ``VTWLlamaForCausalLM.forward`` L102-107 turns each into logits and appends, per sample,
``[KLDivLoss(reduction="batchmean")(log_softmax(full[:, -1]), softmax(withdrawn_d)) for d]``, i.e.
``KL(withdrawn || full)`` of the next-token distribution after the prompt; ``lmms_eval/__main__.py``
L386-400 averages over the samples (README: ``--limit 20``, ``scienceqa_img``) and prints
``k = 5 + first index with mean KL <= eta``, ``eta`` 0.0005 for ``llava-v1.5-13b``, 0.003 for
``llava-v1.5-7b``, 0.0001 for ``llava-v1.6-vicuna-7b``, else 0.003 (matched on the model id, lower-cased).

Here each withdrawn prefill is :meth:`~tokenprune.adapters.base.PrunableLVLM.generate` with ``vtw:k=d`` and one
new token (its ``first_logits`` are the logits after the prompt), the full one the unpruned model; the
vision pass is shared (``encoded=``). Differences: samples go through in batches (``--batch-size``; batch of
2 == alone is tested for in-LLM pruners), the logits are float32 (official: the model's dtype, fp16), and when
no layer reaches ``eta`` the command says so in one line and stores nothing (official: an ``IndexError``).

K is stored in ``<cache dir>/vtw_k.json`` (:func:`tokenprune.zoo.demo.cache_dir`), one entry per model id with
the model's fingerprint (:func:`model_fingerprint`), so ``vtw`` with no ``k`` finds it on the same weights
however they were loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError, TokenpruneError

START = 5  # the official search starts withdrawing at layer 5 (VTW.py L236)
LIMIT = 20  # README: --limit 20
STORE = "vtw_k.json"
# lmms_eval/__main__.py L389-396: eta by a substring of the model id (lower-cased), else 0.003.
OFFICIAL_ETA = (("llava-v1.5-13b", 0.0005), ("llava-v1.5-7b", 0.003), ("llava-v1.6-vicuna-7b", 0.0001))
DEFAULT_ETA = 0.003


def official_eta(model_id: str) -> float:
    """The official ``eta`` for ``model_id`` (the first matching branch of ``__main__.py``'s if-chain)."""
    low = model_id.lower()
    for key, eta in OFFICIAL_ETA:
        if key in low:
            return eta
    return DEFAULT_ETA


def store_path() -> Path:
    """``<tokenprune cache dir>/vtw_k.json``."""
    from .zoo.demo import cache_dir

    return cache_dir() / STORE


def model_fingerprint(text_model: nn.Module) -> str:
    """A short hash of a decoder's weights: depth, the final norm, the first rows of the first matrix of the
    first and the last layer (a LoRA merged into attention changes them). Same weights, same fingerprint,
    whether loaded by zoo name, path or hub id."""
    layers = text_model.layers
    h = hashlib.sha256(f"layers={len(layers)}".encode())
    tensors = [getattr(getattr(text_model, "norm", None), "weight", None)]
    for layer in (layers[0], layers[-1]):
        tensors.append(next((p for p in layer.parameters() if p.dim() == 2), None))
    for t in tensors:
        if t is None:
            continue
        if t.is_meta:  # offloaded to disk by a device map: its shape is all there is to read here
            h.update(repr(tuple(t.shape)).encode())
            continue
        t = t.detach()
        t = t[:4] if t.dim() == 2 else t
        h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_store() -> dict[str, Any]:
    path = store_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenpruneError(f"cannot read {path}: {exc}; delete it and rerun tokenprune calibrate vtw") from None
    return data if isinstance(data, dict) else {}


def stored_k(model: str | None = None, fingerprint: str | None = None) -> int | None:
    """The stored K for the model id ``model``, else for the weights with ``fingerprint`` (the latest entry);
    ``None`` if there is none."""
    entries = _read_store()
    if model is not None:
        entry = entries.get(model)
        return None if entry is None else int(entry["k"])
    if fingerprint is not None:
        matches = [e for e in entries.values() if e.get("fingerprint") == fingerprint]
        if matches:
            return int(max(matches, key=lambda e: e.get("time", 0))["k"])
    return None


def store_k(model: str, k: int, fingerprint: str, **info: Any) -> Path:
    """Store K for ``model`` (replacing an earlier entry); returns the file."""
    entries = _read_store()
    entries[model] = {"k": int(k), "fingerprint": fingerprint, "time": time.time(), **info}
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def kl_withdrawn_vs_full(full: torch.Tensor, withdrawn: torch.Tensor) -> torch.Tensor:
    """``[B]``: per sample, ``KLDivLoss(reduction="batchmean")(log_softmax(full), softmax(withdrawn))`` on one
    row (the official batch of 1), i.e. ``KL(withdrawn || full)``. ``full``, ``withdrawn``: ``[B, V]`` logits."""
    log_full = F.log_softmax(full.float(), dim=-1)
    p = F.softmax(withdrawn.float(), dim=-1)
    # F.kl_div(input, target) = target * (log target - input), with 0 where target == 0
    return F.kl_div(log_full, p, reduction="none").sum(-1)


def first_below(mean_kl: Sequence[float], eta: float, start: int = START) -> int | None:
    """``start + `` the first index whose mean KL is ``<= eta``, ``None`` if none is."""
    for i, v in enumerate(mean_kl):
        if v <= eta:
            return start + i
    return None


@torch.no_grad()
def layer_kl(lvlm: Any, visuals: Sequence[Any], prompts: Sequence[str], start: int = START, batch_size: int = 8,
             sample_ids: Sequence[str] | None = None, progress: Any = None) -> torch.Tensor:
    """``[S, L - start]``: for each sample and each layer ``d = start..L-1``, the KL divergence of the next-token
    distribution after the prompt with the visual tokens withdrawn at ``d`` from the full one."""
    from .pruner import PrunerNeeds, create_pruner

    n_layers = len(lvlm.runner.layers)
    if not 1 <= start < n_layers:
        raise OptionError(f"--start must be in 1..{n_layers - 1} on this {n_layers}-layer decoder, got {start}")
    ids = [str(s) for s in sample_ids] if sample_ids is not None else [str(i) for i in range(len(prompts))]
    rows = []
    for lo in range(0, len(prompts), batch_size):
        vis, pr, sid = visuals[lo:lo + batch_size], prompts[lo:lo + batch_size], ids[lo:lo + batch_size]
        enc = lvlm.encode(vis, pr, PrunerNeeds())  # in-LLM pruners need no vision extras: one pass for all layers
        full = lvlm.generate(vis, pr, max_new_tokens=1, encoded=enc, sample_ids=sid).first_logits
        cols = []
        for d in range(start, n_layers):
            out = lvlm.generate(vis, pr, pruner=create_pruner("vtw", k=d), max_new_tokens=1, encoded=enc, sample_ids=sid)
            cols.append(kl_withdrawn_vs_full(full, out.first_logits))
            if progress is not None:
                progress(len(vis))
        rows.append(torch.stack(cols, 1))
    return torch.cat(rows, 0)


# -- the command -----------------------------------------------------------------------------------
def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tokenprune calibrate`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "calibrate", help="calibrate a method's model-specific constant (vtw: its withdrawal layer K)",
        description="vtw: withdraw the visual tokens at each decoder layer from --start on, over --limit samples of "
                    "--task; K = the first layer whose mean KL divergence (withdrawn vs full next-token distribution) "
                    "is <= --eta, as the official --findk. Prints the KL per layer and stores K for the model under "
                    "the tokenprune cache dir; `vtw` with no k then uses it.")
    p.add_argument("method", choices=["vtw"], help="the method to calibrate")
    p.add_argument("--model", default="tokenprune-demo", help="tokenprune.load id or path, or a zoo model (default: tokenprune-demo)")
    p.add_argument("--task", required=True, help="task whose samples calibrate (official: scienceqa_img); see `tokenprune list tasks`")
    p.add_argument("--limit", type=int, default=LIMIT, help=f"samples (the task's first ones; official {LIMIT})")
    p.add_argument("--eta", type=float, help="KL threshold (default: the official one for the model id, else 0.003)")
    p.add_argument("--start", type=int, default=START, help=f"first layer tried (official {START})")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward (default 8)")
    p.add_argument("--data-dir", help="local copy of the task's dataset")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16, float16")
    p.add_argument("--no-store", action="store_true", help="print K without storing it")
    p.set_defaults(func=run_calibrate)
    return p


def _load(model: str, device: str, dtype: str) -> Any:
    import tokenprune as tp

    kwargs: dict[str, Any] = {}
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise OptionError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        kwargs["dtype"] = getattr(torch, dtype)
    lvlm = tp.load(model, **kwargs)
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if str(lvlm.device) != target:
        lvlm.model.to(target)
    return lvlm


def run_calibrate(args: argparse.Namespace) -> int:
    """``tokenprune calibrate vtw``: print the KL per layer and K; store K for the model."""
    from .benchmarks.tasks import get_task

    if args.limit < 1:
        raise OptionError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    eta = official_eta(args.model) if args.eta is None else args.eta
    if not eta >= 0:
        raise OptionError(f"--eta must be a number >= 0, got {args.eta}")
    task = get_task(args.task)
    data = list(task.load(data_dir=args.data_dir, limit=args.limit))
    if not data:
        raise OptionError(f"task {args.task} gave no samples")
    lvlm = _load(args.model, args.device, args.dtype)
    n_layers = len(lvlm.runner.layers)
    if not 1 <= args.start < n_layers:
        raise OptionError(f"--start must be in 1..{n_layers - 1} on this {n_layers}-layer decoder, got {args.start}")
    print(f"tokenprune calibrate vtw: {args.model} ({n_layers} decoder layers) | {args.task}, first {len(data)} samples | "
          f"withdrawing at layers {args.start}..{n_layers - 1} | eta {eta:g}", flush=True)
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=len(data) * (n_layers - args.start), desc="withdrawn prefills", unit="prefill",
              dynamic_ncols=True) as bar:
        kl = layer_kl(lvlm, [s.image for s in data], [task.prompt(s) for s in data], start=args.start,
                      batch_size=args.batch_size, sample_ids=[s.id for s in data], progress=bar.update)
    mean = kl.mean(0)  # official: torch.tensor(KL_di_total).mean(dim=0)
    k = first_below(mean.tolist(), eta, args.start)
    print(f"{'layer':>5} {'mean KL':>10} {'min':>10} {'max':>10}")
    for i, v in enumerate(mean.tolist()):
        mark = "  <- K" if k == args.start + i else ""
        print(f"{args.start + i:>5} {v:>10.6f} {kl[:, i].min().item():>10.6f} {kl[:, i].max().item():>10.6f}{mark}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if k is None:
        raise TokenpruneError(f"no layer in {args.start}..{n_layers - 1} reaches mean KL <= eta={eta:g} (smallest "
                              f"{mean.min().item():.6f} at layer {args.start + int(mean.argmin())}); nothing stored: "
                              "raise --eta or calibrate on more samples")
    print(f"K = {k}: visual tokens withdrawn from layer {k} on ({k} of {n_layers} layers see them, "
          f"{k / n_layers:.1%} of the visual tokens per layer on average)")
    if not args.no_store:
        path = store_k(args.model, k, model_fingerprint(lvlm.runner.model), eta=eta, task=args.task, limit=len(data),
                       start=args.start, num_layers=n_layers, mean_kl=[round(v, 8) for v in mean.tolist()])
        print(f"stored in {path}: `vtw` (no k) uses K = {k} on {args.model}")
    return 0
