"""The design card's layout ships as one package: methods/, benchmarks/ and configs/ install under
tokenprune, so a built wheel works from any folder in a fresh virtual environment."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("tokenprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("tokenprune/methods/visionzip.py", "tokenprune/benchmarks/sweep.py",
                     "tokenprune/benchmarks/tasks/builtin.py", "tokenprune/configs/ablations/position_policy.yaml",
                     "tokenprune/zoo/weights/demo_projector.safetensors",
                     "tokenprune/integrations/lmms_eval/manifest.py", "tokenprune/integrations/lmms_eval/model.py"):
        assert expected in names, f"{expected} missing from the wheel"
    # A fresh venv with the wheel alone; the dependencies (torch, transformers, ...) are borrowed from this
    # environment by a .pth line (its own .pth files, the editable install's among them, are not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = (
        "import tokenprune as tp, tokenprune.methods, tokenprune.benchmarks.sweep as sweep\n"
        f"assert tokenprune.methods.__file__.startswith({str(site)!r}), tokenprune.methods.__file__\n"
        "assert {'visionzip', 'pdrop', 'fopru_rank'} <= set(tp.list_pruners())\n"
        "assert 'easy_vqa' in tp.list_tasks()\n"
        "cfg = sweep.load_config('configs/ablations/position_policy.yaml', {})\n"
        "assert 'visionzip@keep' in cfg.methods\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    cli = subprocess.run([str(venv / "bin" / "python"), "-m", "tokenprune", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "visionzip" in cli.stdout, cli.stderr[-2000:]
