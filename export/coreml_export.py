"""Core ML export: the stateful device graph (`StatefulDeviceGraph`) as an iOS 18 mlprogram with the KV cache as
Core ML states (fp16) and a range shape for the sequence length L (1..max_seq_len), so prefill, decode and token
blocks share one model.

The graph is captured with torch.export (a traced stateful model converts but silently drops the cache write). Three
adjustments make coremltools 9.0 accept it, none changing the computation:
- the cache write `index_copy` (no converter) becomes MIL `scatter` along the position axis;
- boolean `__and__` / `__or__` of the attention mask become `logical_and` / `logical_or`;
- `scatter.value` (top-k exclusion in the interval bounds) becomes `scatter.src` with a filled tensor, because the
  value form's converter cannot take a symbolic length.
Precision: fp16 compute for "none"; int8 per-channel or int4 per-block(32) weights of the linear layers.
Prediction needs macOS; `coreml_checks.py` inspects the package on any OS.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .executorch_export import StatefulDeviceGraph, export_stateful
from .graph import DeviceGraph

OUTPUTS = ("centre", "u", "features")
BLOCK = 32  # int4 weight block size


def _register_index_copy() -> None:
    """Convert aten.index_copy(x, dim, index, src) to MIL scatter(data=x, indices=index, updates=src, axis=dim)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if "index_copy" in _TORCH_OPS_REGISTRY:
        return

    def index_copy(context, node) -> None:
        x, dim, index, src = _get_inputs(context, node, expected=4)
        context.add(mb.scatter(data=x, indices=index, updates=src, axis=dim.val, mode="update", name=node.name))

    register_torch_op(index_copy)


def _rewrite_for_coreml(ep: torch.export.ExportedProgram) -> None:
    """Replace the ops coremltools cannot convert here by equivalent ones, in place."""
    aten = torch.ops.aten
    logical = {aten.__and__.Tensor: aten.logical_and.default, aten.__or__.Tensor: aten.logical_or.default}
    graph = ep.graph
    for node in list(graph.nodes):
        if node.target in logical and node.meta["val"].dtype == torch.bool:
            node.target = logical[node.target]
        elif node.target == aten.scatter.value:
            x, dim, index, value = node.args
            dtype = x.meta["val"].dtype
            with graph.inserting_before(node):
                fill = graph.call_function(aten.full_like.default, (index, value), {"dtype": dtype})
            fill.meta["val"] = torch.full_like(index.meta["val"], value, dtype=dtype)
            node.target, node.args = aten.scatter.src, (x, dim, index, fill)
    ep.graph_module.recompile()


def export_device_coreml(graph: DeviceGraph, path: Path, quantize: str) -> None:
    """Write device.mlpackage: inputs embeds, input_pos, neighbours, cfg_scale, temperature; states k_cache_i / v_cache_i;
    outputs centre, u, features (fp32)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from .bundle import ExportError

    if quantize not in ("none", "int8", "int4"):
        raise ValueError(f"unknown Core ML quantization {quantize!r}")
    with warnings.catch_warnings():
        # toolchain deprecations, and fp16's overflow of the -FLT_MAX clip bound to -inf (same result)
        warnings.simplefilter("ignore")
        ep = export_stateful(StatefulDeviceGraph(graph)).run_decompositions({})
        _rewrite_for_coreml(ep)
        _register_index_copy()
        try:
            model = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                               outputs=[ct.TensorType(name=n, dtype=np.float32) for n in OUTPUTS],
                               compute_precision=ct.precision.FLOAT16)
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"Core ML conversion failed ({type(e).__name__}: {first}); check coremltools==9.0 "
                              "with numpy<2.4, or use the onnx or executorch format") from e
        if quantize != "none":
            op = (cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel")
                  if quantize == "int8" else
                  cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                              block_size=BLOCK))
            model = cto.linear_quantize_weights(model, config=cto.OptimizationConfig(op_type_configs={"linear": op}))
    model.save(str(path))
