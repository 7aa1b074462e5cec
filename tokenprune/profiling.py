"""Costs of one ``generate`` call measured from outside the model: the pruner's own time, the KV cache
at the end of prefill, and peak memory.

Nothing here changes what a run computes; each probe wraps or hooks for the length of a ``with`` block
and leaves the pruner and the model exactly as they were:

* :func:`time_pruner` -- wall clock inside the pruner's entry points (``select``, ``token_scores``,
  ``view_scores``, ``choose_queries``, ``decode_select``: its scoring and selection; the forward passes
  whose attention it reads are the model's, not its own), outermost calls only, CUDA-synchronised at
  both ends of each call on a GPU (that adds syncs inside the prefill; off CUDA nothing syncs).
* :func:`kv_probe` -- forward hooks on the decoder layers: after each layer's first call (its
  prefill) the hook reads what that layer's KV cache holds -- bytes per cached token from the cache
  tensors themselves (``keys`` and ``values``: kv heads x head dim x element size) times each row's
  real entries (the prefill's 4-D mask row of the last query, which sees every real key; padding of
  a batch is not counted; a layer called without a mask -- an unpadded batch under SDPA's implicit
  causal mask -- has every cached entry real). No host sync in the hot path: counts stay on the device until the end.
  A decode plan's cut after prefill (MustDrop) is not in it (``SampleStats.cache_per_layer`` says
  what the cut kept).
* :func:`peak_memory` -- on CUDA, ``torch.cuda.max_memory_allocated`` over the block (absolute: the
  weights are in it; summed over the model's GPUs); on CPU, the process's peak resident set over the block minus its resident set
  at the start (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, freed heap
  returned with ``malloc_trim`` first): what the block needed beyond what the process already held.
  The two are different quantities and are reported under different names.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

TIMED = ("select", "token_scores", "view_scores", "choose_queries", "decode_select")
_MISSING = object()


@dataclass
class PrunerTime:
    """Seconds spent inside the pruner's entry points (outermost calls) and how many calls."""

    seconds: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def time_pruner(pruner: Any, sync: Callable[[], None] = lambda: None) -> Iterator[PrunerTime]:
    """Time every call of ``pruner``'s :data:`TIMED` methods inside the block (``None``: nothing).

    ``sync`` waits for the device (CUDA) before and after each outermost call. The methods are
    shadowed by instance attributes (composes with :func:`tokenprune.visualize.record.record_kept`,
    entered before this) and restored on exit.
    """
    out = PrunerTime()
    if pruner is None:
        yield out
        return
    depth = [0]
    saved = {name: pruner.__dict__.get(name, _MISSING) for name in TIMED if hasattr(pruner, name)}

    def timed(fn):
        def call(*args, **kwargs):
            if depth[0]:  # a nested entry point (select calling token_scores): the outer call counts it
                return fn(*args, **kwargs)
            depth[0] += 1
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                out.seconds += time.perf_counter() - t0
                out.calls += 1
                depth[0] -= 1
        return call

    for name in saved:
        setattr(pruner, name, timed(getattr(pruner, name)))
    try:
        yield out
    finally:
        for name, old in saved.items():
            if old is _MISSING:
                delattr(pruner, name)
            else:
                setattr(pruner, name, old)


@dataclass
class KVCache:
    """The KV cache at the end of prefill, per batch row.

    ``tokens[b][i]``: real entries layer ``i`` cached for row ``b``; ``token_bytes[i]``: bytes one
    cached token costs in layer ``i`` (keys + values, read from the tensors). Empty if the block ran
    no cached prefill.
    """

    tokens: list[list[int]] = field(default_factory=list)
    token_bytes: list[int] = field(default_factory=list)

    def bytes(self, row: int) -> int:
        """Bytes row ``row`` holds in the cache, summed over layers."""
        return sum(n * b for n, b in zip(self.tokens[row], self.token_bytes)) if self.tokens else 0

    def groups(self, row: int) -> list[list[int]]:
        """``[[first layer, last layer, tokens per layer, bytes of the group], ...]``: consecutive
        layers that cache alike (a stage of an in-LLM method starts a new group)."""
        out: list[list[int]] = []
        for i, (n, b) in enumerate(zip(self.tokens[row] if self.tokens else [], self.token_bytes)):
            if out and out[-1][2] == n and self.token_bytes[out[-1][0]] == b:
                out[-1][1] = i
                out[-1][3] += n * b
            else:
                out.append([i, i, n, n * b])
        return out


