"""The device install is torch-free: a fresh virtual environment with only `pip install .[device]` runs
`ciar-device run` and `ciar-device bench` on the shipped bundle, and torch is never imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "runtime" / "bundles"

# run the CLI with an import hook that fails loudly if anything imports torch
GUARD = """
import sys, runpy
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch was imported on the device side")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["ciar-device"] + sys.argv[1:]
from ciar.runtime.cli import main
code = main()
assert "torch" not in sys.modules
raise SystemExit(code)
"""


@pytest.mark.slow
@pytest.mark.skipif(not any(SHIPPED.glob("*/manifest.json")), reason="no shipped bundle")
def test_device_extra_installs_and_runs_without_torch(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[device]"], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    listing = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True, env=env).stdout.lower()
    assert "torch" not in listing and "onnxruntime" in listing
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    out = tmp_path / "img.png"
    run = subprocess.run([str(py), str(guard), "run", "--out", str(out), "--stats", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.exists() and json.loads((tmp_path / "s.json").read_text())["tokens"] > 0
    # the cloud client imports without torch too; with no cloud there the device finishes locally
    cloud = subprocess.run([str(py), str(guard), "run", "--cloud", "ws://127.0.0.1:9", "--cloud-rate", "0.3",
                            "--chain", "4", "--lookahead", "4", "--out", str(out), "--stats", str(tmp_path / "c.json")],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert cloud.returncode == 0, cloud.stderr
    offline = json.loads((tmp_path / "c.json").read_text())
    assert offline["bridge"]["offline_reason"] and offline["chain"] == 4 and offline["unverified"] > 0
    assert offline["lookahead"] == 4 and offline["voided"] == 0  # nothing to wait for: no drafting ahead
    bench = subprocess.run([str(py), str(guard), "bench", "--images", "1", "--warmup-images", "0", "--json", "-"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["bundles"]

