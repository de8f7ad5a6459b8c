"""The artifact bundle (DESIGN.md): a directory with `manifest.json` and the files it lists with their SHA-256.

Torch-free. `ciar.export` writes bundles with `write_manifest`; the runtime opens them with `load_bundle`, which
refuses anything it cannot trust with one `BundleError` naming the problem.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rates import cloud_calls_problem

FORMAT_VERSION = 4  # 2: the device graph takes `neighbours` (the Inter-Head's neighbour scale); 3: it returns the
# step's new cache rows (`k_new`, `v_new`), not the whole cache; 4: the ONNX device graph also returns `cdf`, the
# draw table of the centre logits
FORMATS = {"onnx": "device.onnx", "executorch": "device.pte", "coreml": "device.mlpackage"}
QUANTIZATIONS = ("none", "int8", "int4")
SHARED_FILES = {"caption_encoder": "caption_encoder.onnx", "vq_decoder": "vq_decoder.onnx",
                "token_embeddings": "token_embeddings.npy"}
GATE_KINDS = ("interval", "entropy", "maxprob", "latent")  # what the device graph's U scores (manifest gate.kind)
DEFAULT_CLOUD_RATE = 0.3  # the gate's cloud calls per draft token where no rate is given: the paper's operating
# point, quality first (docs/BENCHMARKS.md 3h measures the trade at 0.2 and 0.15)
# per gate kind: the share of the image the cloud writes first (manifest gate.prefix_fraction; the engine's ciar
# and bare-gate methods use the same)
PREFIX_FRACTION = {"interval": 0.06, "entropy": 0.0, "maxprob": 0.0, "latent": 0.0}
REQUIRED_KEYS = ("format_version", "format", "quantize", "model", "caption", "sampling", "gate", "files")


def gate_kind(manifest: dict[str, Any]) -> Any:
    """The manifest's `gate.kind`; bundles written before the field existed are interval bundles."""
    gate = manifest["gate"]
    return gate.get("kind", "interval") if isinstance(gate, dict) else gate


def gate_cloud_rate(manifest: dict[str, Any]) -> Any:
    """The manifest's default `gate.cloud_rate`; a bundle that records none is held at DEFAULT_CLOUD_RATE."""
    return manifest["gate"].get("cloud_rate", DEFAULT_CLOUD_RATE)


class BundleError(ValueError):
    """A bundle that cannot be used: the message says which file or field and what to do."""


def sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative paths and contents, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def quantize(self) -> str:
        return self.manifest["quantize"]

    @property
    def gate(self) -> str:
        """What U scores: "interval" (the Inter-Head), or a bare gate ("entropy", "maxprob", "latent") whose graph
        has no Inter-Head and returns no features."""
        return gate_kind(self.manifest)

    def file(self, role: str) -> Path:
        return self.path / self.manifest["files"][role]["path"]


def write_manifest(directory: Path, manifest: dict[str, Any], roles: dict[str, str]) -> Path:
    """Add the files (role -> relative path) with their hashes and sizes, and write manifest.json."""
    files = {}
    for role, rel in roles.items():
        p = directory / rel
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        files[role] = {"path": rel, "sha256": sha256(p), "bytes": size}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    out = directory / "manifest.json"
    out.write_text(json.dumps(manifest, indent=1))
    return out


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Open and validate a bundle: manifest present and parseable, version, format, every file present with the
    recorded size and hash."""
    path = Path(path)
    mf = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory (export one with `ciar export`)")
    if not mf.exists():
        raise BundleError(f"{path}: no manifest.json (is this an artifact bundle from `ciar export`?)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{mf}: missing fields {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{mf}: format_version {manifest['format_version']} is not supported (this runtime reads "
                          f"{FORMAT_VERSION}); re-export the bundle with this version of ciar")
    if manifest["format"] not in FORMATS:
        raise BundleError(f"{mf}: unknown format {manifest['format']!r}; expected one of {sorted(FORMATS)}")
    if manifest["quantize"] not in QUANTIZATIONS:
        raise BundleError(f"{mf}: unknown quantization {manifest['quantize']!r}")
    kind = gate_kind(manifest)
    if kind not in GATE_KINDS:
        raise BundleError(f"{mf}: unknown gate kind {kind!r}; expected one of {list(GATE_KINDS)} (re-export the "
                          "bundle with `ciar export --gate`)")
    if "cloud_calls" in manifest["gate"] and (problem := cloud_calls_problem(manifest["gate"]["cloud_calls"])):
        raise BundleError(f"{mf}: gate.cloud_calls: {problem}; measure it again with `ciar export calibrate "
                          f"{path}`, or delete the field")
    for role in ("device", *SHARED_FILES):
        if role not in manifest["files"]:
            raise BundleError(f"{mf}: no '{role}' file listed")
    for role, entry in manifest["files"].items():
        p = path / entry["path"]
        if not p.exists():
            raise BundleError(f"{path}: missing file {entry['path']} ({role}); the bundle is incomplete, re-export it")
        if verify_hashes:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"{path}: {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                                  "(truncated or replaced); re-export the bundle")
            if sha256(p) != entry["sha256"]:
                raise BundleError(f"{path}: {entry['path']} does not match its SHA-256 in manifest.json "
                                  "(corrupted or modified); re-export the bundle")
    return Bundle(path, manifest)
