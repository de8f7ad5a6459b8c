"""`ciar selftest`: decode one image's worth of tokens with a small random LlamaGen-architecture model and
check the KV-cached path against a full causal forward, the Inter-Head bounds and seeded sampling."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ciar.models import GPT, GPTConfig, SamplingConfig, build_device_model, interfuse, model_probs, sample
from ciar.models.interval import neighbour_ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every draw (default 0)")
    p.add_argument("--tokens", type=int, default=256, choices=[64, 256], help="image tokens (8x8 or 16x16 grid)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _random_model(cfg: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        model.output.weight.normal_(std=0.05)  # LlamaGen zero-inits the head; give it something to say
    return model.eval()


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cfg = GPTConfig(dim=128, n_layer=4, n_head=4, vocab_size=1024, block_size=args.tokens, model_type="t2i",
                    cls_token_num=8, caption_dim=64)
    cloud = _random_model(cfg, args.seed)
    device = build_device_model(cfg, cloud=cloud).eval()
    sampling = SamplingConfig(cfg_scale=args.cfg_scale, temperature=1.0, top_k=100)
    gen = torch.Generator().manual_seed(args.seed)
    cond = cloud.cfg_condition(torch.randn(1, cfg.cls_token_num, cfg.caption_dim, generator=gen))
    P, T = cfg.cls_token_num, cfg.block_size

    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = cloud.new_cache(2)
        logits = cloud(cond=cond, cache=cache).logits[:, -1:]
        tokens = []
        for i in range(T):
            tok = sample(model_probs(logits, sampling), gen)  # (1, 1)
            tokens.append(tok)
            if i + 1 < T:
                logits = cloud(tokens=tok.repeat(2, 1), input_pos=torch.tensor([P + i]), cache=cache).logits
        seconds = time.perf_counter() - t0
        seq = torch.cat(tokens, dim=1)
        full = cloud.image_logits(cond, seq.repeat(2, 1)).logits
        # the same tokens replayed through the cache as one block give the same logits as one full forward
        cache2 = cloud.new_cache(2)
        first = cloud(cond=cond, cache=cache2).logits[:, -1:]
        rest = cloud(tokens=seq[:, :-1].repeat(2, 1), input_pos=torch.arange(P, P + T - 1), cache=cache2).logits
        cache_diff = (torch.cat([first, rest], 1) - full).abs().max().item()
        out = device.forward_interval(cond=cond, tokens=seq[:, :-1].repeat(2, 1))
        iv = interfuse(*device.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:],
                                             neighbour_ids(seq, device.config.grid_size), sampling.cfg_scale,
                                             sampling.temperature))
        bounds_ok = bool((iv.p_lo.sum(-1) <= 1 + 1e-5).all() and (iv.p_up.sum(-1) >= 1 - 1e-5).all())
    result = {
        "tokens": T, "seconds": round(seconds, 3), "ms_per_token": round(1000 * seconds / T, 3),
        "cache_vs_full_max_abs_diff": cache_diff,
        "interval_bounds_valid": bounds_ok, "u_mean": float(iv.u.mean()), "u_max": float(iv.u.max()),
        "distinct_tokens": int(seq.unique().numel()),
    }
    ok = cache_diff <= 1e-4 and bounds_ok
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
        print("selftest passed" if ok else "selftest FAILED")
    return 0 if ok else 1
