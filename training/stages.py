"""The four training stages of the built-in model. Each takes its stage config (a dict from
`training/configs/<stage>.json`) and returns trained modules; `builtin.py` chains them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ciar.models import GPT, DeviceModel, GPTConfig, build_device_model, interfuse, interval_stats
from ciar.models.interval import process_interval
from ciar.models.phi import IntervalProjection, PhiConfig
from ciar.models.text import CaptionEncoder, CaptionEncoderConfig
from ciar.models.vq import VQ_CONFIGS, VQConfig, VQModel

from .data import caption_batch, scene_batch
from .inter_dro import InterDROConfig, inter_dro_loss
from .loop import cosine_schedule, run_loop
from .scenes import CAPTION_VOCAB, MAX_CAPTION_TOKENS


def _adamw(params, cfg: dict[str, Any]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.0))


def _drop_mask(seed: int, step: int, n: int, p: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(n, generator=g) < p


# ---- stage 1: VQ tokenizer -------------------------------------------------------------------------------------
def vq_config(cfg: dict[str, Any]) -> VQConfig:
    return VQConfig.from_dict({**VQ_CONFIGS[cfg["base"]].to_dict(), **cfg.get("overrides", {})})


def train_vq(cfg: dict[str, Any], out: Path) -> VQModel:
    """Reconstruction (L1 + L2) + codebook + commitment (+ entropy) losses. LlamaGen adds LPIPS and a GAN loss;
    flat-coloured scenes do not need them (and no perceptual network can be downloaded here)."""
    torch.manual_seed(cfg["seed"])
    model = VQModel(vq_config(cfg))
    opt = _adamw(model.parameters(), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))

    def step(i: int) -> dict[str, float]:
        x, _ = scene_batch(cfg["seed"], i, cfg["batch"])
        recon, losses = model(x)
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        loss = rec + losses.vq + losses.commit + losses.entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "rec": rec.item(), "usage": float(losses.usage)}

    run_loop("vq", {"vq": model}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return model


# ---- stage 2: caption encoder + cloud GPT ------------------------------------------------------------------------
def text_config(cfg: dict[str, Any]) -> CaptionEncoderConfig:
    return CaptionEncoderConfig(vocab_size=len(CAPTION_VOCAB), max_tokens=MAX_CAPTION_TOKENS, **cfg["text"])


def cloud_config(cfg: dict[str, Any], vq: VQModel, text: CaptionEncoderConfig) -> GPTConfig:
    return GPTConfig(**cfg["gpt"], vocab_size=vq.config.codebook_size, model_type="t2i",
                     cls_token_num=text.n_slots, caption_dim=text.out_dim)


@torch.no_grad()
def tokenize(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    return vq.encode(images)[1].flatten(1)


@dataclass
class CloudModels:
    text: CaptionEncoder
    cloud: GPT


def train_cloud(cfg: dict[str, Any], vq: VQModel, out: Path) -> CloudModels:
    """Next-token cross-entropy on VQ codes, caption encoder trained jointly; captions dropped to the null caption
    with probability class_dropout_prob (classifier-free guidance)."""
    torch.manual_seed(cfg["seed"])
    tcfg = text_config(cfg)
    text, cloud = CaptionEncoder(tcfg), GPT(cloud_config(cfg, vq, tcfg))
    vq.eval()
    opt = _adamw(list(text.parameters()) + list(cloud.parameters()), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 100))

    def step(i: int) -> dict[str, float]:
        x, captions = scene_batch(cfg["seed"], i, cfg["batch"])
        codes = tokenize(vq, x)
        ids, mask = caption_batch(captions)
        drop = _drop_mask(cfg["seed"], i, len(captions), cloud.config.class_dropout_prob)
        logits = cloud.image_logits(text(ids, mask), codes, cond_drop=drop).logits
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(text.parameters()) + list(cloud.parameters()), 1.0)
        opt.step()
        return {"loss": loss.item()}

    run_loop("cloud", {"text": text, "cloud": cloud}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200),
             scheduler=sched)
    return CloudModels(text, cloud)


# ---- stage 3: device model + Inter-Head, Inter-DRO against the cloud's processed distribution -------------------
@torch.no_grad()
def cloud_targets(cloud: GPT, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The cloud's CFG-combined distribution for every image position: (B, T, V)."""
    logits = cloud.image_logits(cloud.cfg_condition(cond), codes.repeat(2, 1)).logits
    cond_l, uncond_l = logits.chunk(2)
    return torch.softmax(uncond_l + (cond_l - uncond_l) * cfg_scale, dim=-1)


def device_interval(device: DeviceModel, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float):
    """The device's processed interval for every image position (doubled CFG batch, as at inference)."""
    P = device.config.cls_token_num
    out = device.forward_interval(cond=device.cfg_condition(cond), tokens=codes[:, :-1].repeat(2, 1))
    c, r = process_interval(out.centre[:, P - 1:], out.radius[:, P - 1:], cfg_scale, 1.0)
    return interfuse(c, r), out.hidden[: cond.shape[0], P - 1:]


def train_device(cfg: dict[str, Any], vq: VQModel, models: CloudModels, out: Path,
                 name: str = "device") -> DeviceModel:
    torch.manual_seed(cfg["seed"])
    text, cloud = models.text.eval(), models.cloud.eval()
    for p in list(text.parameters()) + list(cloud.parameters()):
        p.requires_grad_(False)
    device = build_device_model(cloud.config, cfg.get("n_layer", 1), cloud=cloud)
    loss_cfg = InterDROConfig(**cfg["loss"])
    opt = _adamw(device.parameters(), cfg)
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 50))

    def step(i: int) -> dict[str, float]:
        x, captions = scene_batch(cfg["seed"], i, cfg["batch"])
        codes = tokenize(vq, x)
        with torch.no_grad():
            cond = text(*caption_batch(captions))
        p_cloud = cloud_targets(cloud, cond, codes, cfg["cfg_scale"])
        iv, _ = device_interval(device, cond, codes, cfg["cfg_scale"])
        V = p_cloud.shape[-1]
        loss, parts = inter_dro_loss(iv.log_p_lo.reshape(-1, V), iv.log_p_mid.reshape(-1, V),
                                     iv.log_p_up.reshape(-1, V), p_cloud.reshape(-1, V), loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(device.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    run_loop(name, {"device": device}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return device


# ---- stage 4: interval feature projection phi (cloud frozen) -----------------------------------------------------
def interval_features(device: DeviceModel, cond: torch.Tensor, codes: torch.Tensor, cfg_scale: float,
                      top: int) -> torch.Tensor:
    """[h_device; interval stats] for every image position: (B, T, dim + top + 3)."""
    iv, hidden = device_interval(device, cond, codes, cfg_scale)
    return torch.cat([hidden, interval_stats(iv.p_lo, iv.p_up, top)], dim=-1)


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
