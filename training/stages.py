"""The training stages of the built-in model. Each takes its stage config (a dict from
`training/configs/<stage>.json`) and returns trained modules; `builtin.py` chains them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ciar.models import (GPT, DeviceModel, GPTConfig, SamplingConfig, build_device_model, interfuse, interval_stats,
                         model_probs)
from ciar.models.generate import generate
from ciar.models.sampling import cfg_combine
from ciar.models.interval import interval_bounds, interval_log_bounds, neighbour_ids
from ciar.models.phi import IntervalProjection, PhiConfig
from ciar.models.text import CaptionEncoder, CaptionEncoderConfig
from ciar.models.vq import VQ_CONFIGS, VQConfig, VQModel

from .data import caption_batch, scene_batch
from .inter_dro import InterDROConfig, inter_dro_loss, rank_loss
from .layout import LAYOUT_SLOTS, LayoutHead, layout_loss, layout_targets
from .loop import cosine_schedule, run_loop
from .scenes import CAPTION_VOCAB, MAX_CAPTION_TOKENS, SceneStream


def _adamw(params, cfg: dict[str, Any]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.0))


def _drop_mask(seed: int, step: int, n: int, p: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(n, generator=g) < p


# ---- stage 1: VQ tokenizer -------------------------------------------------------------------------------------
def vq_config(cfg: dict[str, Any]) -> VQConfig:
    return VQConfig.from_dict({**VQ_CONFIGS[cfg["base"]].to_dict(), **cfg.get("overrides", {})})


def _pixel_weights(x: torch.Tensor, fg_weight: float, edge_weight: float = 0.0) -> torch.Tensor | None:
    """(B, 1, H, W) reconstruction weights: 1, plus `fg_weight` - 1 on pixels that differ from the image's top-left
    pixel (the background: shapes keep a margin inside their cells, so that corner is never covered), plus
    `edge_weight` on pixels next to a colour change (both sides of every shape outline, 8-neighbourhood). None
    when both add nothing (plain mean)."""
    if fg_weight == 1.0 and edge_weight == 0.0:
        return None
    fg = (x != x[:, :, :1, :1]).any(dim=1, keepdim=True).to(x.dtype)
    w = 1.0 + (fg_weight - 1.0) * fg
    if edge_weight:
        # a pixel is on an edge when the colour range over its 3x3 neighbourhood is non-zero
        hi, lo = F.max_pool2d(x, 3, 1, 1), -F.max_pool2d(-x, 3, 1, 1)
        w = w + edge_weight * (hi - lo > 0).any(dim=1, keepdim=True).to(x.dtype)
    return w


def _reinit_dead_codes(model: VQModel, opt: torch.optim.Optimizer, x: torch.Tensor, seed: int, step: int,
                       sample: str, limit: int | None = None) -> int:
    """Replace the codes unused over the quantizer's usage history with encoder outputs of batch `x` (drawn with a
    generator seeded by (seed, step): resumable), and clear AdamW's moments of the replaced rows. `sample`:
    "uniform" or "distance" (`VectorQuantizer.reinit_dead_codes`), or "error": latents drawn in proportion to the
    squared reconstruction error of their token's f x f pixel patch (new codes go where the image is drawn wrong)."""
    if sample not in ("uniform", "distance", "error"):
        raise ValueError(f"dead_code_sample must be 'uniform', 'distance' or 'error', got {sample!r}")
    weights = None
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
        if sample == "error":
            model.quantize.eval()  # this look-ahead must not enter the usage history
            quant, _ = model.quantize.encode(z)
            model.quantize.train()
            err = (model.decode(quant) - x).pow(2).mean(dim=1, keepdim=True)
            weights = F.avg_pool2d(err, model.config.downsample_factor)[:, 0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = model.quantize.reinit_dead_codes(z, g, sample="uniform" if sample == "error" else sample, weights=weights,
                                           limit=limit)
    state = opt.state.get(model.quantize.embedding.weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][idx] = 0.0
    return int(idx.numel())


def train_vq(cfg: dict[str, Any], out: Path) -> VQModel:
    """Reconstruction (L1 + L2) + codebook + commitment (+ entropy) losses. LlamaGen adds LPIPS and a GAN loss;
    flat-coloured scenes do not need them (and no perceptual network can be downloaded here).

    Optional keys (absent: the v0 recipe; the shipped `configs/vq.json` sets the weights, `configs/vq_v1.json` also
    the dead-code keys): `fg_weight`, the reconstruction weight of shape pixels against 1 for background pixels,
    and `edge_weight`, extra weight on shape outlines (`_pixel_weights`); `dead_code_every` N, `dead_code_until` S
    and `dead_code_sample` ("uniform" | "distance" | "error"): every N steps before step S (default: all steps),
    codes absent from the last 65536 training assignments are re-initialised from the batch's encoder outputs, at
    most `dead_code_max` of them per time when set (`VectorQuantizer.reinit_dead_codes`, `_reinit_dead_codes`)."""
    torch.manual_seed(cfg["seed"])
    model = VQModel(vq_config(cfg))
    opt = _adamw(model.parameters(), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))
    fg_weight, edge_weight = float(cfg.get("fg_weight", 1.0)), float(cfg.get("edge_weight", 0.0))
    every, until = int(cfg.get("dead_code_every", 0)), int(cfg.get("dead_code_until", cfg["steps"]))
    sample, limit = cfg.get("dead_code_sample", "uniform"), cfg.get("dead_code_max")
    if every and not model.config.codebook_show_usage:
        raise ValueError("dead_code_every needs codebook_show_usage=True (the usage history)")

    def step(i: int) -> dict[str, float]:
        x, _ = scene_batch(cfg["seed"], i, cfg["batch"])
        extra: dict[str, float] = {}
        # between the optimizer step of i - 1 and the forward of i (batch i's latents, the current weights)
        if every and 0 < i < until and i % every == 0:
            extra["reinit"] = _reinit_dead_codes(model, opt, x, cfg["seed"], i, sample, limit)
        recon, losses = model(x)
        w = _pixel_weights(x, fg_weight, edge_weight)
        if w is None:
            rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        else:
            err = (recon - x).abs() + (recon - x).pow(2)
            rec = (w * err).mean() / w.mean()
        loss = rec + losses.vq + losses.commit + losses.entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "rec": rec.item(), "usage": float(losses.usage), **extra}

    run_loop("vq", {"vq": model}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return model


# ---- stage 2: caption encoder, pre-trained on the layout and then frozen (as LlamaGen freezes T5) --------------
def text_config(cfg: dict[str, Any]) -> CaptionEncoderConfig:
    return CaptionEncoderConfig(vocab_size=len(CAPTION_VOCAB), max_tokens=MAX_CAPTION_TOKENS, **cfg["text"])


def train_text(cfg: dict[str, Any], out: Path) -> CaptionEncoder:
    """Caption -> ten slots, each trained to name its cell's shape (or none) or the background
    (`ciar.training.layout`). Captions only (no image model): 1500 steps take 4 minutes on 2 CPU cores."""
    torch.manual_seed(cfg["seed"])
    tcfg = text_config(cfg)
    if tcfg.n_slots != LAYOUT_SLOTS:
        raise ValueError(f"the layout objective needs n_slots={LAYOUT_SLOTS} (9 cells + background), "
                         f"got {tcfg.n_slots}")
    text, head = CaptionEncoder(tcfg), LayoutHead(tcfg.out_dim)
    params = list(text.parameters()) + list(head.parameters())
    opt = _adamw(params, cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))

    def step(i: int) -> dict[str, float]:
        _, captions, scenes = SceneStream(seed=(cfg["seed"], i)).batch(cfg["batch"])
        loss, parts = layout_loss(head(text(*caption_batch(captions))), layout_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    run_loop("text", {"text": text, "layout_head": head}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200),
             scheduler=sched)
    return text.eval()


