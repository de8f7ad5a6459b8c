"""Plain autoregressive generation with the static KV cache and CFG (LlamaGen / gpt-fast `generate`).

This is the `cloud` (and `device`) method of the engine; speculative methods reuse the same pieces.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gpt import GPT
from .sampling import SamplingConfig, model_probs, sample


@torch.inference_mode()
def generate(model: GPT, cond: Tensor, sampling: SamplingConfig, generator: torch.Generator,
             num_tokens: int | None = None, cond_mask: Tensor | None = None,
             prefix: Tensor | None = None) -> Tensor:
    """Sample image tokens (B, T) for conditions `cond` (B, ...). `prefix` (B, m) forces the first m tokens.

    With guidance the batch is doubled to [cond; uncond] once, and every step feeds the same token to both halves.
    """
    cfg = model.config
    T = num_tokens or cfg.block_size
    B, P = cond.shape[0], cfg.cls_token_num
    if sampling.guided:
        cond = model.cfg_condition(cond)
        cond_mask = None if cond_mask is None else cond_mask.repeat(2, 1)
    rows = cond.shape[0]
    cache = model.new_cache(rows, P + T)
    logits = model(cond=cond, cache=cache, cond_mask=cond_mask).logits[:, -1]
    tokens = torch.empty(B, T, dtype=torch.long, device=cond.device)
    m = 0 if prefix is None else prefix.shape[1]
    for i in range(T):
        tok = prefix[:, i] if i < m else sample(model_probs(logits, sampling), generator)
        tokens[:, i] = tok
        if i + 1 < T:
            step = tok.repeat(rows // B)[:, None]
            logits = model(tokens=step, input_pos=torch.tensor([P + i], device=cond.device), cache=cache).logits[:, -1]
    return tokens
