"""Registry, plugin discovery through real entry points, and the CLI's error handling."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tokenprune as tp
from tokenprune.cli import main
from tokenprune.registry import Registry

from conftest import BROKEN_PLUGIN_DIR, PLUGIN_DIR


def run_cli(*args: str, extra_path: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m tokenprune`` in a fresh process, optionally with more entries on sys.path."""
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path or [])]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "tokenprune", *args], capture_output=True, text=True, env=env)


def test_builtins_registered():
    assert {"fopru_rank", "fopru_row", "random", "pool", "fastv"} <= set(tp.list_pruners())
    entry = tp.PRUNERS.entry("fopru_rank")
    assert entry.origin == "built-in" and entry.obj.name == "fopru_rank"


def test_plugin_discovered_from_entry_point_with_origin():
    entry = tp.PRUNERS.entry("l2norm")
    assert entry.origin == "tp-example-plugin 0.3.1"
    assert entry.obj.__module__ == "tp_example_plugin"
    pruner = tp.create_pruner("l2norm", ratio=0.5)
    assert pruner.name == "l2norm"


def test_list_shows_plugin_with_origin_only_when_installed():
    with_plugin = run_cli("list", extra_path=[PLUGIN_DIR])
    assert with_plugin.returncode == 0, with_plugin.stderr
    line = next(l for l in with_plugin.stdout.splitlines() if l.startswith("l2norm"))
    assert "pre_llm" in line and "tp-example-plugin 0.3.1" in line and "largest L2 norm" in line
    for name in ("fopru_rank", "fopru_row", "random", "pool", "fastv"):
        assert any(l.startswith(name) and "built-in" in l for l in with_plugin.stdout.splitlines())
    without = run_cli("list")
    assert "l2norm" not in without.stdout


def test_broken_plugin_is_reported_not_fatal():
    out = run_cli("list", extra_path=[PLUGIN_DIR, BROKEN_PLUGIN_DIR])
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("broken"))
    assert "tp-broken-plugin 0.0.1" in line and "failed to load" in line and "ModuleNotFoundError" in line
    err = run_cli("describe", "broken", extra_path=[BROKEN_PLUGIN_DIR])
    assert err.returncode == 2 and "failed to load" in err.stderr and "Traceback" not in err.stderr


def test_unknown_pruner_lists_known_ones():
    with pytest.raises(tp.UnknownNameError) as info:
        tp.create_pruner("fopru_rnk")
    msg = str(info.value)
    assert "fopru_rank" in msg and "fastv" in msg and "Did you mean 'fopru_rank'" in msg


def test_unknown_option_lists_valid_ones():
    with pytest.raises(tp.OptionError, match="its options are: ratio, k, query"):
        tp.create_pruner("fastv", layer=3)


def test_spec_parsing():
    assert tp.parse_pruner_spec("fastv:k=3:query=mean") == ("fastv", {"k": 3, "query": "mean"})
    assert tp.parse_pruner_spec("fopru_row:ratio=0.25") == ("fopru_row", {"ratio": 0.25})
    pruner = tp.pruner_from_spec("fastv:k=3", ratio=0.1)
    assert (pruner.k, pruner.ratio) == (3, 0.1)
    with pytest.raises(tp.OptionError, match="name:key=value"):
        tp.parse_pruner_spec("fastv:k3")


def test_registry_rejects_double_registration():
    reg: Registry = Registry("thing", "tokenprune.test_things")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)
    assert reg.names() == ["a"] and reg.get("a") is int


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["describe", "nope"], "unknown pruner 'nope'"),
        (["describe", "fastv", "--ratio", "0"], "ratio must be a number in (0, 1]"),
        (["describe", "fastv", "--ratio", "1.5"], "ratio must be a number in (0, 1]"),
        (["describe", "fastv", "--ratio", "nan"], "ratio must be a number in (0, 1]"),
        (["describe", "fastv", "--ratio", "half"], "ratio must be a number in (0, 1]"),
        (["describe", "fastv:ratio=2"], "ratio must be a number in (0, 1]"),
        (["describe", "fastv:query=first"], "query must be one of last, mean"),
        (["describe", "pool", "--grid", "24by24"], "--grid must be HxW"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_describe(capsys):
    assert main(["describe", "fopru_row:fill=rank", "--ratio", "0.1", "--grid", "24x24"]) == 0
    out = capsys.readouterr().out
    assert "keeps 58 of 576 tokens" in out and "fill = 'rank'" in out


def test_cli_unknown_subcommand_exits_2():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
