"""Package layout rules from DESIGN.md: the device side is torch-free, imports flow one way."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> ciar packages it may import (DESIGN.md "Imports flow one way")
ALLOWED = {
    "models": set(),
    "training": {"models"},
    "export": {"models", "training", "runtime"},
    "runtime": {"cloud_bridge"},
    "engine": {"models", "cloud_bridge", "runtime"},  # runtime: BundleProposer runs the exported graph
    "cloud_bridge": {"models", "engine"},
    "cli": {"models", "training", "export", "runtime", "cloud_bridge", "engine"},
}
TORCH_FREE = ["runtime", "cloud_bridge/protocol.py", "cloud_bridge/session.py", "cloud_bridge/client.py"]


def imported_modules(path: Path, module_level: bool = False) -> set[str]:
    """Every module a file imports; with module_level, only imports that run when the module is imported
    (not those inside functions: e.g. the optional ExecuTorch backend imports torch when it is chosen)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    nodes = ast.walk(tree) if not module_level else _module_level(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _module_level(tree: ast.Module):
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ClassDef):  # class bodies run at import; their methods do not
            stack.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_flow_one_way(folder):
    for path in (ROOT / folder).rglob("*.py"):
        for name in imported_modules(path):
            if name.startswith("ciar."):
                target = name.split(".")[1]
                assert target == folder or target in ALLOWED[folder], f"{path.relative_to(ROOT)} imports {name}"


def test_device_side_never_imports_torch():
    files = []
    for entry in TORCH_FREE:
        p = ROOT / entry
        files += list(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    for path in files:
        bad = {n for n in imported_modules(path, module_level=True)
               if n.split(".")[0] in {"torch", "torchvision", "torchao", "executorch"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    modules = ["ciar.runtime"] + [f"ciar.cloud_bridge.{p.stem}" for p in map(Path, TORCH_FREE[1:])
                                  if (ROOT / p).exists()]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
