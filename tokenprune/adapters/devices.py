"""Models spread over several devices or offloaded (accelerate's ``device_map``).

``from_pretrained(..., device_map=...)`` and ``accelerate.dispatch_model`` put an ``AlignDevicesHook``
(``module._hf_hook``) on the modules of the map. Its ``pre_forward`` moves a module's inputs to the
module's *execution device* and, for a CPU- or disk-offloaded module, loads the weights that sit on
the ``meta`` device between calls; ``post_forward`` offloads them again. Where the hooks sit depends
on the dispatch: with the default one (what ``from_pretrained`` does) every submodule of an
offloaded decoder layer that owns weights has its own loading hook (``q_proj``, ``input_layernorm``,
...) and the layer's hook only moves inputs; with ``preload_module_classes`` (what
:func:`dispatch` uses for zoo models) the decoder layer's hook loads the whole layer and its
submodules have none. Code that uses a layer's submodules outside the layer's own forward runs
under :func:`run_as` so that it is right for both.

This module also places zoo models (built in code, not with ``from_pretrained``) with a
``device_map``: :func:`dispatch`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import TokenpruneError

POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _as_device(device: Any) -> torch.device:
    """``torch.device`` of an accelerate device spec (an ``int`` is an accelerator index)."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        kind = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        return torch.device(kind.type if kind is not None else "cuda", device)
    return torch.device(device)


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` unrolled), innermost last."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's ``execution_device`` if it is
    dispatched, else the device of its first parameter (or buffer) that is not on ``meta``; ``cpu``
    for a module without any."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return _as_device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def model_devices(*modules: nn.Module) -> list[torch.device]:
    """Every device the modules compute on (hooks' execution devices and placed tensors), sorted."""
    found: set[torch.device] = set()
    for top in modules:
        for m in top.modules():
            for hook in _hooks(m):
                if getattr(hook, "execution_device", None) is not None:
                    found.add(_as_device(hook.execution_device))
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                if t.device.type != "meta":
                    found.add(t.device)
    return sorted(found, key=str)


def synchronizer(devices: Iterable[torch.device]) -> Callable[[], None]:
    """A function that waits for the queued work of every CUDA device in ``devices`` (timing
    boundaries; a no-op without CUDA devices)."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})

    def sync() -> None:
        for index in cuda:
            torch.cuda.synchronize(index)

    return sync


def run_as(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as ``module``'s forward would be: under its accelerate hook.

    For code that uses ``module``'s submodules or weights outside ``module.forward`` (e.g. a
    decoder layer's input norm and q/k projections). The hook moves the tensors in ``args`` /
    ``kwargs`` to the module's execution device and loads offloaded weights before ``fn``, and
    offloads them again after it; the result stays on the execution device. A plain call for a
    module that is not dispatched.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return fn(*args, **kwargs)
    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    return hook.post_forward(module, fn(*args, **kwargs))


def on_input_device(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` itself if it is not dispatched, else a callable that runs it (its hook moves the
    input to its execution device and loads offloaded weights) and returns the result on the input's
    device. Given to pruners as ``final_norm``: a pruner computes on one device, the norm may live on
    another."""
    if getattr(module, "_hf_hook", None) is None:
        return module

    def call(x: torch.Tensor) -> torch.Tensor:
        return module(x).to(x.device)

    return call


# -- placing zoo models ----------------------------------------------------------------------------------
def _bad(msg: str) -> TokenpruneError:
    return TokenpruneError(f"bad device_map: {msg}")


def _check_value(name: str, value: Any) -> Any:
    """A device-map value as accelerate takes it (``"disk"``, an int, a device string)."""
    if value == "disk":
        return value
    device = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        device = torch.device("cuda", value)
    elif isinstance(value, (str, torch.device)):
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            pass
    if device is not None:
        _check_exists(name, device)
        return value if isinstance(value, int) else str(device)
    raise _bad(f"{name!r} is mapped to {value!r}; use 'cpu', 'disk', a GPU index or a device such as 'cuda:1'")


def _check_exists(name: str, device: torch.device) -> None:
    """A CUDA device this machine has (accelerate would fail deep inside ``model.to``)."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        where = f"{name!r} is mapped to {device}" if name else f"{device}"
        raise _bad(f"{where}, but this machine has {count} CUDA device(s)"
                   + ("" if count else " (a CPU build of torch, or no GPU visible): use 'cpu' or 'disk'"))