# ---- stage 3: cloud GPT ------------------------------------------------------------------------------------------
def cloud_config(cfg: dict[str, Any], vq: VQModel, text: CaptionEncoderConfig) -> GPTConfig:
    return GPTConfig(**cfg["gpt"], vocab_size=vq.config.codebook_size, model_type="t2i",
                     cls_token_num=text.n_out, caption_dim=text.out_dim)


@torch.no_grad()
def tokenize(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    return vq.encode(images)[1].flatten(1)


@dataclass
class CloudModels:
    text: CaptionEncoder
    cloud: GPT


def train_cloud(cfg: dict[str, Any], vq: VQModel, text: CaptionEncoder, out: Path) -> CloudModels:
    """Next-token cross-entropy on VQ codes given the frozen caption encoder's features; captions dropped to the
    null caption with probability class_dropout_prob (classifier-free guidance)."""
    torch.manual_seed(cfg["seed"])
    cloud = GPT(cloud_config(cfg, vq, text.config))
    vq.eval()
    text.eval()
    for p in text.parameters():
        p.requires_grad_(False)
    opt = _adamw(cloud.parameters(), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 100))

    def step(i: int) -> dict[str, float]:
        x, captions = scene_batch(cfg["seed"], i, cfg["batch"])
        codes = tokenize(vq, x)
        with torch.no_grad():
            cond = text(*caption_batch(captions))
        drop = _drop_mask(cfg["seed"], i, len(captions), cloud.config.class_dropout_prob)
        logits = cloud.image_logits(cond, codes, cond_drop=drop).logits
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cloud.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    run_loop("cloud", {"cloud": cloud}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return CloudModels(text, cloud)


# ---- stage 4: device model + Inter-Head, Inter-DRO against the cloud's processed distribution -------------------
@torch.no_grad()
def cloud_targets(cloud: GPT, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The cloud's CFG-combined distribution for every image position: (B, T, V)."""
    logits = cloud.image_logits(cloud.cfg_condition(cond), codes.repeat(2, 1)).logits
    cond_l, uncond_l = logits.chunk(2)
    return torch.softmax(uncond_l + (cond_l - uncond_l) * cfg_scale, dim=-1)


def device_box(device: DeviceModel, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float,
               temperature: float = 1.0):
    """The device's processed logit box (centre, radius) for every image position of `codes`, teacher-forced
    (doubled CFG batch, as at inference), and its hidden states: (centre, radius, hidden)."""
    P, G = device.config.cls_token_num, device.config.grid_size
    out = device.forward_interval(cond=device.cfg_condition(cond), tokens=codes[:, :-1].repeat(2, 1))
    c, r = device.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:], neighbour_ids(codes, G), cfg_scale,
                                temperature)
    return c, r, out.hidden[: cond.shape[0], P - 1:]


