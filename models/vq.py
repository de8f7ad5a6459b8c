"""The LlamaGen VQ image tokenizer (FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`).

Module and parameter names and shapes follow the official model, so `vq_ds16_c2i.pt`, `vq_ds16_t2i.pt` and
`vq_ds8_c2i.pt` load strictly into `VQModel(VQ_CONFIGS["VQ-16"])` / `VQModel(VQ_CONFIGS["VQ-8"])`, including the
`quantize.codebook_used` buffer (a rolling history of the last 65536 codes picked in training, stored as floats).
Differences from the original: `encode` returns `(quant, codes)`, `forward` returns `(recon, VQLosses)` with the
losses computed in eval mode too, the GroupNorm group count is configurable (`norm_groups`, 32 officially), and
attention uses `scaled_dot_product_attention` (the same single-head softmax(q k^T / sqrt(C)) v).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Length of the official `codebook_used` buffer.
USAGE_HISTORY = 65536


@dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of a LlamaGen VQ tokenizer; the defaults are the official VQ-16.

    Images are (B, in_channels, H, W) in [-1, 1] with H and W divisible by `downsample_factor`; codes are a
    (H / f, W / f) grid of indices into a `codebook_size` x `codebook_embed_dim` codebook.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    dropout: float = 0.0
    in_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            object.__setattr__(self, name, tuple(int(m) for m in getattr(self, name)))
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult) or not self.encoder_ch_mult:
            raise ValueError(f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult {self.decoder_ch_mult} "
                             "must be non-empty and of the same length (the same downsample factor)")
        positive = ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks", "in_channels",
                    "norm_groups")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad or min(self.encoder_ch_mult + self.decoder_ch_mult) < 1:
            raise ValueError(f"VQConfig sizes must be positive: {bad or 'ch_mult'}")
        widths = sorted({self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult})
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every block width {widths} (ch x ch_mult) must be divisible by "
                             f"norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def replace(self, **changes: Any) -> VQConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: channel multipliers as lists."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQConfig fields: {unknown}")
        return cls(**d)


VQ_CONFIGS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # 64x64 images -> 16x16 codes; the official layout (attention at the lowest resolution and in mid) at a
    # fraction of the width, cheap enough to train on a laptop CPU.
    "VQ-tiny": VQConfig(codebook_size=1024, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), z_channels=64,
                        ch=32, num_res_blocks=1, norm_groups=8),
}


@dataclass
class VQLosses:
    """Quantizer losses of one forward: `vq` (codebook), `commit` (beta-weighted commitment), `entropy`
    (LlamaGen's entropy penalty, ratio-weighted; 0 when the ratio is 0) and `usage`, the fraction of the
    codebook used in the batch."""

    vq: Tensor
    commit: Tensor
    entropy: Tensor
    usage: float


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 `nin_shortcut` when the width changes) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = _conv3(c_in, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: `res` blocks, each followed by `attn[i]` when `attn` is non-empty (lowest resolution)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool, cfg: VQConfig) -> None:
        super().__init__()
        widths = [c_in] + [c_out] * n_blocks
        self.res = nn.ModuleList(ResnetBlock(widths[i], c_out, cfg.norm_groups, cfg.dropout)
                                 for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out, cfg.norm_groups) for _ in range(n_blocks if with_attn else 0))

    def blocks(self, h: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class EncoderLevel(_Level):
    def __init__(self, c_in: int, c_out: int, with_attn: bool, downsample: bool, cfg: VQConfig) -> None:
        super().__init__(c_in, c_out, cfg.num_res_blocks, with_attn, cfg)
        self.downsample = Downsample(c_out) if downsample else None

    def forward(self, h: Tensor) -> Tensor:
        h = self.blocks(h)
        return h if self.downsample is None else self.downsample(h)


class DecoderLevel(_Level):
    def __init__(self, c_in: int, c_out: int, with_attn: bool, upsample: bool, cfg: VQConfig) -> None:
        super().__init__(c_in, c_out, cfg.num_res_blocks + 1, with_attn, cfg)
        self.upsample = Upsample(c_out) if upsample else None

    def forward(self, h: Tensor) -> Tensor:
        h = self.blocks(h)
        return h if self.upsample is None else self.upsample(h)


def _mid(channels: int, cfg: VQConfig) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout),
                          AttnBlock(channels, cfg.norm_groups),
                          ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)])


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H / f, W / f)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mult = cfg.encoder_ch_mult
        last = len(mult) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        widths = [cfg.ch] + [cfg.ch * m for m in mult]
        self.conv_blocks = nn.ModuleList(EncoderLevel(widths[i], widths[i + 1], i == last, i != last, cfg)
                                         for i in range(len(mult)))
        self.mid = _mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        self.conv_out = _conv3(widths[-1], cfg.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, in_channels, h * f, w * f). `conv_blocks[0]` is the lowest
    resolution (the official order)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mult = cfg.decoder_ch_mult
        last = len(mult) - 1
        top = cfg.ch * mult[last]
        self.conv_in = _conv3(cfg.z_channels, top)
        self.mid = _mid(top, cfg)
        levels, c_in = [], top
        for i in reversed(range(len(mult))):
            levels.append(DecoderLevel(c_in, cfg.ch * mult[i], i == last, i != 0, cfg))
            c_in = cfg.ch * mult[i]
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = _conv3(c_in, cfg.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """LlamaGen's (MaskGIT's) entropy penalty on (N, V) affinities: mean per-sample entropy (confident
    assignments) minus the entropy of the mean assignment (a spread-out codebook)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    sample_entropy = -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantizer (L2-normalised vectors and codebook when `codebook_l2_norm`) with a
    straight-through gradient."""

    codebook_used: Tensor | None

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if cfg.codebook_l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY) if cfg.codebook_show_usage else None)

    def codebook(self) -> Tensor:
        """(V, D) codebook vectors as used for lookup (unit-norm when `codebook_l2_norm`)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes -> (B, D, h, w) codebook vectors."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def _assign(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, D, h, w) latents -> ((B, h, w, D) latents, normalised when `codebook_l2_norm`; their nearest
        codebook vectors; (B, h, w) codes; (N, V) squared distances). Training calls record the codes."""
        z = z.permute(0, 2, 3, 1)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        emb = self.codebook()
        dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        codes = dist.argmin(dim=1)
        if self.training and self.codebook_used is not None:
            self._record(codes)
        return z, emb[codes].view_as(z), codes.view(z.shape[:3]), dist

    @staticmethod
    def _straight_through(z: Tensor, z_q: Tensor) -> Tensor:
        """The values of z_q with the gradient of z, channels first."""
        return (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) latents -> (straight-through quantized latents, (B, h, w) codes)."""
        z, z_q, codes, _ = self._assign(z)
        return self._straight_through(z, z_q), codes

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, VQLosses]:
        """`encode` plus the losses."""
        z, z_q, codes, dist = self._assign(z)
        ratio = self.cfg.entropy_loss_ratio
        losses = VQLosses(
            vq=F.mse_loss(z_q, z.detach()),
            commit=self.cfg.commit_loss_beta * F.mse_loss(z, z_q.detach()),
            entropy=ratio * entropy_loss(-dist) if ratio else z.new_zeros(()),
            usage=codes.unique().numel() / self.cfg.codebook_size,
        )
        return self._straight_through(z, z_q), codes, losses

    @torch.no_grad()
    def dead_codes(self) -> Tensor:
        """(V,) bool: codes absent from the `codebook_used` history (the last USAGE_HISTORY training
        assignments). The history starts as zeros, so code 0 counts as used until the history has filled."""
        if self.codebook_used is None:
            raise ValueError("dead_codes needs the codebook_used history (codebook_show_usage=True)")
        used = torch.zeros(self.cfg.codebook_size, dtype=torch.bool, device=self.codebook_used.device)
        used[self.codebook_used.long()] = True
        return ~used

    @torch.no_grad()
    def reinit_dead_codes(self, z: Tensor, generator: torch.Generator, dead: Tensor | None = None,
                          sample: str = "uniform", weights: Tensor | None = None,
                          limit: int | None = None) -> Tensor:
        """Dead-code re-initialisation: overwrite every dead code with an encoder output drawn from `z`, the
        (B, D, h, w) latents of a training batch (as `forward` sees them: normalised when `codebook_l2_norm`).

        `dead`: (V,) bool, default `dead_codes()`. `sample`: "uniform" draws latents uniformly; "distance" draws
        them with probability proportional to their squared distance to the nearest codebook vector (k-means++
        style: latents the codebook serves worst are favoured). `weights`: optional non-negative (B, h, w)
        per-latent factors multiplied into those probabilities (e.g. each token's reconstruction error, so that
        new codes go where the image is drawn wrong rather than splitting well-drawn flat regions). `limit`: at
        most this many codes, a random subset of the dead ones (the rest stay dead until a later call). Draws
        are without replacement while enough latents have non-zero probability. Returns the (sorted) indices
        replaced.
        """
        if sample not in ("uniform", "distance"):
            raise ValueError(f"sample must be 'uniform' or 'distance', got {sample!r}")
        if weights is not None and weights.shape != (z.shape[0], *z.shape[2:]):
            raise ValueError(f"weights must be (B, h, w) = {(z.shape[0], *z.shape[2:])}, got {tuple(weights.shape)}")
        dead = self.dead_codes() if dead is None else dead.to(torch.bool)
        if dead.shape != (self.cfg.codebook_size,):
            raise ValueError(f"dead must be a ({self.cfg.codebook_size},) mask, got {tuple(dead.shape)}")
        idx = dead.nonzero().flatten()
        if limit is not None and idx.numel() > limit:
            keep = torch.randperm(idx.numel(), generator=generator)[:max(0, limit)]
            idx = idx[keep.to(idx.device)].sort().values
        if idx.numel() == 0:
            return idx
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        if self.cfg.codebook_l2_norm:
            flat = F.normalize(flat, dim=-1)
        prob = torch.ones(flat.shape[0])
        if sample == "distance":
            emb = self.codebook().detach().float()
            dist = (flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()).min(1).values
            prob = dist.clamp_min(0).cpu() + 1e-12
        if weights is not None:
            prob = prob * weights.detach().reshape(-1).float().clamp_min(0).cpu()
        if not prob.sum() > 0:
            raise ValueError("every latent has zero sampling probability")
        replace = idx.numel() > int((prob > 0).sum())
        pick = torch.multinomial(prob, idx.numel(), replacement=replace, generator=generator)
        self.embedding.weight[idx] = flat[pick.to(flat.device)].to(self.embedding.weight.dtype)
        return idx

    @torch.no_grad()
    def _record(self, codes: Tensor) -> None:
        """Shift the newest codes into the rolling `codebook_used` history (the official bookkeeping)."""
        used = self.codebook_used
        n = min(codes.numel(), used.numel())
        used.copy_(torch.cat([used[n:], codes[-n:].to(used.dtype)]))


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    def _check_images(self, x: Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"expected images of shape (B, {c}, H, W) with H and W positive multiples of {f}, "
                             f"got {tuple(x.shape)}")

    def _latents(self, x: Tensor) -> Tensor:
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> (quantized latents (B, D, H/f, W/f), int64 codes (B, H/f, W/f))."""
        return self.quantize.encode(self._latents(x))

    def decode(self, quant: Tensor) -> Tensor:
        """Quantized latents (B, D, h, w) -> images (B, C, h*f, w*f)."""
        d = self.config.codebook_embed_dim
        if quant.ndim != 4 or quant.shape[1] != d:
            raise ValueError(f"expected quantized latents of shape (B, {d}, h, w), got {tuple(quant.shape)}")
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """Codes (B, h, w), or (B, h*w) with `shape` = (h, w) or LlamaGen's (B, D, h, w) (a square grid when
        omitted) -> images (B, C, h*f, w*f)."""
        return self.decode(self.quantize.lookup(self._code_grid(codes, shape)))

    def _code_grid(self, codes: Tensor, shape: Sequence[int] | None) -> Tensor:
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim == 2:
            length = codes.shape[1]
            if shape is None:
                side = math.isqrt(length)
                h, w = side, side
            elif len(shape) in (2, 4):
                h, w = shape[-2:]
            else:
                raise ValueError(f"shape must be (h, w) or (B, D, h, w), got {tuple(shape)}")
            if h * w != length:
                raise ValueError(f"cannot arrange {length} codes per image as a {h}x{w} grid; pass shape=(h, w)")
            codes = codes.reshape(codes.shape[0], h, w)
        elif codes.ndim != 3:
            raise ValueError(f"expected codes of shape (B, h, w) or (B, h*w), got {tuple(codes.shape)}")
        v = self.config.codebook_size
        # A data-dependent check: eager only, so that decode_code stays traceable for export.
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and codes.numel() and (codes.min() < 0 or codes.max() >= v):
            raise ValueError(f"codes must lie in [0, {v}), got [{codes.min().item()}, {codes.max().item()}]")
        return codes

    def forward(self, x: Tensor) -> tuple[Tensor, VQLosses]:
        """Reconstruction (B, C, H, W) and the quantizer losses (straight-through gradients to the encoder)."""
        quant, _, losses = self.quantize(self._latents(x))
        return self.decode(quant), losses

    @torch.no_grad()
    def codebook_neighbours(self, k: int, chunk: int = 1024) -> Tensor:
        """(V, k) int64: for every code, its k nearest other codes by L2 distance between the (normalised)
        codebook vectors, nearest first (LANTERN's latent proximity sets)."""
        emb = self.quantize.codebook().float()
        v = emb.shape[0]
        if not 1 <= k < v:
            raise ValueError(f"k must be in [1, {v - 1}] for a codebook of {v} codes, got {k}")
        out = []
        for start in range(0, v, chunk):
            rows = emb[start:start + chunk]
            dist = torch.cdist(rows, emb, compute_mode="donot_use_mm_for_euclid_dist")
            idx = torch.arange(start, start + rows.shape[0], device=emb.device)
            dist[idx - start, idx] = float("inf")
            out.append(dist.topk(k, dim=1, largest=False, sorted=True).indices)
        return torch.cat(out)
