"""The ``tokenprune`` command line.

User errors (:class:`~tokenprune.errors.TokenpruneError`) print one line and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import OptionError, TokenpruneError
from .pruner import PRUNERS, Stage, pruner_from_spec, validate_ratio
from .registry import Registry
from .benchmarks.tasks import TASKS, get_task

# Registries shown by `tokenprune list`, in order: (title, registry or a function returning it, row).
LISTED: list[tuple[str, Registry | Callable[[], Registry], Callable]] = []


def _pruner_row(entry) -> list[str]:
    cls = entry.obj
    if cls is None:
        return [entry.name, "?", entry.origin, f"failed to load: {entry.error}"]
    stages = "+".join(st.value for st in (cls.stage, *cls.extra_stages))  # dycoke: pre_llm+decode
    return [entry.name, stages, entry.origin, entry.description]


LISTED.append(("pruners", PRUNERS, _pruner_row))


def _model_registry() -> Registry:
    from .adapters import MODELS, _builtin

    _builtin()
    return MODELS


def _model_row(entry) -> list[str]:
    cls = entry.obj
    if cls is None:
        return [entry.name, "?", entry.origin, f"failed to load: {entry.error}"]
    return [entry.name, ", ".join(cls.model_types), entry.origin, entry.description]


LISTED.append(("models", _model_registry, _model_row))


def _task_row(entry) -> list[str]:
    cls = entry.obj
    if cls is None:
        return [entry.name, "?", "?", entry.origin, f"failed to load: {entry.error}"]
    data = cls.dataset_path + (f" ({cls.dataset_name})" if cls.dataset_name else "") + f" [{cls.split}]"
    return [entry.name, data, cls.headline, entry.origin, entry.description]


LISTED.append(("tasks", TASKS, _task_row))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r, widths)] + [str(r[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registered pruner (and, as they land, model and task) with its origin."""
    headers = {
        "pruners": ["name", "stage", "origin", "description"],
        "models": ["family", "model_type", "origin", "description"],
        "tasks": ["name", "dataset [split]", "headline", "origin", "description"],
    }
    for title, registry, row in LISTED:
        if args.kind and args.kind != title:
            continue
        registry = registry() if callable(registry) else registry  # heavy registries load on demand
        rows = [row(e) for e in registry.entries()]
        print(f"{title}:")
        print(_table(headers.get(title, ["name", "origin", "description"]), rows) if rows else "  (none)")
        print()
    return 0


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise OptionError(f"--grid must be HxW with positive integers, e.g. 24x24; got {text!r}") from None
    return h, w