def train_device(cfg: dict[str, Any], vq: VQModel, models: CloudModels, out: Path,
                 name: str = "device") -> DeviceModel:
    torch.manual_seed(cfg["seed"])
    text, cloud = models.text.eval(), models.cloud.eval()
    for p in list(text.parameters()) + list(cloud.parameters()):
        p.requires_grad_(False)
    device = build_device_model(cloud.config, cfg.get("n_layer", 1), cloud=cloud,
                                radius_hidden=cfg.get("radius_hidden", 0))
    loss_cfg = InterDROConfig(**cfg["loss"])
    # the neighbour scale stays the identity here (its output layer starts at zero); the gate stage fits it
    params = [p for n, p in device.named_parameters() if not n.startswith("inter_head.neighbour.")]
    opt = _adamw(params, cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))

    def step(i: int) -> dict[str, float]:
        x, captions = scene_batch(cfg["seed"], i, cfg["batch"])
        codes = tokenize(vq, x)
        with torch.no_grad():
            cond = text(*caption_batch(captions))
        p_cloud = cloud_targets(cloud, cond, codes, cfg["cfg_scale"])
        c, r, _ = device_box(device, cond, codes, cfg["cfg_scale"])
        V = p_cloud.shape[-1]
        log_lo, log_up = interval_log_bounds(c, r)
        loss, parts = inter_dro_loss(log_lo.reshape(-1, V), torch.log_softmax(c, -1).reshape(-1, V),
                                     log_up.reshape(-1, V), p_cloud.reshape(-1, V), loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    run_loop(name, {"device": device}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return device


# ---- stage 5: the Inter-Head's neighbour scale, on the rank term (everything else frozen) -------------------------
@dataclass
class GateSequences:
    """Cloud-generated sequences of training-split captions, and the cloud's argmax at every position."""
    captions: list[str]
    tokens: torch.Tensor  # (N, T) int64
    cloud_argmax: torch.Tensor  # (N, T) int64: argmax of the cloud's processed distribution, teacher-forced


@torch.no_grad()
def gate_sequences(cfg: dict[str, Any], text: CaptionEncoder, cloud: GPT, out: Path) -> GateSequences:
    """`cfg["sequences"]` images written by the cloud (CFG, temperature 1, a generator seeded from the stage seed)
    for training-split captions, cached in the run directory (with the config keys that made them) so that a
    resumed stage trains on the same ones."""
    path = out / "gate.sequences.pt"
    key = {k: cfg[k] for k in ("seed", "sequences", "cfg_scale")}
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:  # written for this config (else: written again)
            return GateSequences(saved["captions"], saved["tokens"], saved["cloud_argmax"])
    sampling, P = SamplingConfig(cfg_scale=cfg["cfg_scale"]), cloud.config.cls_token_num
    captions = SceneStream(seed=(cfg["seed"], 0)).batch(cfg["sequences"])[1]
    tokens, argmax = [], []
    for start in tqdm(range(0, len(captions), 25), desc="gate: cloud sequences", dynamic_ncols=True):
        cond = text(*caption_batch(captions[start:start + 25]))
        seq = generate(cloud, cond, sampling, torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + start))
        logits = cloud(cond=cloud.cfg_condition(cond), tokens=seq[:, :-1].repeat(2, 1)).logits[:, P - 1:]
        tokens.append(seq)
        argmax.append(model_probs(logits, sampling).argmax(-1))
    result = GateSequences(captions, torch.cat(tokens), torch.cat(argmax))
    torch.save({"key": key, "captions": result.captions, "tokens": result.tokens,
                "cloud_argmax": result.cloud_argmax}, path)
    return result


@torch.no_grad()
def _gate_positions(device: DeviceModel, text: CaptionEncoder, data: GateSequences, cfg_scale: float,
                    chunk: int = 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen device's view of every position of `data`: final hidden states (N*T, 2, dim) [cond, uncond],
    neighbour ids (N*T, 2) and whether its argmax differs from the cloud's (N*T,)."""
    P, G = device.config.cls_token_num, device.config.grid_size
    hidden, disagree = [], []
    for start in range(0, len(data.captions), chunk):
        codes = data.tokens[start:start + chunk]
        cond = text(*caption_batch(data.captions[start:start + chunk]))
        out = device.forward_interval(cond=device.cfg_condition(cond), tokens=codes[:, :-1].repeat(2, 1))
        h, B = out.hidden[:, P - 1:], codes.shape[0]
        hidden.append(torch.stack([h[:B], h[B:]], 2).flatten(0, 1))
        c = out.centre[:, P - 1:]
        q = cfg_combine(c, cfg_scale)  # the processed centre's argmax (temperature keeps it)
        disagree.append((q.argmax(-1) != data.cloud_argmax[start:start + chunk]).flatten())
    return torch.cat(hidden), neighbour_ids(data.tokens, G).flatten(0, 1), torch.cat(disagree)


def train_gate(cfg: dict[str, Any], models: CloudModels, device: DeviceModel, out: Path) -> DeviceModel:
    """Fit the neighbour scale g of the Inter-Head (`InterHead.scale`) on the rank term of Inter-DRO alone: on
    images the cloud wrote, every position where the device's argmax differs from the cloud's should score a larger
    U than every position where they agree (the gate's AUROC). The rest of the device is frozen, so its centre and
    base radius stay what Inter-DRO made them, and its hidden states are computed once: each step draws `batch`
    positions at random from all sequences and runs only the heads. Cloud-written sequences, not data renders: the
    gate reads model samples at inference, and fitting on renders measured 0.003 lower held-out AUROC."""
    torch.manual_seed(cfg["seed"])
    text, cloud = models.text.eval(), models.cloud.eval()
    device.eval()
    for m in (text, cloud, device):
        for p in m.parameters():
            p.requires_grad_(False)
    head, dim = device.inter_head, device.config.dim
    for p in head.neighbour.parameters():
        p.requires_grad_(True)
    data = gate_sequences(cfg, text, cloud, out)
    hidden, neighbours, disagree = _gate_positions(device, text, data, cfg["cfg_scale"])
    opt = _adamw(head.neighbour.parameters(), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))

    def step(i: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + i)
        idx = torch.randint(0, len(hidden), (cfg["batch"],), generator=g)
        h = hidden[idx].transpose(0, 1).reshape(-1, dim)  # [cond rows; uncond rows]
        with torch.no_grad():
            centre, radius = device.output(h).float(), head(h)
        iv = interfuse(*device.processed_box(centre, radius, neighbours[idx], cfg["cfg_scale"], 1.0))
        loss = rank_loss(iv.u, disagree[idx])
        if loss is None:  # a batch of one class (untrained smoke models): nothing to rank, no loss to log
            return {"disagree": disagree[idx].float().mean().item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "disagree": disagree[idx].float().mean().item()}

    run_loop("gate", {"gate": head.neighbour}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200),
             scheduler=sched)
    device.eval()
    return device


