"""`ciar export`: write an artifact bundle (DESIGN.md) for one format and quantization."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ciar.models.builtin import BuiltinModels
from ciar.models.text import PAD_ID, TOKEN_PATTERN, UNK_ID
from ciar.runtime.bundle import (DEFAULT_CLOUD_RATE, FORMATS, PREFIX_FRACTION, QUANTIZATIONS, SHARED_FILES,
                                 write_manifest)

from . import onnx_export
from .calibration import u_quantiles
from .graph import GATES, CaptionGraph, DeviceGraph, VQDecoderGraph

SUPPORTED = {fmt: ("none", "int8", "int4") for fmt in ("onnx", "executorch", "coreml")}
# Core ML converts the bare graph (its features output has no columns), but no Core ML runtime here can show that a
# device loads it: refused until one has
BARE_GATE_FORMATS = ("onnx", "executorch")


class ExportError(ValueError):
    """An export that cannot be done: the message says why and what to try."""


def export_bundle(models: BuiltinModels, fmt: str, quantize: str, out: Path, *, tau: float | None = None,
                  feature_top: int = 8, gate: str = "interval", log: Callable[[str], None] = print) -> Path:
    """Write the bundle. `gate`: what the device graph's U scores, the Inter-Head's interval (CIAR) or a bare
    gate's score of the device's own distribution ("entropy", "maxprob", "latent"), without the Inter-Head's cost
    or its features."""
    if gate not in GATES:
        raise ExportError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")
    if gate != "interval" and fmt not in BARE_GATE_FORMATS:
        raise ExportError(f"a bare-gate ({gate}) device graph exports to {' or '.join(BARE_GATE_FORMATS)} in this "
                          f"version, not {fmt}")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize not in SUPPORTED.get(fmt, ()):
        raise ExportError(f"{fmt} export with quantize={quantize} is not available in this version "
                          f"(supported: {SUPPORTED})")
    out.mkdir(parents=True, exist_ok=True)
    device_graph = DeviceGraph(models.device, feature_top, gate, models.codebook())
    grid = models.device.config.grid_size
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        log(f"[{time.perf_counter() - t0:6.1f}s] {msg}")

    step("caption encoder -> caption_encoder.onnx")
    onnx_export.export_caption_onnx(CaptionGraph(models.text, models.device), out / SHARED_FILES["caption_encoder"])
    step("VQ decoder -> vq_decoder.onnx")
    onnx_export.export_vq_onnx(VQDecoderGraph(models.vq), grid, out / SHARED_FILES["vq_decoder"])
    onnx_export.save_token_embeddings(device_graph, out / SHARED_FILES["token_embeddings"])
    device_file = FORMATS[fmt]
    head = "Inter-Head" if gate == "interval" else f"{gate} gate"
    step(f"device model + {head} -> {device_file} ({quantize})")
    if fmt == "onnx":
        if quantize == "none":
            onnx_export.export_device_onnx(device_graph, out / device_file)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = Path(tmp) / "device_fp32.onnx"
                onnx_export.export_device_onnx(device_graph, fp32)
                step(f"quantizing ({quantize})")
                onnx_export.quantize_onnx(fp32, out / device_file, quantize)
    else:
        _export_stateful_device(fmt, device_graph, out / device_file, quantize)
    step(f"calibrating tau (quantiles of the {gate} score on held-out prompts)")
    quantiles = u_quantiles(models, device_graph)
    cfg = models.device.config
    manifest = {
        "format": fmt, "quantize": quantize,
        "model": {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "n_layer": cfg.n_layer, "kv_heads": cfg.kv_heads,
                  "head_dim": cfg.head_dim, "cls_token_num": cfg.cls_token_num, "grid": grid,
                  "block_size": cfg.block_size, "rows": 2, "cache_shape": list(device_graph.cache_shape()),
                  "feature_dim": device_graph.feature_dim, "feature_top": feature_top,
                  "device_config": cfg.to_dict()},
        "caption": {"vocab": list(models.caption_vocab), "max_tokens": models.max_caption_tokens,
                    "token_pattern": TOKEN_PATTERN, "lowercase": True, "pad_id": PAD_ID, "unk_id": UNK_ID},
        "sampling": {"cfg_scale": models.sampling.cfg_scale, "temperature": models.sampling.temperature,
                     "top_k": models.sampling.top_k, "top_p": models.sampling.top_p},
        "gate": {"kind": gate, "tau": tau, "cloud_rate": DEFAULT_CLOUD_RATE, "prefix_fraction": PREFIX_FRACTION[gate],
                 "u_quantiles": quantiles},
        "image": {"height": grid * 4, "width": grid * 4},
        "exported_by": "ciar export", "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    roles = {"device": device_file, **SHARED_FILES}
    write_manifest(out, manifest, roles)
    step(f"bundle written to {out}")
    return out


def _export_stateful_device(fmt: str, graph: DeviceGraph, path: Path, quantize: str) -> None:
    """ExecuTorch / Core ML: the device graph with its KV cache as state; their toolchains load lazily."""
    if path.is_dir():
        shutil.rmtree(path)
    try:
        if fmt == "executorch":
            from .executorch_export import export_device_executorch as export
        else:
            from .coreml_export import export_device_coreml as export
        export(graph, path, quantize)
    except ImportError as e:
        raise ExportError(f"{fmt} export needs {e.name or 'its toolchain'}, which is not installed: "
                          "pip install 'ciar[export]'") from e


def replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
