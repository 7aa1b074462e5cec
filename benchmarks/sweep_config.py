"""A sweep's configuration and its run plan: what ``tokenprune bench`` was asked for (``SweepConfig``,
read from YAML and flags), which (method, ratio) runs that means, and each method's pruner.

Its own module so that the runner (:mod:`.sweep`) and the reports (:mod:`.report`) both import it,
not each other."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import OptionError, TokenpruneError, UnknownNameError
from ..pruner import PRUNERS, TokenPruner, parse_pruner_spec, pruner_from_spec, validate_ratio
from .distributed import Shard
from . import results

DEFAULT_MODEL = "tokenprune-demo"
# The default (demo) run, sized so that set-up + run finish in < 5 min on 2 CPU cores: a seeded subset
# (--limit all for whole splits), at the two ratios where methods part (at 0.5 they all tie on the demo).
DEFAULT_LIMIT = 200
DEFAULT_RATIOS = (0.25, 0.1)
REFERENCE = "none"  # the unpruned model, always run once at ratio 1.0
# Fields that define what a sweep computes; a rerun in the same directory must match them.
IDENTITY = ("model", "tasks", "methods", "ratios", "limit", "seed", "dtype", "position_policy", "max_new_tokens",
            "task_options")


@dataclass
class SweepConfig:
    """Everything ``tokenprune bench`` needs; built from defaults, then ``--config`` YAML, then flags.

    Attributes:
        model: ``tokenprune.load`` id or path, or a zoo name (``tiny-llava``, ...).
        tasks / methods / ratios: the grid; methods are pruner specs (``fastv:k=3``). A spec with a
            ``ratio`` (``fopru_rank:ratio=0.3``) is run once, at that ratio, instead of at every one of
            ``ratios``; a ratio-free method (``TokenPruner.uses_ratio`` false: ``scissor``, its count
            chosen per sample) is run once, without a ratio; the others run at each of ``ratios``.
        limit: samples per task, a seeded subset (default 200; ``"all"`` / ``None``: whole splits);
            ``seed`` picks them and seeds the pruners with a ``seed`` option (``random``, ``scissor``)
            whose spec sets none.
        data_dir: local dataset copy: one folder, or ``{task: folder}``.
        dtype: ``float32`` / ``bfloat16`` / ``float16``, or ``auto``: a hub checkpoint's own dtype, a zoo
            model's :data:`~tokenprune.zoo.BENCH_DTYPE` (the demo: bfloat16 where the device computes it
            natively, else float32); :func:`normalise` resolves a zoo model's ``auto``, so ``config.yaml``
            records what ran.
        bootstrap: resamples for the confidence intervals.
        device_map: ``from_pretrained``'s ``device_map`` (``auto``: layers spread over the GPUs; under
            torchrun each rank over its own share of the node's GPUs). ``None``: the whole model on ``device``.
        shard: ``"I/N"``: compute only shard I of N of the (task, sample) items (job arrays);
            ``tokenprune report`` merges the shards. Neither changes what is computed, so a sweep
            can be resumed under other values.
    """

    model: str = DEFAULT_MODEL
    tasks: list[str] = field(default_factory=lambda: ["shapes_scene"])  # the demo task that separates methods
    methods: list[str] = field(default_factory=lambda: ["fopru_rank", "fopru_row", "random", "pool", "fastv"])
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    limit: int | str | None = DEFAULT_LIMIT
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    output: str = "runs/bench"
    data_dir: str | dict[str, str] | None = None
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    position_policy: str = "default"
    max_new_tokens: int | None = None
    bootstrap: int = 1000
    wandb_project: str | None = None
    wandb_mode: str | None = None
    device_map: str | None = None
    shard: str | None = None

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY}


FIELDS = {f.name for f in dataclasses.fields(SweepConfig)}


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise OptionError(f"{name} must be a list or a comma-separated string, got {value!r}")


def split_methods(value: str) -> list[str]:
    """``"fastv,pdrop:layers=2,8,16,dart"`` -> ``["fastv", "pdrop:layers=2,8,16", "dart"]``: a piece that
    does not start with a letter continues the previous spec's list-valued option."""
    out: list[str] = []
    for piece in (v.strip() for v in value.split(",")):
        if piece and out and not piece[0].isalpha():
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def normalise(cfg: SweepConfig) -> SweepConfig:
    """Validate every field (one clear error each) and put lists in canonical form."""
    from .tasks import get_task

    cfg.tasks = [str(t) for t in _as_list(cfg.tasks, "tasks")]
    if not cfg.tasks:
        raise OptionError("no tasks given; e.g. --tasks pope (see `tokenprune list tasks`)")
    if cfg.task_options is None:
        cfg.task_options = {}
    if not isinstance(cfg.task_options, dict) or not all(isinstance(v, dict) for v in cfg.task_options.values()):
        raise OptionError(f"task_options must map task names to their options, e.g. {{videomme: {{frames: 32}}}}; "
                          f"got {cfg.task_options!r}")
    # A task may carry its options as a spec, like a method: videomme:sampler=llava_onevision:frames=32;
    # the spec wins over task_options (load_config refuses the two disagreeing in one source).
    names = []
    for t in cfg.tasks:
        name, options = parse_pruner_spec(t)
        if name in names:
            raise OptionError(f"task {name!r} is listed twice in tasks; list each task once, with all its options in one spec")
        if options:
            cfg.task_options = {**cfg.task_options, name: {**cfg.task_options.get(name, {}), **options}}
        names.append(name)
    cfg.tasks = names
    for t in cfg.tasks:
        get_task(t, **cfg.task_options.get(t, {}))  # unknown names list the known ones
    # A misspelt task name in task_options or a data_dir mapping is refused, not ignored (the task
    # would run with its defaults, or download its data instead of reading the local copy).
    for where, names in (("task_options", cfg.task_options),
                         ("data_dir", cfg.data_dir if isinstance(cfg.data_dir, dict) else {})):
        for t in names:
            if t not in cfg.tasks:
                try:
                    get_task(t, **(cfg.task_options.get(t, {}) if where == "task_options" else {}))
                except UnknownNameError as exc:
                    raise OptionError(f"{where} names {exc.args[0] if exc.args else exc}") from None
    for t in cfg.tasks:
        where = [k for k in ("dataset_path", "revision") if k in cfg.task_options.get(t, {})]
        if where and _data_dir(cfg, t) is not None:
            raise OptionError(f"task {t}: {where[0]}={cfg.task_options[t][where[0]]!r} names a Hub dataset, but its data "
                              f"comes from --data-dir {_data_dir(cfg, t)} (which wins); give one of the two")
    methods, named = [], split_methods(cfg.methods) if isinstance(cfg.methods, str) else _as_list(cfg.methods, "methods")
    for m in named:
        spec = (m if isinstance(m, str) else _spec_from_mapping(m)).strip()
        if spec == REFERENCE:
            continue  # always run anyway; `--methods none` runs only the unpruned model
        if parse_pruner_spec(spec.partition("@")[0])[0] == REFERENCE:
            raise OptionError(f"{spec!r}: the unpruned reference 'none' takes no options and no '@' policy "
                              "(it always runs once, at ratio 1.0)")
        if spec in methods:
            raise OptionError(f"method {spec!r} is listed twice in methods; list each method once")
        pinned = pinned_ratio(spec)
        # validates name and options now (a pinned ratio too), before any model loads
        pruner_from_spec(split_policy(spec)[0], ratio=1.0 if pinned is None else pinned)
        if pinned is not None and ratio_free(spec):
            raise OptionError(f"method {spec!r}: {parse_pruner_spec(split_policy(spec)[0])[0]} chooses its count per "
                              "sample and ratio has no meaning for it (a sweep runs it once, without a ratio); "
                              "drop the ratio option")
        methods.append(spec)
    if not named:
        raise OptionError("no methods given; e.g. --methods fopru_rank,fastv (see `tokenprune list pruners`)")
    cfg.methods = methods
    cfg.ratios = [validate_ratio(r, "each ratio") for r in _as_list(cfg.ratios, "ratios")]
    if not cfg.ratios:
        raise OptionError("no ratios given; e.g. --ratios 0.5,0.25,0.1 (each in (0, 1])")
    if cfg.limit == "all":
        cfg.limit = None
    if isinstance(cfg.limit, str) and cfg.limit.isdigit():
        cfg.limit = int(cfg.limit)
    if cfg.limit is not None and (isinstance(cfg.limit, bool) or not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise OptionError(f"--limit must be a positive integer or 'all', got {cfg.limit!r}")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise OptionError(f"--batch-size must be a positive integer, got {cfg.batch_size!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise OptionError(f"--seed must be an integer, got {cfg.seed!r}")
    if cfg.max_new_tokens is not None and (isinstance(cfg.max_new_tokens, bool) or not isinstance(cfg.max_new_tokens, int)
                                           or cfg.max_new_tokens < 1):
        raise OptionError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise OptionError(f"--dtype must be one of auto, float32, bfloat16, float16; got {cfg.dtype!r}")
    if cfg.device != "auto":
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise OptionError(f"--device must be auto, cpu, cuda, cuda:N or another torch device; got {cfg.device!r}") from None
    if cfg.dtype == "auto":  # a zoo model's own dtype (the demo: bfloat16 where native), recorded as resolved
        from ..zoo import bench_dtype

        cfg.dtype = bench_dtype(cfg.model, cfg.device)
    if cfg.wandb_mode not in (None, "online", "offline", "disabled"):
        raise OptionError(f"--wandb-mode must be one of online, offline, disabled; got {cfg.wandb_mode!r}")
    Shard.parse(cfg.shard)
    if cfg.device_map is not None:
        from ..adapters.devices import check_device_map

        check_device_map(cfg.device_map)  # before any model loads
    if cfg.position_policy not in ("default", "keep", "compact"):
        raise OptionError(f"position_policy must be default (each method's own convention), keep or compact; "
                          f"got {cfg.position_policy!r}")
    return cfg


def _spec_from_mapping(m: Any) -> str:
    """``{name: fastv, k: 3}`` (YAML) -> ``"fastv:k=3"``."""
    if not isinstance(m, dict) or "name" not in m:
        raise OptionError(f"a method must be a spec string or a mapping with 'name', got {m!r}")
    opts = ":".join(f"{k}={v}" for k, v in m.items() if k != "name")
    return f"{m['name']}:{opts}" if opts else str(m["name"])


CONFIG_DIR = Path(importlib.import_module("tokenprune.configs").__file__).parent  # top-level configs/ in the source tree


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given, else relative to the installed configs (``configs/ablations/x.yaml`` works anywhere)."""
    p = Path(path)
    if p.is_file():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    packaged = CONFIG_DIR.joinpath(*parts) if parts else CONFIG_DIR
    if packaged.is_file():
        return packaged
    shipped = sorted(str(q.relative_to(CONFIG_DIR.parent)) for q in CONFIG_DIR.rglob("*.yaml"))
    raise OptionError(f"config file {p} does not exist; shipped configs: {', '.join(shipped)}")


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> SweepConfig:
    """Defaults <- YAML file <- CLI ``overrides`` (only keys given on the command line)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise OptionError(f"config file {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise OptionError(f"config file {p} must be a mapping of options, e.g. 'methods: [fopru_rank]'")
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise OptionError(f"unknown key(s) {', '.join(unknown)} in {p}; valid keys: {', '.join(sorted(FIELDS))}")
    flags = {k: v for k, v in overrides.items() if v is not None}
    _refuse_task_option_clash(data, f" in {path}")
    _refuse_task_option_clash(flags, "")
    if "tasks" in flags and isinstance(data.get("task_options"), dict):
        # Flags win: an option a --tasks spec sets replaces the YAML's task_options entry for it.
        yaml_options = {t: dict(o) if isinstance(o, dict) else o for t, o in data["task_options"].items()}
        for t in _as_list(flags["tasks"], "tasks"):
            name, options = parse_pruner_spec(str(t))
            if isinstance(yaml_options.get(name), dict):
                for key in options:
                    yaml_options[name].pop(key, None)
        data["task_options"] = yaml_options
    data.update(flags)
    return normalise(SweepConfig(**data))


def _refuse_task_option_clash(source: dict[str, Any], where: str) -> None:
    """One source (a YAML file, or the options given) setting a task option twice, in a task spec
    (``videomme:frames=2``) and in ``task_options`` (``{videomme: {frames: 4}}``), with two values."""
    task_options = source.get("task_options")
    if "tasks" not in source or not isinstance(task_options, dict):
        return
    for t in _as_list(source["tasks"], "tasks"):
        name, options = parse_pruner_spec(str(t))
        given = task_options.get(name)
        for key, value in options.items():
            if isinstance(given, dict) and key in given and given[key] != value:
                raise OptionError(f"task {name}: option {key} is given twice{where}, {value!r} in the task spec and "
                                  f"{given[key]!r} in task_options; give it once")


# -- provenance ------------------------------------------------------------------------------------
def provenance(cfg: SweepConfig) -> dict[str, Any]:
    """The resolved config with package versions, git commit and host, for ``config.yaml``."""
    import torch
    import transformers

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "config": dataclasses.asdict(cfg),
        "versions": {"tokenprune": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__),
                     "python": platform.python_version()},
        "git_commit": commit,
        "seed": cfg.seed,
        "host": platform.node(),
    }


def check_output_dir(cfg: SweepConfig, out: Path, write: bool = True) -> None:
    """Refuse a different sweep in a directory that holds one; (``write``) write ``config.yaml``."""
    path = out / "config.yaml"
    if path.exists():
        try:
            old = (yaml.safe_load(path.read_text()) or {}).get("config", {})
        except yaml.YAMLError:
            old = {}
        old_identity = {k: old.get(k) for k in IDENTITY}
        new_identity = json.loads(json.dumps(cfg.identity()))
        if json.loads(json.dumps(old_identity)) != new_identity:
            diff = [k for k in IDENTITY if json.loads(json.dumps(old_identity[k])) != new_identity[k]]
            raise TokenpruneError(
                f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another --output, "
                f"or delete {out} to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    if write:  # atomically: shards on other machines may read it right now
        results.write_atomic(path, yaml.safe_dump(provenance(cfg), sort_keys=False))


# -- the sweep -------------------------------------------------------------------------------------
def method_runs(cfg: SweepConfig) -> list[tuple[str, float | None]]:
    """``(method spec, ratio)`` pairs, the unpruned reference first; a spec with a ``ratio`` option
    runs once, at it (``fopru_rank:ratio=0.3``), a ratio-free method once with ratio ``None``
    (:func:`ratio_free`: ``scissor``), every other spec at each of ``cfg.ratios``."""
    return [(REFERENCE, 1.0)] + [(m, r) for m in cfg.methods for r in method_ratios(cfg, m)]


def method_ratios(cfg: SweepConfig, spec: str) -> list[float | None]:
    """The ratios ``spec`` runs at: ``[None]`` if it is ratio-free, else its pinned ``ratio``, else the sweep's."""
    if ratio_free(spec):
        return [None]
    pinned = pinned_ratio(spec)
    return list(cfg.ratios) if pinned is None else [pinned]


def run_ratios(cfg: SweepConfig) -> list[float]:
    """Every ratio some method runs at: the sweep's, then the pinned ones not among them (ratio-free runs have none)."""
    return list(dict.fromkeys([*cfg.ratios, *(r for m, r in method_runs(cfg)[1:] if r is not None)]))


def ratio_free_methods(cfg: SweepConfig) -> list[str]:
    """The sweep's methods that run once, without a ratio (their count is chosen per sample)."""
    return [m for m in cfg.methods if ratio_free(m)]


def ratio_free(spec: str) -> bool:
    """Whether the pruner of ``spec`` ignores ``ratio`` (``TokenPruner.uses_ratio`` false: ``scissor``,
    whose count is chosen per sample): a sweep runs it once per task, not once per ratio, and its
    rows carry no ratio (``null`` in ``samples.jsonl``, an empty cell in the CSVs, ``adaptive`` in
    the tables). Methods with an adaptive count that a ratio still steers (``fastvid``) are not."""
    if spec == REFERENCE:
        return False
    base = split_policy(spec)[0]
    return _ratio_free(base, PRUNERS.get(parse_pruner_spec(base)[0]))


@functools.lru_cache(maxsize=256)
def _ratio_free(base: str, cls: type) -> bool:  # keyed by the class too: a name registered anew is asked anew
    pinned = pinned_ratio(base)
    pruner = pruner_from_spec(base, ratio=1.0 if pinned is None else pinned)
    return not getattr(pruner, "uses_ratio", True)


def pinned_ratio(spec: str) -> float | None:
    """The ``ratio`` a method spec pins (``fopru_rank:ratio=0.3@keep`` -> 0.3), ``None`` if it sets none.
    A bad value is refused in one line (never ignored)."""
    if spec == REFERENCE:
        return None
    _, options = parse_pruner_spec(split_policy(spec)[0])
    if "ratio" not in options:
        return None
    try:
        return validate_ratio(options["ratio"], "ratio")
    except OptionError:
        raise OptionError(f"method {spec!r}: ratio must be a number in (0, 1], got {options['ratio']!r} (a ratio in a "
                          "method spec runs that method once, at it; for a sweep over ratios use --ratios)") from None


def split_policy(spec: str) -> tuple[str, str | None]:
    """``"visionzip@keep"`` -> ``("visionzip", "keep")``: a method run under a fixed position policy
    (position-policy ablations: the same method twice in one sweep, reported as separate methods).
    The suffix wins over the sweep's ``position_policy`` for that method."""
    base, sep, policy = spec.rpartition("@")
    if not sep:
        return spec, None
    if policy not in ("keep", "compact"):
        hint = f"; put options before it: {base}:{policy.partition(':')[2]}@{policy.partition(':')[0]}" \
            if ":" in policy else ""
        raise OptionError(f"{spec!r}: a method's '@' suffix is a position policy, keep or compact; got {policy!r}{hint}")
    return base, policy


def make_pruner(spec: str, ratio: float | None, seed: int | None = None) -> TokenPruner | None:
    """The pruner of one run; ``seed`` (the sweep's) reaches a pruner with a ``seed`` option unless the spec sets it.
    ``ratio`` ``None``: a ratio-free method's one run (built with ratio 1.0, which it ignores)."""
    if spec == REFERENCE:
        return None
    base = split_policy(spec)[0]
    name, options = parse_pruner_spec(base)
    extra: dict[str, Any] = {}
    if seed is not None and "seed" not in options and "seed" in inspect.signature(PRUNERS.get(name)).parameters:
        extra["seed"] = seed
    return pruner_from_spec(base, ratio=1.0 if ratio is None else ratio, **extra)


def run_policy(cfg: SweepConfig, spec: str) -> str | None:
    """The position policy of a run: the method's ``@`` suffix, else the sweep's, else the method's own (``None``)."""
    fixed = split_policy(spec)[1] if spec != REFERENCE else None
    return fixed or (None if cfg.position_policy == "default" else cfg.position_policy)


def _data_dir(cfg: SweepConfig, task: str) -> str | None:
    if isinstance(cfg.data_dir, dict):
        return cfg.data_dir.get(task)
    return cfg.data_dir
