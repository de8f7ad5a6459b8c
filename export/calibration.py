"""The bundle's tau calibration table: quantiles of U over device-only decodes of held-out prompts, so a device
can turn a target cloud-call rate into tau without running anything (`ciar-device run --cloud-rate R`)."""
from __future__ import annotations

import numpy as np
import torch

from ciar.models.builtin import BuiltinModels
from ciar.models.generate import generate
from ciar.models.interval import NO_NEIGHBOUR, neighbour_ids
from ciar.training.data import caption_batch
from ciar.training.scenes import heldout_prompts

from .graph import DeviceGraph


@torch.inference_mode()
def u_quantiles(models: BuiltinModels, graph: DeviceGraph, prompts: int = 8, seed: int = 0,
                points: int = 101) -> list[float]:
    # the last held-out prompts: evaluation uses the first ones
    texts = heldout_prompts(1000)[-prompts:]
    cond = models.text(*caption_batch(texts, models.max_caption_tokens))
    tokens = generate(models.device, cond, models.sampling, torch.Generator().manual_seed(seed))
    d = graph.device
    P = d.config.cls_token_num
    s = models.sampling
    scale, temp = torch.tensor([s.cfg_scale]), torch.tensor([s.temperature or 1.0])
    values = []
    for i in range(len(texts)):
        prefix = d.embed_condition(d.cfg_condition(cond[i:i + 1]))
        embeds = torch.cat([prefix, d.tok_embeddings(tokens[i:i + 1, :-1]).repeat(2, 1, 1)], dim=1)
        # the output at sequence position P - 1 + t predicts image position t: its neighbours; before it, none
        neighbours = torch.cat([torch.full((P - 1, 2), NO_NEIGHBOUR), neighbour_ids(tokens[i], d.config.grid_size)])
        k = torch.zeros(graph.cache_shape())
        _, u, _, _, _ = graph(embeds, torch.arange(embeds.shape[1]), neighbours, k, k.clone(), scale, temp)
        values.append(u[0, P - 1:].numpy())
    return [float(x) for x in np.quantile(np.concatenate(values), np.linspace(0, 1, points))]
