"""ExecuTorch export: the device graph with its KV cache as state (mutable buffers), lowered to XNNPACK.

`StatefulDeviceGraph` is `DeviceGraph` with the cache held in registered buffers instead of passed in. It
runs the model's own code (`GPT.forward_embeddings` writes the cache in place with `index_copy_`, which
torch.export functionalizes into a buffer mutation); Core ML exports it as is (`coreml_export.py`).

The .pte uses `LlamaOpsDeviceGraph`: the same model with each attention's cache write and attention replaced by
ExecuTorch's LLM ops (`llama::update_cache`, `llama::custom_sdpa`, cache layout (B, S, H, D)), 1.6-1.8x faster per
token here than the generic graph, whose cache write and masked attention stay outside the XNNPACK delegate. The
ops write and attend causally from `input_pos[0]`: positions must be consecutive, as the runtime always passes them.
int8 is torchao 8da8w (int8 per-channel weights, dynamic int8 activations), int4 is 8da4w with groups of 32 (8-bit
grouped weights do not lower to XNNPACK). The cache buffers carry their zero initial state in the program
(`InitializedMutableBufferPass`), so a freshly loaded method starts from an empty cache.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ciar.models.gpt import Attention, LayerListKVCache

from .graph import ROWS, DeviceGraph, device_outputs

GROUP = 32  # int4 weight group size


class StatefulDeviceGraph(nn.Module):
    """One step of DeviceGraph whose KV cache is module state: buffers `k_cache_{i}` / `v_cache_{i}`, one pair per
    layer (independent tensors, so in-place writes stay visible), each `DeviceGraph.cache_shape()[1:]`."""

    cache_type: type[LayerListKVCache] = LayerListKVCache

    def __init__(self, graph: DeviceGraph) -> None:
        super().__init__()
        self.model = copy.deepcopy(graph.device)  # quantization edits it
        self.feature_top, self.gate = graph.feature_top, graph.gate
        self.register_buffer("codebook", None if graph.codebook is None else graph.codebook.clone())
        self.n_layer, rows, heads, self.max_seq, head_dim = graph.cache_shape()
        for i in range(self.n_layer):
            for kv in "kv":
                self.register_buffer(f"{kv}_cache_{i}", torch.zeros(self.buffer_shape(rows, heads, head_dim)))

    def buffer_shape(self, rows: int, heads: int, head_dim: int) -> tuple[int, ...]:
        return rows, heads, self.max_seq, head_dim

    def forward(self, embeds: Tensor, input_pos: Tensor, neighbours: Tensor, cfg_scale: Tensor,
                temperature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """embeds (2, L, dim), input_pos (L,), neighbours (L, 2), cfg_scale (1,), temperature (1,) -> centre
        (1, L, V), u (1, L),
        features (1, L, feature_dim); writes the cache at input_pos (the outputs of DeviceGraph.forward)."""
        cache = self.cache_type([getattr(self, f"k_cache_{i}") for i in range(self.n_layer)],
                                [getattr(self, f"v_cache_{i}") for i in range(self.n_layer)],
                                torch.ones(ROWS, self.max_seq, dtype=torch.bool))
        out = self.model.forward_embeddings(embeds, input_pos=input_pos, cache=cache)
        return device_outputs(self.model, out.logits, out.hidden, neighbours, cfg_scale, temperature,
                              self.feature_top, self.gate, self.codebook)


class _SeqMajorCache(LayerListKVCache):
    """Per-layer caches in the (B, S, H, D) layout of the llama ops."""

    @property
    def max_seq(self) -> int:
        return self.k[0].shape[1]


class _LlamaOpsAttention(nn.Module):
    """`Attention` (same weights, same RoPE) whose cache write and causal attention are ExecuTorch's llama ops."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor,
                cache: tuple[Tensor, Tensor]) -> Tensor:
        """The causal mask is implied by the start position (the model's mask has no padded keys here)."""
        bsz, seqlen, dim = x.shape
        q, k, v = self.attention.qkv(x, rope)
        k_cache, v_cache = cache
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seqlen <= k_cache.shape[1])
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
        return self.attention.wo(out.reshape(bsz, seqlen, dim))


class LlamaOpsDeviceGraph(StatefulDeviceGraph):
    """StatefulDeviceGraph with ExecuTorch's LLM cache and attention ops; buffers (2, S, kv_heads, head_dim)."""

    cache_type = _SeqMajorCache

    def __init__(self, graph: DeviceGraph) -> None:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)

        super().__init__(graph)
        for layer in self.model.layers:
            layer.attention = _LlamaOpsAttention(layer.attention)

    def buffer_shape(self, rows: int, heads: int, head_dim: int) -> tuple[int, ...]:
        return rows, self.max_seq, heads, head_dim


def export_stateful(module: StatefulDeviceGraph) -> torch.export.ExportedProgram:
    """torch.export with a dynamic sequence length L in 1..max_seq_len (prefill, decode and token blocks)."""
    module.eval().requires_grad_(False)
    cfg = module.model.config
    length = torch.export.Dim("L", min=1, max=cfg.max_seq_len)
    p = cfg.cls_token_num
    args = (torch.zeros(ROWS, p, cfg.dim), torch.arange(p), torch.full((p, 2), -1), torch.tensor([1.0]),
            torch.tensor([1.0]))
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=({1: length}, {0: length}, {0: length}, None, None),
                                   strict=False)


# int8: the head that ranks the tokens stays float (v1 weights: argmax agreement 0.969 -> 0.973, docs/EXPORT.md);
# every format: the Inter-Head's neighbour scale (9 -> 32 -> 1, a few hundred weights) stays float
KEEP_FLOAT = ("model.output",)
NEIGHBOUR_SCALE = "model.inter_head.neighbour."


def quantize_module(module: nn.Module, quantize: str) -> None:
    """torchao in place: int8 = 8da8w per output channel, int4 = 8da4w in groups of 32 (Linear layers only)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quantize == "int8":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    elif quantize == "int4":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP))
    else:
        raise ValueError(f"unknown ExecuTorch quantization {quantize!r}")
    keep = KEEP_FLOAT if quantize == "int8" else ()
    quantize_(module, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and m.in_features % GROUP == 0
              and name not in keep and not name.startswith(NEIGHBOUR_SCALE))


def export_device_executorch(graph: DeviceGraph, path: Path, quantize: str) -> None:
    """Write device.pte: forward(embeds, input_pos, neighbours, cfg_scale, temperature) -> (centre, u, features)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    from .bundle import ExportError

    module = LlamaOpsDeviceGraph(graph)
    if quantize != "none":
        quantize_module(module, quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # toolchain deprecations, and the emitter's note on mutable buffers
        ep = export_stateful(module)
        try:
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False))
            program = edge.to_executorch(ExecutorchBackendConfig(
                extract_delegate_segments=True, passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])]))
        except Exception as e:  # lowering raises assertion, runtime and NotImplemented errors alike
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"ExecuTorch lowering failed ({type(e).__name__}: {first}); try another "
                              "--quantize, or the onnx format") from e
    path.write_bytes(program.buffer)
