"""CFG + sampling: order of operations, filtering semantics, explicit generators."""
from __future__ import annotations

import pytest
import torch

from ciar.models import SamplingConfig, cfg_combine, model_probs, processed_probs, sample
from ciar.models.sampling import filter_logits


def test_cfg_combine_on_logits():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    out = cfg_combine(torch.cat([cond, uncond]), 3.0)
    torch.testing.assert_close(out, torch.tensor([[4.0, -2.0]]))


def test_top_k_keeps_ties_and_top_p_keeps_the_first():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))
    assert kept.tolist() == [[True, False, False, False, False]]
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[1] + 1e-4)))
    assert kept[0].tolist()[:2] == [True, True] and kept[0, 3:].tolist() == [False, False]


def test_processing_order_cfg_then_temperature_then_filter():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 3, 50, generator=g)
    cfg = SamplingConfig(cfg_scale=4.0, temperature=0.7, top_k=10, top_p=0.9)
    probs = model_probs(raw, cfg)
    manual = filter_logits(cfg_combine(raw, 4.0) / 0.7, 10, 0.9).softmax(-1)
    torch.testing.assert_close(probs, manual)
    assert probs.shape == (2, 3, 50)
    assert ((probs > 0).sum(-1) <= 10).all()


def test_greedy_is_one_hot_and_sampling_is_seeded():
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(1))
    p = processed_probs(logits, SamplingConfig(temperature=0.0))
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.sum(-1), torch.ones(5))
    q = processed_probs(logits, SamplingConfig())
    a = sample(q, torch.Generator().manual_seed(7))
    b = sample(q, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (5,)
    others = [sample(q, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in others)


def test_invalid_configs():
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_latent_spread_is_the_mean_squared_distance_between_two_draws():
    from ciar.models.sampling import bare_score, latent_spread
    g = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    probs = torch.softmax(3 * torch.randn(5, 12, generator=g), -1)
    brute = torch.einsum("bx,by,xy->b", probs, probs, torch.cdist(codebook, codebook) ** 2)
    torch.testing.assert_close(latent_spread(probs, codebook), brute, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bare_score("latent", probs, codebook), brute, rtol=1e-5, atol=1e-6)
    # codes that decode alike spread nothing, however flat the distribution over them
    twins = codebook[:1].repeat(12, 1)
    assert float(latent_spread(torch.full((1, 12), 1 / 12), twins).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="codebook"):
        bare_score("latent", probs)


def test_latent_distance_between_two_distributions_matches_the_double_sum():
    from ciar.models.sampling import latent_distance, latent_spread
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(12, 8, generator=g)
    a, b = torch.softmax(2 * torch.randn(2, 5, 12, generator=g), -1)
    brute = torch.einsum("bx,by,xy->b", a, b, torch.cdist(codebook, codebook) ** 2)
    torch.testing.assert_close(latent_distance(a, b, codebook), brute, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent_distance(a, a, codebook), latent_spread(a, codebook), rtol=1e-5, atol=1e-5)
    one = torch.nn.functional.one_hot(torch.tensor([3, 7]), 12).float()  # two drawn tokens: their squared distance
    apart = (codebook[3] - codebook[7]).square().sum()[None]
    torch.testing.assert_close(latent_distance(one[:1], one[1:], codebook), apart)
