"""The command lines run as a user runs them (real subprocesses, installed entry points)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0], path=str(BIN)) or cmd[0]
    return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=300)


def test_ciar_help_lists_commands():
    out = run("ciar", "--help")
    assert out.returncode == 0 and "selftest" in out.stdout


def test_ciar_selftest_json():
    out = run("ciar", "selftest", "--tokens", "64", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["ok"] and res["tokens"] == 64 and res["cache_vs_full_max_abs_diff"] <= 1e-4


def test_ciar_device_info_json():
    out = run("ciar-device", "info", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["cores"] >= 1 and res["versions"]["numpy"]


def test_unknown_command_is_an_error():
    out = run("ciar", "no-such-command")
    assert out.returncode != 0 and "invalid choice" in out.stderr