# ---- stage 6: interval feature projection phi (cloud frozen) -----------------------------------------------------
def interval_features(device: DeviceModel, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float,
                      top: int) -> torch.Tensor:
    """[h_device; interval stats] for every image position: (B, T, dim + top + 3)."""
    c, r, hidden = device_box(device, cond, codes, cfg_scale)
    return torch.cat([hidden, interval_stats(*interval_bounds(c, r), top)], dim=-1)


def train_phi(cfg: dict[str, Any], vq: VQModel, models: CloudModels, device: DeviceModel,
              out: Path) -> IntervalProjection:
    """Cloud CE on data tokens with E(x) + phi(features) inputs. The first `prefix_fraction` of tokens are written
    by the cloud itself at inference (prefix injection) and carry no device features, so they get none here."""
    torch.manual_seed(cfg["seed"])
    text, cloud = models.text.eval(), models.cloud.eval()
    for m in (text, cloud, device.eval()):
        for p in m.parameters():
            p.requires_grad_(False)
    phi = IntervalProjection(PhiConfig(device.config.dim, cfg["top"] + 3, cloud.config.dim, cfg["hidden"]))
    opt = _adamw(phi.parameters(), cfg)
    T = cloud.config.block_size
    no_feature = torch.arange(T) < int(cfg["prefix_fraction"] * T)

    def step(i: int) -> dict[str, float]:
        x, captions = scene_batch(cfg["seed"], i, cfg["batch"])
        codes = tokenize(vq, x)
        with torch.no_grad():
            cond = text(*caption_batch(captions))
            feats = interval_features(device, cond, codes, cfg["cfg_scale"], cfg["top"])  # feature i: token i
        extra = phi(feats).masked_fill(no_feature[None, :, None], 0.0)
        drop = _drop_mask(cfg["seed"], i, len(captions), cloud.config.class_dropout_prob)
        logits = cloud.image_logits(cond, codes, cond_drop=drop, extra_embeddings=extra).logits
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    run_loop("phi", {"phi": phi}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200))
    return phi
