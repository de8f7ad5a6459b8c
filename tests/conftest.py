"""Shared fixtures: tiny LlamaGen-shaped models with every weight randomised (fast, CPU, seeded)."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Our GPT zero-inits its output head (as LlamaGen); tests need non-trivial logits everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("uncond_embedding"):
                b.copy_(torch.randn(b.shape, generator=g))
    return model.eval()


@pytest.fixture
def t2i_config():
    from ciar.models import GPTConfig
    return GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=48, block_size=16, model_type="t2i",
                     cls_token_num=4, caption_dim=24, multiple_of=32)


@pytest.fixture
def c2i_config():
    from ciar.models import GPTConfig
    return GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=48, block_size=16, model_type="c2i",
                     num_classes=10, multiple_of=32)


@pytest.fixture(scope="session")
def smoke_weights(tmp_path_factory):
    """Weights of `ciar train builtin --smoke` (a few steps of every stage): real files, untrained numbers."""
    from ciar.training.builtin import train_builtin
    return train_builtin(tmp_path_factory.mktemp("smoke"), smoke=True)


def tau_between_scores(scores: torch.Tensor) -> float:
    """A tau near the median of a probe's gate scores (nan: no draft), halfway across the widest gap between two
    neighbouring values there: not on a score, where the last-digit difference between an exported graph and eager
    (float reassociation) would decide a draft."""
    s = scores[~scores.isnan()].sort().values
    window = s[len(s) // 2 - 8: len(s) // 2 + 9]
    j = int((window[1:] - window[:-1]).argmax())
    return float(window[j] + window[j + 1]) / 2


def assert_proposer_matches_eager(exported, models, prompt: str) -> None:
    """Drive `exported` (an engine proposer on an fp32 bundle) and the eager `DeviceProposer` through the same
    schedule: one-token steps to 40, a block of 8, a rewind to 20 with other tokens, steps on, a block to the end;
    before every step both draft with the same seed and must give the same token, q, U and features."""
    from ciar.engine.proposer import DeviceProposer

    T, V = models.device.config.block_size, models.device.config.vocab_size
    eager = DeviceProposer(models.device, models.sampling)
    assert exported.feature_dim == eager.feature_dim
    cond = models.encode_prompts([prompt])
    stream = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    for p in (eager, exported):
        p.start(cond, T)
    schedule = [(stream[:, t:t + 1], t) for t in range(40)] + [(stream[:, 40:48], 40), (other[:, 20:25], 20)]
    schedule += [(stream[:, t:t + 1], t) for t in range(25, 60)] + [(stream[:, 60:], 60)]
    for tokens, at in schedule:
        a, b = eager.draft(torch.Generator().manual_seed(at)), exported.draft(torch.Generator().manual_seed(at))
        assert torch.equal(a.token, b.token), at
        assert torch.allclose(a.q, b.q, atol=1e-5), at
        assert torch.allclose(a.u, b.u, rtol=1e-3, atol=1e-10), (at, a.u, b.u)
        assert torch.allclose(a.features, b.features, atol=1e-4), at
        for p in (eager, exported):
            p.ingest(tokens, at)
    assert exported.pos == T