def _token_bytes(cache_layer: Any) -> int:
    """Bytes of one cached token of one row in a cache layer: keys ``[B, H, L, d]`` plus values."""
    k, v = cache_layer.keys, cache_layer.values
    return int(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size())


@contextlib.contextmanager
def kv_probe(layers: nn.ModuleList | list[nn.Module]) -> Iterator[KVCache]:
    """Read each decoder layer's KV cache right after its first call in the block (the prefill).

    ``layers``: the decoder layers in order (``lvlm.runner.layers``); each is called with
    ``past_key_values`` (a ``DynamicCache``) and a 4-D boolean ``attention_mask`` ``[B, 1, q, K]``.
    The result is filled when the block exits.
    """
    out = KVCache()
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def hook(i: int):
        def after(module, args, kwargs, output):
            # the cache keyword the decoder uses: `past_key_values` (transformers < 5.40) or its successor `cache`
            cache = next((kwargs[k] for k in ("past_key_values", "cache", "past_key_value") if kwargs.get(k) is not None), None)
            mask = kwargs.get("attention_mask")
            if i in seen or cache is None or len(getattr(cache, "layers", ())) <= i:
                return
            layer = cache.layers[i]
            keys = getattr(layer, "keys", None)
            if keys is None or keys.dim() != 4:
                return
            if mask is None:  # an unpadded batch under SDPA's implicit causal mask: every cached entry is real
                hidden = args[0] if args else kwargs.get("hidden_states")
                if hidden is None or hidden.shape[1] != keys.shape[2]:
                    return  # not a prefill over the whole sequence (nothing we can read honestly)
                seen[i] = (torch.full((keys.shape[0],), keys.shape[2], device=keys.device), _token_bytes(layer))
                return
            if mask.dim() != 4 or keys.shape[2] != mask.shape[-1]:
                return  # not a prefill over this mask
            seen[i] = (mask[:, 0, -1, :].sum(-1), _token_bytes(layer))  # stays on the device: no sync here
        return after

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        if seen and len(seen) == len(layers):
            counts = torch.stack([seen[i][0].to("cpu") for i in range(len(layers))], 1)  # [B, n_layers]
            out.tokens = counts.tolist()
            out.token_bytes = [seen[i][1] for i in range(len(layers))]


@dataclass
class PeakMemory:
    """``cuda_mb``: CUDA's peak allocated over the block (absolute), ``None`` off CUDA; ``cpu_rss_delta_mb``:
    peak resident set over the block minus the resident set at its start, ``None`` on CUDA or where
    Linux' ``clear_refs`` is unavailable."""

    cuda_mb: float | None = None
    cpu_rss_delta_mb: float | None = None


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the start-of-block RSS is what is really live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(devices: Any) -> Iterator[PeakMemory]:
    """Peak memory over the block (see :class:`PeakMemory`) on ``devices`` (one device, or the model's:
    :func:`tokenprune.adapters.devices.model_devices`). CUDA: the sum over the CUDA devices of each one's
    peak allocated (a model spread over several GPUs); no CUDA device: the CPU figure."""
    devs = [torch.device(d) for d in (devices if isinstance(devices, (list, tuple)) else [devices])]
    cuda = list(dict.fromkeys(d for d in devs if d.type == "cuda"))
    out = PeakMemory()
    if cuda:
        for d in cuda:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        try:
            yield out
        finally:
            for d in cuda:
                torch.cuda.synchronize(d)
            out.cuda_mb = sum(torch.cuda.max_memory_allocated(d) for d in cuda) / 2**20
        return
    _trim_heap()
    start = _status_kb("VmRSS")
    ok = start is not None and _reset_hwm()
    try:
        yield out
    finally:
        peak = _status_kb("VmHWM") if ok else None
        if peak is not None:
            out.cpu_rss_delta_mb = max(peak - start, 0) / 1024


__all__ = ["KVCache", "PeakMemory", "PrunerTime", "TIMED", "kv_probe", "peak_memory", "time_pruner"]
