"""ONNX export: the device graph (cache in / cache out), the caption encoder and the VQ decoder.

Legacy TorchScript exporter (opset 17): `../shared/research/export.md` measured its graph about 2x faster in
onnxruntime than the dynamo exporter's. int8 is dynamic quantization with **unsigned** weights (QUInt8): the
default signed weights saturate on AVX2 CPUs without VNNI and lose accuracy. int4 is block-wise (32) weight-only
quantization of the MatMuls (MatMulNBits).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ciar.models.sampling import draw_table

from .graph import ROWS, CaptionGraph, DeviceGraph, VQDecoderGraph

OPSET = 17
DEVICE_INPUTS = ["embeds", "input_pos", "neighbours", "k_cache", "v_cache", "cfg_scale", "temperature"]
DEVICE_OUTPUTS = ["centre", "u", "features", "k_new", "v_new", "cdf"]
NEIGHBOUR_SCALE_NODES = "/neighbour/"  # in the traced names of `inter_head.neighbour`'s nodes, after any scope


def export_module(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                  dynamic: dict | None = None) -> None:
    """`module(*args)` to ONNX at `path` with this project's exporter settings (legacy exporter, opset 17)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant per graph
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic or {})


def device_example_inputs(graph: DeviceGraph, length: int = 1) -> tuple[torch.Tensor, ...]:
    cfg = graph.device.config
    shape = graph.cache_shape()
    return (torch.zeros(ROWS, length, cfg.dim), torch.arange(cfg.cls_token_num, cfg.cls_token_num + length),
            torch.full((length, 2), -1), torch.zeros(shape), torch.zeros(shape), torch.tensor([1.0]),
            torch.tensor([1.0]))


class OnnxDeviceGraph(torch.nn.Module):
    """`DeviceGraph` plus `cdf` (1, L, V) float64: the draw table of the centre logits (`draw_table`), so the
    torch-free runtime's per-token draw is one search instead of four numpy calls on cold caches (RUNTIME.md).
    ONNX only: the ExecuTorch and Core ML loops run outside Python and draw from the centre (Core ML has no
    float64)."""

    def __init__(self, graph: DeviceGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        centre, *rest = self.graph(*inputs)
        return (centre, *rest, draw_table(centre))


def device_dynamic_axes(outputs: list[str]) -> dict[str, dict[int, str]]:
    """The device graph's one dynamic dimension, the step's length: dim 1 of `embeds` and of every per-position
    output, dim 0 of `input_pos` and `neighbours`, dim 3 of the new cache rows."""
    rows = {"k_new", "v_new"}
    return {"embeds": {1: "length"}, "input_pos": {0: "length"}, "neighbours": {0: "length"},
            **{name: {3: "length"} if name in rows else {1: "length"} for name in outputs}}


def export_device_onnx(graph: DeviceGraph, path: Path) -> None:
    export_module(OnnxDeviceGraph(graph), device_example_inputs(graph, 2), path, DEVICE_INPUTS, DEVICE_OUTPUTS,
                  device_dynamic_axes(DEVICE_OUTPUTS))


def export_caption_onnx(graph: CaptionGraph, path: Path) -> None:
    n = graph.text.config.max_tokens
    ids = torch.zeros(1, n, dtype=torch.long)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :5] = True
    export_module(graph, (ids, mask), path, ["ids", "mask"], ["prefix_embeds"])


def export_vq_onnx(graph: VQDecoderGraph, grid: int, path: Path) -> None:
    export_module(graph, (torch.zeros(1, grid, grid, dtype=torch.long),), path, ["codes"], ["image"])


def quantize_onnx(src: Path, dst: Path, quantize: str) -> None:
    """int8: dynamic, per-channel, unsigned weights; int4: MatMulNBits with blocks of 32. The neighbour scale's
    nodes stay float in both."""
    if quantize not in ("int8", "int4"):
        raise ValueError(f"unknown ONNX quantization {quantize!r}")
    import onnx
    model = onnx.load(str(src))
    # the Inter-Head's neighbour scale (9 -> 32 -> 1) stays float: a few hundred weights that scale every radius
    keep = [n.name for n in model.graph.node if NEIGHBOUR_SCALE_NODES in n.name]
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(model, str(dst), weight_type=QuantType.QUInt8, per_channel=True, nodes_to_exclude=keep)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, nodes_to_exclude=keep)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)


def save_token_embeddings(graph: DeviceGraph, path: Path) -> None:
    np.save(path, graph.device.tok_embeddings.weight.detach().float().numpy())
