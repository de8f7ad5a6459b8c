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
