"""The exported graphs, as plain nn.Modules over the trained models.

- `DeviceGraph`: ONE step of the device model + Inter-Head on input embeddings (the doubled CFG batch), with the KV
  cache passed in and only read (`ReadOnlyKVCache`: attention over the cached positions and the step's own keys as
  two blocks; writing rows into an input tensor would make onnxruntime copy the whole cache every step), the keys
  and values of the step's own positions returned (the caller writes those rows into its cache), and the ids of
  the tokens left of and above each predicted position (the Inter-Head's neighbour scale reads them). Outputs the
  processed centre logits (CFG-combined, temperature-scaled), the U score and the compact interval features, so the
  runtime only samples and compares U with tau. Exported with a bare gate (`gate="entropy"`, `"maxprob"` or
  `"latent"`) it is the backbone, the output head and CFG only: U is that gate's score of the processed centre
  (`bare_score`; the latent gate's graph holds the VQ codebook as a constant) and the features have no columns (a
  bare gate sends the cloud none). The condition prefix and image tokens enter the same way (embeddings), so prefill
  and decode are one graph in every format; the token-embedding lookup is a row copy the runtime does from
  `token_embeddings.npy`.
- `CaptionGraph`: caption word ids -> the device's prefix embeddings for [cond; uncond].
- `VQDecoderGraph`: a grid of codes -> an RGB image in [0, 255].
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ciar.models import DeviceModel, interval_stats
from ciar.models.gpt import ReadOnlyKVCache
from ciar.models.interval import cfg_combine_interval, interval_bounds
from ciar.models.sampling import BARE_SCORES, bare_score, cfg_combine
from ciar.models.text import CaptionEncoder
from ciar.models.vq import VQModel

ROWS = 2  # the CFG batch [cond; uncond]
GATES = ("interval", *BARE_SCORES)  # what a device graph's U scores: the Inter-Head's interval, or a bare gate's


def device_outputs(device: DeviceModel, logits: Tensor, hidden: Tensor, neighbours: Tensor, cfg_scale: Tensor,
                   temperature: Tensor, feature_top: int, gate: str = "interval",
                   codebook: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """What every exported device graph returns, from the [cond; uncond] logits and hidden states and the L
    positions' neighbour ids (L, 2): the processed centre logits (1, L, V), U (1, L) and the interval features
    (1, L, dim + top + 3). `DeviceModel.processed_box` with tensor scalars (one graph for every setting). Behind a
    bare gate: the centre, the gate's score of softmax(centre) (the latent gate's over `codebook`) and features
    (1, L, 0)."""
    if gate in BARE_SCORES:
        c = cfg_combine(logits, cfg_scale) / temperature
        return c, bare_score(gate, torch.softmax(c, dim=-1), codebook), hidden[:1, :, :0]
    if gate != "interval":
        raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
    c, r = cfg_combine_interval(logits, device.inter_head(hidden), cfg_scale)
    c, r = c / temperature, r / temperature
    stats = interval_stats(*interval_bounds(c, device.inter_head.scale(c, r, neighbours[None])), feature_top)
    return c, stats[..., -1], torch.cat([hidden[:1], stats], dim=-1)  # U is the stats' last column


def _per_layer(cache: Tensor) -> list[Tensor]:
    """Views of a (n_layer, ...) cache, one per layer. Squeezing the one layer of a one-layer model copies nothing;
    unbinding (a Split in ONNX) would copy it."""
    return [cache.squeeze(0)] if cache.shape[0] == 1 else list(cache.unbind(0))


def exportable(model: DeviceModel) -> DeviceModel:
    """A copy whose RoPE table is a persistent buffer: the legacy ONNX exporter takes its constants from the state
    dict and would otherwise bake the non-persistent table in as zeros."""
    model = copy.deepcopy(model).eval()
    table = model.freqs_cis
    del model.freqs_cis
    model.register_buffer("freqs_cis", table, persistent=True)
    return model


class DeviceGraph(nn.Module):
    def __init__(self, device: DeviceModel, feature_top: int = 8, gate: str = "interval",
                 codebook: Tensor | None = None) -> None:
        """`codebook`: the VQ codebook (V, D) the latent gate's U reads (`BuiltinModels.codebook()`); other gates
        ignore it."""
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
        self.device, self.feature_top, self.gate = exportable(device), feature_top, gate
        if gate == "latent" and codebook is None:
            raise ValueError("the latent gate's graph reads the VQ codebook: pass codebook=models.codebook()")
        self.register_buffer("codebook", codebook.detach().float().clone() if gate == "latent" else None)

    @property
    def feature_dim(self) -> int:
        """Width of the features output: [h_device; interval stats], or none behind a bare gate."""
        return self.device.config.dim + self.feature_top + 3 if self.gate == "interval" else 0

    def cache_shape(self, max_seq: int | None = None) -> tuple[int, ...]:
        c = self.device.config
        return (c.n_layer, ROWS, c.kv_heads, max_seq or c.max_seq_len, c.head_dim)

    def backbone(self, embeds: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor):
        """The device model over the step's embeddings, reading the cache: (its output, the `ReadOnlyKVCache`
        whose `new_k` / `new_v` hold the step's new rows)."""
        cache = ReadOnlyKVCache(_per_layer(k_cache), _per_layer(v_cache),
                                torch.ones(ROWS, k_cache.shape[3], dtype=torch.bool))
        return self.device.forward_embeddings(embeds, input_pos=input_pos, cache=cache), cache

    def forward(self, embeds: Tensor, input_pos: Tensor, neighbours: Tensor, k_cache: Tensor, v_cache: Tensor,
                cfg_scale: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """embeds (2, L, dim), input_pos (L,), neighbours (L, 2) int64 (the ids left of and above each position
        the outputs predict, -1 for none: `ciar.models.interval.neighbour_ids`), caches (n_layer, 2, kv_heads, S,
        head_dim), cfg_scale (1,), temperature (1,) -> centre (1, L, V), u (1, L), features (1, L, feature_dim),
        k_new, v_new (n_layer, 2, kv_heads, L, head_dim): the cache rows of positions input_pos, which the caller
        writes into its cache at those positions before the next step."""
        out, cache = self.backbone(embeds, input_pos, k_cache, v_cache)
        c, u, features = device_outputs(self.device, out.logits, out.hidden, neighbours, cfg_scale, temperature,
                                        self.feature_top, self.gate, self.codebook)
        return c, u, features, torch.stack(cache.new_k), torch.stack(cache.new_v)


class CaptionGraph(nn.Module):
    def __init__(self, text: CaptionEncoder, device: DeviceModel) -> None:
        super().__init__()
        self.text, self.device = text.eval(), device.eval()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (1, max_tokens) int64, mask (1, max_tokens) bool -> prefix embeddings (2, P, dim)."""
        features = self.text(ids, mask)
        return self.device.embed_condition(self.device.cfg_condition(features))


class VQDecoderGraph(nn.Module):
    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.vq = vq.eval()

    def forward(self, codes: Tensor) -> Tensor:
        """codes (1, h, w) int64 -> image (1, H, W, 3) float in [0, 255]."""
        x = self.vq.decode(self.vq.quantize.lookup(codes))
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)
