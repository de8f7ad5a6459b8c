"""Structural checks of a Core ML bundle, on any OS (Core ML prediction needs macOS).

The package is reopened without loading it, its interface is compared with the device-graph contract, and the MIL
program is rebuilt from it to count ops: every cache state must be written back (`coreml_update_state`) from a
cache-write op (`scatter` / `slice_update`), the failure a traced stateful model shows silently. Weights must be
finite and, for int8 / int4 bundles, every linear weight quantized to that width but the Inter-Head's
neighbour scale, which stays float.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import numpy as np

from ciar.runtime.bundle import Bundle

INPUTS = ["embeds", "input_pos", "neighbours", "cfg_scale", "temperature"]
OUTPUTS = ["centre", "u", "features"]
WRITE_OPS = {"scatter", "slice_update", "scatter_nd", "scatter_along_axis"}
PASS_THROUGH = {"cast", "identity"}
NEIGHBOUR_SCALE = "inter_head_neighbour"  # in the names of the neighbour scale's weight constants


def _check(name: str, ok: bool, detail: str = "") -> dict[str, Any]:
    return {"name": name, "pass": bool(ok), "detail": detail}


def _ops(block: Any) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _ops(inner)


def _producer(var: Any) -> Any:
    """The op that computes `var`, looking through casts and identities."""
    op = var.op
    while op is not None and op.op_type in PASS_THROUGH:
        op = op.inputs["x"].op
    return op


def _finite(op: Any) -> bool:
    if op.op_type.startswith("constexpr_"):
        value = op.materialized_val_inference()
    else:
        value = op.outputs[0].val
    value = np.asarray(value)
    return not np.issubdtype(value.dtype, np.floating) or bool(np.isfinite(value).all())


def coreml_checks(bundle: Bundle) -> list[dict[str, Any]]:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    from coremltools.converters.mil.mil import types

    path = bundle.file("device")
    m = bundle.manifest["model"]
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as e:  # coremltools raises plain Exceptions for unreadable packages
        return [_check(f"Core ML package {path.name} opens", False, f"{type(e).__name__}: {str(e)[:200]}")]
    out = [_check(f"Core ML package {path.name} opens", spec.WhichOneof("Type") == "mlProgram",
                  f"spec version {spec.specificationVersion}, {spec.WhichOneof('Type')}")]

    inputs, outputs = [i.name for i in spec.description.input], [o.name for o in spec.description.output]
    out.append(_check("inputs " + ", ".join(INPUTS), inputs == INPUTS, str(inputs)))
    out.append(_check("outputs " + ", ".join(OUTPUTS), outputs == OUTPUTS, str(outputs)))
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    expected = {f"{kv}_cache_{i}" for i in range(m["n_layer"]) for kv in "kv"}
    shape = list(m["cache_shape"][1:])
    out.append(_check("KV cache states (one k and one v per layer)",
                      set(states) == expected and all(s == shape for s in states.values()), str(states)))

    prog = load_mil(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    ops = [op for f in prog.functions.values() for op in _ops(f)]
    counts = Counter(op.op_type for op in ops)
    written = {op.inputs["state"].name for op in ops if op.op_type == "coreml_update_state"
               and _producer(op.inputs["value"]) is not None
               and _producer(op.inputs["value"]).op_type in WRITE_OPS}
    summary = {k: counts[k] for k in ("read_state", "coreml_update_state", *sorted(WRITE_OPS)) if counts[k]}
    out.append(_check("every cache state written back from a cache-write op", written == expected,
                      f"{summary}; written: {sorted(written)}"))

    weights = [op for op in ops if (op.op_type == "const" and np.size(op.outputs[0].val) > 1)
               or op.op_type.startswith("constexpr_")]
    bad = [op.name for op in weights if not _finite(op)]
    out.append(_check("weights finite", not bad, f"{len(weights)} weight tensors" + (f"; non-finite: {bad[:5]}"
                                                                                     if bad else "")))

    # the Inter-Head's neighbour scale stays float in every quantization (as in the ONNX and ExecuTorch exports;
    # its weights are under coremltools' 2048-element threshold)
    weights = [op.inputs["weight"].op for op in ops if op.op_type == "linear"]
    float_kept = [w for w in weights if NEIGHBOUR_SCALE in w.name]
    linear_weights = [w for w in weights if NEIGHBOUR_SCALE not in w.name]
    quantize = bundle.quantize
    if quantize == "none":
        quantized = [w for w in linear_weights if w.op_type.startswith("constexpr_")]
        ok = not quantized
    else:
        quantized = [w for w in linear_weights if w.op_type == "constexpr_blockwise_shift_scale"
                     and types.builtin_to_string(w.inputs["data"].dtype) == quantize]
        ok = len(quantized) == len(linear_weights) > 0
    ok = ok and len(float_kept) == 2 and not any(w.op_type.startswith("constexpr_") for w in float_kept)
    out.append(_check(f"linear weights match quantize={quantize}", ok,
                      f"{len(quantized)}/{len(linear_weights)} linear weights quantized; neighbour scale "
                      f"{'float' if ok else 'missing or quantized'} ({len(float_kept)} linear)"))

    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    out.append(_check("package size", size > 0, f"{size} bytes"))
    return out