def cmd_describe(args: argparse.Namespace) -> int:
    """Validate a pruner spec and print its options, needs and kept-token count on a grid."""
    overrides = {} if args.ratio is None else {"ratio": validate_ratio(args.ratio)}
    pruner = pruner_from_spec(args.spec, **overrides)
    grid = _parse_grid(args.grid)
    n = grid[0] * grid[1]
    entry = PRUNERS.entry(pruner.name)
    print(f"{pruner.name} ({entry.origin}, stage {pruner.stage.value}): {entry.description}")
    for key, value in pruner.options.items():
        print(f"  {key} = {value!r}")
    if pruner.stage is Stage.IN_VISION:
        hooks = pruner.vision_hooks(args.vision_blocks)
        points = sorted({h.point for h in hooks})
        print(f"  acts inside the vision tower at {len(hooks)} of {args.vision_blocks} blocks "
              f"({', '.join(points) or 'nowhere: a no-op'})")
    else:
        print(f"  needs: {pruner.needs.describe() or 'visual tokens only'}")
    if pruner.extra_stages:
        print(f"  also acts: {', '.join(st.value for st in pruner.extra_stages)}")
    stages = pruner.llm_schedule(args.layers)  # the layers on a decoder of that depth (V2Drop scales them)
    if len(stages) > 1 and not pruner.adaptive:
        counts = pruner.stage_counts(n, args.layers)
        bounds = [st.layer for st in stages] + [args.layers]
        avg = (bounds[0] * n + sum((bounds[i + 1] - bounds[i]) * c for i, c in enumerate(counts))) / args.layers
        print(f"  keeps {' / '.join(map(str, counts))} of {n} tokens from layers {', '.join(str(st.layer) for st in stages)} on "
              f"a {args.layers}-layer decoder: {avg:.1f} per layer on average ({avg / n:.1%}; merged tokens not counted)")
        return 0
    if pruner.adaptive:
        print(f"  keeps an adaptive count, chosen per sample from the tokens (at most {pruner.num_kept(n, grid)} of {n}); "
              "runs report what was kept")
        return 0
    kept = pruner.num_kept(n, grid)
    print(f"  keeps {kept} of {n} tokens on a {grid[0]}x{grid[1]} grid ({kept / n:.1%})")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Load a task's data (hub, cache or --data-dir) and report what is usable."""
    task = get_task(args.task)
    data = task.load(data_dir=args.data_dir, limit=args.limit)
    first = None
    for sample in data:
        first = first or sample
    print(data.report())
    if first is not None:
        print(f"first prompt ({first.id}): {task.prompt(first)!r}; reference: {first.answers[:3]}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run (or resume) a benchmark sweep."""
    from .benchmarks.sweep import load_config, run_sweep

    overrides = {
        "model": args.model, "tasks": args.tasks, "methods": args.methods, "ratios": args.ratios,
        "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
        "dtype": args.dtype, "output": args.output, "wandb_project": args.wandb_project,
        "wandb_mode": args.wandb_mode, "max_new_tokens": args.max_new_tokens,
        "position_policy": args.position_policy, "bootstrap": args.bootstrap,
        "device_map": args.device_map, "shard": args.shard,
    }
    if args.data_dir is not None:
        pairs = [p for p in args.data_dir.split(",") if p]
        if all("=" in p for p in pairs):
            overrides["data_dir"] = dict(p.split("=", 1) for p in pairs)
        elif len(pairs) == 1:
            overrides["data_dir"] = pairs[0]
        else:
            raise OptionError("--data-dir takes one folder, or task=folder pairs separated by commas")
    cfg = load_config(args.config, overrides)
    if cfg.model:  # a bad --model PATH fails in one line now, not after the data is loaded
        from .adapters import check_model_source

        check_model_source(cfg.model)
    try:
        run_sweep(cfg)
    except KeyboardInterrupt:
        print(f"\ntokenprune: interrupted; finished samples are saved in {cfg.output}/ -- "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Merge a sweep's results files (shards, ranks) and rebuild summary, Pareto and report."""
    from .benchmarks.sweep import rebuild_reports

    print(rebuild_reports(args.run_dir))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Draw what each method keeps: live on an image, or from a finished sweep (--run, --sample)."""
    from .media import Video
    from .visualize.show import DEFAULT_METHODS, save, show_image, show_run, show_video

    methods = None
    if args.methods:
        from .benchmarks.sweep import split_methods

        methods = split_methods(args.methods)
    if args.run is not None:
        if args.sampler is not None or args.frames is not None:
            raise OptionError("--sampler / --frames sample a video file given to show; a sweep's samples were "
                              "sampled by its task: drop them with --run")
        if args.sample is None:
            raise OptionError("--run needs --sample ID (a sample_id of the sweep's samples.jsonl)")
        figure = show_run(args.run, args.sample, ratio=args.ratio, methods=methods, task=args.task)
        default = f"{args.run}/show_{args.sample}.png"
    else:
        if args.sample is not None:
            raise OptionError("--sample picks a sample of a finished sweep: give --run DIR too")
        if args.model:
            from .adapters import check_model_source

            check_model_source(args.model)
        image, prompt, reference = _show_input(args)
        ratio = 0.25 if args.ratio is None else args.ratio
        if isinstance(image, Video):
            if not args.model:
                raise OptionError("a video needs a video model: give --model (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf, "
                                  "Qwen/Qwen2-VL-2B-Instruct, or a zoo model such as tiny-qwen2-vl); the default "
                                  "tokenprune-demo takes images only")
            figure = show_video(image, prompt, methods=methods or DEFAULT_METHODS, ratio=ratio, model=args.model,
                                note=_sampler_note(args))
        else:
            figure = show_image(image, prompt, methods=methods or DEFAULT_METHODS, ratio=ratio,
                                model=args.model or "tokenprune-demo", reference=reference)
        default = "show.png"
    path = save(figure, args.output or default)
    print(f"tokenprune show: {path} ({figure.width}x{figure.height})")
    return 0


VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp"}


def _sampler_note(args: argparse.Namespace) -> str:
    """How show sampled the video's frames, for the figure's header."""
    sampler = args.sampler or "uniform"
    return f"sampler {sampler}" + (f", {args.frames} asked" if args.frames is not None else "")


def _show_input(args: argparse.Namespace):
    """The visual and prompt of a live ``show``: the given image or video file, or a sample of the default
    task. A video (by its suffix, or any file PIL cannot read that PyAV can) is sampled with ``--sampler``
    (default uniform) and ``--frames`` (default: the sampler's; uniform: 8)."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from .media import Video

    if args.image is None:
        if args.sampler is not None or args.frames is not None:
            raise OptionError("--sampler / --frames sample a video file: give one (tokenprune show VIDEO.mp4 --model ...)")
        task = get_task("easy_vqa")
        sample = next(iter(task.load(limit=1, seed=0)))
        return sample.image, args.prompt or task.prompt(sample), sample.answers
    path = Path(args.image)
    video_frames = (args.sampler or "uniform", args.frames)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        video = Video.from_file(path, sampler=video_frames[0], frames=video_frames[1])
        return video, args.prompt or "Describe the video briefly.", None
    try:
        image = Image.open(path).convert("RGB")
    except UnidentifiedImageError as exc:
        try:  # a video with an unusual suffix
            video = Video.from_file(path, sampler=video_frames[0], frames=video_frames[1])
        except OptionError:
            raise OptionError(f"cannot read image {args.image}: {exc}; give a PNG or JPEG file, or a video "
                              f"({', '.join(sorted(VIDEO_SUFFIXES))})") from None
        return video, args.prompt or "Describe the video briefly.", None
    except OSError as exc:
        raise OptionError(f"cannot read image {args.image}: {exc}; give a PNG or JPEG file") from None
    if args.sampler is not None or args.frames is not None:
        raise OptionError(f"--sampler / --frames sample a video, but {args.image} is an image: drop them")
    return image, args.prompt or "Describe the image briefly.", None


def cmd_on_object(args: argparse.Namespace) -> int:
    """The share of each method's kept tokens on the object, from a finished easy-VQA sweep."""
    from .visualize.on_object import format_table, on_object_table

    print(format_table(on_object_table(args.run_dir, bootstrap=args.bootstrap, task=args.task)))
    print(f"\nwritten: {args.run_dir}/on_object.csv")
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    """Evidence recall per method, ratio and question kind, from a finished shapes_video sweep."""
    from .visualize.evidence import evidence_table, format_table

    lvlm = None
    if args.model_regions:
        from .adapters import load
        from .benchmarks.sweep import load_sweep_config

        lvlm = load(load_sweep_config(args.run_dir).model)
    table = evidence_table(args.run_dir, lvlm=lvlm, bootstrap=args.bootstrap, min_cover=args.min_cover)
    print(format_table(table))
    print(f"\nwritten: {args.run_dir}/evidence_recall.csv")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    """Mean Jaccard overlap of kept sets under tiny perturbations, per method and ratio."""
    from pathlib import Path

    from .benchmarks.sweep_config import split_methods
    from .stability import measure, table, write_csv

    if args.limit is not None and args.limit < 1:
        raise OptionError(f"--limit must be a positive number of samples, got {args.limit}")
    methods = split_methods(args.methods)  # list options keep their commas: pdrop:layers=2,8,16
    if methods == ["all"]:
        methods = [n for n in PRUNERS.names()]
    ratios = [validate_ratio(r.strip()) for r in args.ratios.split(",") if r.strip()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "stability.partial.csv"  # rewritten after every batch; replaced by stability.csv at the end
    rows = measure(args.model, args.task, methods, ratios, [p.strip() for p in args.perturb.split(",") if p.strip()],
                   limit=args.limit, seed=args.seed, batch_size=args.batch_size, data_dir=args.data_dir,
                   device=args.device, bootstrap=args.bootstrap, log=lambda line: print(line, file=sys.stderr),
                   progress=lambda so_far: write_csv(partial, so_far))
    write_csv(out / "stability.csv", rows)
    partial.unlink(missing_ok=True)
    print("\n".join(table(rows)))
    if (out / "config.yaml").exists() and (out / "samples.jsonl").exists():  # a sweep's folder: its report gains the section
        from .benchmarks.sweep import rebuild_reports

        rebuild_reports(out)
        print(f"\nwritten: {out}/stability.csv and the stability section of {out}/report.md")
    else:
        print(f"\nwritten: {out}/stability.csv")
    return 0


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokenprune`` command."""
    parser = argparse.ArgumentParser(
        prog="tokenprune", description="Compare visual-token pruning methods for vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"tokenprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list pruners (and models, tasks) with their origin")
    p_list.add_argument("kind", nargs="?", choices=[t for t, _, _ in LISTED], help="only this registry")
    p_list.set_defaults(func=cmd_list)

    p_desc = sub.add_parser("describe", help="check a pruner spec and show what it keeps")
    p_desc.add_argument("spec", help="pruner name with options, e.g. fopru_row:ratio=0.25:fill=rank")
    p_desc.add_argument("--ratio", help="retention ratio in (0, 1] (overrides the spec)")
    p_desc.add_argument("--grid", default="24x24", help="token grid HxW to count on (default 24x24, LLaVA-1.5)")
    p_desc.add_argument("--layers", type=int, default=32, help="decoder depth for multi-stage schedules (default 32, LLaVA-1.5-7B)")
    p_desc.add_argument("--vision-blocks", type=int, default=23,
                        help="vision blocks the tower runs, for in-vision methods (default 23: LLaVA-1.5 reads CLIP-L's block 22)")
    p_desc.set_defaults(func=cmd_describe)

    p_data = sub.add_parser("check-data", help="load a task's dataset and report usable / skipped samples")
    p_data.add_argument("task", help="task name (see `tokenprune list tasks`)")
    p_data.add_argument("--data-dir", help="local copy of the dataset (a folder load_dataset reads)")
    p_data.add_argument("--limit", type=int, help="read only the first N samples")
    p_data.set_defaults(func=cmd_check_data)

    p_bench = sub.add_parser("bench", help="run a method x ratio x task sweep (resumable)",
                             description="Accuracy and cost of each method x ratio x task; the unpruned model "
                                         "is always run once as the reference. Flags override --config.")
    p_bench.add_argument("--model", help="tokenprune.load id or path, or a zoo model (default: tokenprune-demo)")
    p_bench.add_argument("--tasks", help="comma list, e.g. pope,gqa (default: shapes_scene; see `tokenprune list tasks`); "
                         "options as in a method spec, e.g. videomme:sampler=llava_onevision:frames=32")
    p_bench.add_argument("--methods", help="comma list of pruner specs, e.g. fopru_rank,fastv:k=3")
    p_bench.add_argument("--ratios", help="comma list of retention ratios in (0, 1] (default 0.25,0.1), e.g. 0.5,0.25,0.1")
    p_bench.add_argument("--limit", help="samples per task, a seeded subset (default 200); 'all' for whole splits")
    p_bench.add_argument("--batch-size", type=_int, help="default 8")
    p_bench.add_argument("--seed", type=_int)
    p_bench.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p_bench.add_argument("--dtype", help="auto (default: the checkpoint's own; the demo bfloat16 where the hardware "
                         "computes it natively), float32, bfloat16, float16")
    p_bench.add_argument("--output", help="results folder (default runs/bench); a rerun resumes it")
    p_bench.add_argument("--config", help="YAML file with any of these options (flags win)")
    p_bench.add_argument("--data-dir", help="local dataset copy: a folder, or task=folder,task=folder")
    p_bench.add_argument("--max-new-tokens", type=_int, help="answer budget (default: the task's)")
    p_bench.add_argument("--position-policy", help="default (each method's own convention), keep or compact")
    p_bench.add_argument("--bootstrap", type=_int, help="bootstrap resamples for the CIs (default 1000)")
    p_bench.add_argument("--wandb-project", help="log the sweep to this W&B project")
    p_bench.add_argument("--wandb-mode", help="online, offline or disabled (default: offline without an API key)")
    p_bench.add_argument("--device-map", help="spread the model over devices: auto, balanced, sequential "
                                              "(from_pretrained's device_map; under torchrun, each rank over its share of the GPUs)")
    p_bench.add_argument("--shard", help="I/N: compute only shard I of N (job arrays); merge with `tokenprune report DIR`")
    p_bench.set_defaults(func=cmd_bench)

    p_show = sub.add_parser("show", help="draw the tokens each method keeps (a panel per method; a frame strip for a video)",
                            description="Live: run each method on IMAGE (default: a sample of easy_vqa) and draw "
                                        "the kept tokens bright, dropped ones dim, merged ones half, the method's score "
                                        "as a heatmap and the answer. A video file gets a frame strip: a row of frames "
                                        "per method (at most 8, evenly spaced), each frame's kept tokens and its "
                                        "index and time. --run DIR --sample ID: redraw a sample of a "
                                        "finished sweep from the kept tokens it stored (nothing is generated).")
    p_show.add_argument("image", nargs="?", help="an image or video file (default: the first sample of easy_vqa)")
    p_show.add_argument("--prompt", help="the question (default: the sample's, or a description request)")
    p_show.add_argument("--model", help="model id, path or zoo name (default: tokenprune-demo)")
    p_show.add_argument("--methods", help="comma list of pruner specs (default: fopru_rank,fopru_row,random,pool,fastv)")
    p_show.add_argument("--ratio", type=float, help="retention ratio (default 0.25; with --run: the sweep's first)")
    p_show.add_argument("--run", help="a finished sweep's --output folder")
    p_show.add_argument("--sample", help="with --run: the sample_id to redraw")
    p_show.add_argument("--task", help="with --run: the task, if the id is in several")
    p_show.add_argument("--sampler", help="for a video file: how frames are sampled (default uniform; "
                                          "see tokenprune.media.SAMPLERS, e.g. llava_onevision, qwen2_5_vl)")
    p_show.add_argument("--frames", type=_int, help="for a video file: frames to sample (default: the sampler's; uniform: 8)")
    p_show.add_argument("--output", help="PNG to write (default show.png, or DIR/show_<ID>.png)")
    p_show.set_defaults(func=cmd_show)

    p_obj = sub.add_parser("on-object", help="share of each method's kept tokens on the objects (easy_vqa, shapes_scene sweeps)")
    p_obj.add_argument("run_dir", help="a finished easy_vqa or shapes_scene sweep's --output folder")
    p_obj.add_argument("--task", choices=["easy_vqa", "shapes_scene"], help="which task of the sweep (default: the first)")
    p_obj.add_argument("--bootstrap", type=_int, default=1000, help="bootstrap resamples for the CIs")
    p_obj.set_defaults(func=cmd_on_object)

    p_ev = sub.add_parser("evidence", help="evidence recall: share of the tokens each answer depends on that a method kept "
                                           "(shapes_video sweeps)",
                          description="Per method, ratio and question kind of a finished shapes_video sweep: the share of "
                                      "each question's evidence tokens (the tokens covering the objects in the frames the "
                                      "answer depends on) that the method kept or merged into a kept token, from the kept "
                                      "tokens the sweep stored. Writes RUN_DIR/evidence_recall.csv. Needs no model.")
    p_ev.add_argument("run_dir", help="a finished shapes_video sweep's --output folder")
    p_ev.add_argument("--bootstrap", type=_int, default=1000, help="bootstrap resamples for the CIs")
    p_ev.add_argument("--min-cover", type=float, default=0.1,
                      help="share of a token's pixels the object must cover to make it evidence (default 0.1; the "
                           "token it covers most always is)")
    p_ev.add_argument("--model-regions", action="store_true",
                      help="map tokens to frame pixels through the sweep model's processor geometry (loads the model) "
                           "instead of each view's grid over the whole frame")
    p_ev.set_defaults(func=cmd_evidence)

    p_stab = sub.add_parser("stability", help="how much each method's kept set changes under tiny perturbations "
                                              "(eager vs SDPA, fp32 vs bf16, 1e-5 feature noise)",
                            description="Per method and ratio: the mean Jaccard overlap of the kept visual tokens between "
                                        "the run as configured and the same run under each perturbation, over a task's "
                                        "samples (prefill only). Writes OUTPUT/stability.csv; an OUTPUT that is a "
                                        "sweep's folder gets a stability section in its report.md.")
    p_stab.add_argument("--model", default="tokenprune-demo", help="model id, path or zoo name (default: tokenprune-demo)")
    p_stab.add_argument("--task", default="shapes_scene", help="task whose samples to use (default shapes_scene)")
    p_stab.add_argument("--methods", default="fopru_rank,fastv",
                        help="comma list of pruner specs, or 'all' for every registered pruner (default fopru_rank,fastv)")
    p_stab.add_argument("--ratios", default="0.25", help="comma list of retention ratios (default 0.25)")
    p_stab.add_argument("--perturb", default="attention,dtype,noise", help="comma list of attention, dtype, noise (default: all three)")
    p_stab.add_argument("--limit", type=_int, default=100, help="samples (a seeded subset; default 100)")
    p_stab.add_argument("--seed", type=_int, default=0)
    p_stab.add_argument("--batch-size", type=_int, default=8)
    p_stab.add_argument("--data-dir", help="local copy of the task's dataset")
    p_stab.add_argument("--device", default="auto")
    p_stab.add_argument("--bootstrap", type=_int, default=1000, help="bootstrap resamples for the CIs")
    p_stab.add_argument("--output", default="runs/stability", help="folder for stability.csv (a sweep's folder: also its report)")
    p_stab.set_defaults(func=cmd_stability)

    p_report = sub.add_parser("report", help="merge a sweep's results (shards, ranks) and rebuild every results file",
                              description="Reads every samples*.jsonl in RUN_DIR (shards copied from several machines, "
                                          "ranks of a torchrun job) and writes samples.jsonl, summary.csv, pareto.*, "
                                          "report.md and the W&B run from them. Computes nothing.")
    p_report.add_argument("run_dir", help="the sweep's --output folder")
    p_report.set_defaults(func=cmd_report)

    from .calibrate import add_calibrate_parser  # `tokenprune calibrate vtw`: a model's withdrawal layer K

    add_calibrate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenprune`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    who = _rank_label()
    try:
        return args.func(args)
    except TokenpruneError as exc:
        print(f"tokenprune: error{who}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        if not who:
            raise  # one process: a bug keeps its traceback
        # Under torchrun every rank would print its traceback (and the launcher its own): one line
        # per failing rank here, the traceback in a file.
        import traceback
        from pathlib import Path

        log = Path(f"tokenprune-error-{who.strip(' ()').replace(' ', '-')}.log")
        log.write_text(traceback.format_exc())
        print(f"tokenprune: error{who}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(traceback: {log.resolve()})", file=sys.stderr)
        return 1


def _rank_label() -> str:
    """``" (rank 1 of 4)"`` under torchrun / accelerate launch, else ``""``."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