def check_device_map(device_map: Any) -> None:
    """Fail early (one line) on a ``device_map`` that is neither a policy, a device nor a mapping."""
    if isinstance(device_map, str) and device_map in POLICIES:
        return
    if isinstance(device_map, Mapping):
        if not device_map:
            raise _bad("the mapping is empty")
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise _bad(f"keys are module names, got {key!r}")
            _check_value(key, value)
        return
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool) and device_map != "disk":
        try:
            parsed = isinstance(device_map, int) or bool(torch.device(device_map))
        except (RuntimeError, TypeError):
            parsed = False
        if parsed:
            _check_value("", device_map)  # a device: does this machine have it?
            return
    raise _bad(f"{device_map!r}; use {', '.join(POLICIES)}, one device ('cpu', 'cuda:1', 0) or a mapping "
               "{module name: device or 'disk'}")


def dispatch(model: nn.Module, device_map: Any, max_memory: Mapping | None = None, offload_folder: str | None = None,
             offload_buffers: bool = False) -> nn.Module:
    """Place a model built in code the way ``from_pretrained(device_map=...)`` places a loaded one.

    Args:
        model: the model, every weight on the CPU.
        device_map: ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` (accelerate's
            ``infer_auto_device_map`` over ``max_memory``, decoder layers never split), one device
            (``"cpu"``, ``"cuda:1"``, ``0``) for the whole model, or a mapping of module names to
            devices or ``"disk"``, used as given (it must cover every weight).
        max_memory: per-device budgets for the policies (``{0: "10GiB", "cpu": "30GiB"}``).
        offload_folder: where ``"disk"`` modules' weights are written (required if any is).
        offload_buffers: offload buffers with the weights.

    Returns the model, with accelerate hooks where the map needs them and ``hf_device_map`` set.
    Tied weights (an LM head tied to the input embeddings) stay tied.
    """
    check_device_map(device_map)
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory, offload_state_dict
        from accelerate.utils.modeling import check_device_map as accelerate_check
    except ImportError:  # pragma: no cover - accelerate is installed with transformers' extras
        raise TokenpruneError("device_map needs accelerate: pip install accelerate") from None
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str) and device_map in POLICIES:
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    elif not isinstance(device_map, Mapping):
        device_map = {"": _check_value("", device_map)}
    device_map = {k: _check_value(k, v) for k, v in device_map.items()}
    names = {*dict(model.named_modules()), *model.state_dict()}  # modules, or a module's own weights
    unknown = [k for k in device_map if k != "" and k not in names]
    if unknown:
        raise _bad(f"no module or weight named {', '.join(map(repr, unknown[:3]))} in {type(model).__name__}")
    try:
        accelerate_check(model, device_map)
    except ValueError as exc:
        raise _bad(str(exc).splitlines()[0][:300]) from None
    disk = [k for k, v in device_map.items() if v == "disk"]
    if disk and offload_folder is None:
        raise _bad(f"{', '.join(disk[:3])} {'is' if len(disk) == 1 else 'are'} mapped to 'disk'; give offload_folder")
    if disk:  # written here, not by dispatch_model: it would reuse an older index.json in the folder
        state = model.state_dict()
        offload_state_dict(offload_folder, {k: v for k, v in state.items()
                                            if any(k == m or k.startswith(m + ".") or m == "" for m in disk)})
    skip = getattr(model, "_skip_keys_device_placement", None)  # the KV cache is never moved
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder, offload_buffers=offload_buffers,
                          skip_keys=sorted(skip) if skip else None, preload_module_classes=no_split or None)
