"""The resumable training loop: exact resume, and training time kept across resumes."""
from __future__ import annotations

import torch
from torch import nn

from ciar.training.loop import run_loop, trained_seconds


def _run(tmp_path, steps: int, calls: list[int]) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def step(i: int) -> dict[str, float]:
        calls.append(i)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    run_loop("toy", {"toy": model}, opt, step, steps, tmp_path, ckpt_every=2)
    return model


def test_resume_continues_and_a_finished_run_keeps_its_training_time(tmp_path):
    assert trained_seconds(tmp_path, "toy") is None
    calls: list[int] = []
    _run(tmp_path, 3, calls)
    first = trained_seconds(tmp_path, "toy")
    assert calls == [0, 1, 2] and first is not None and first > 0
    resumed = _run(tmp_path, 5, calls)
    assert calls == [0, 1, 2, 3, 4]  # picks up at step 3
    after = trained_seconds(tmp_path, "toy")
    assert after > first  # the second run's time is added to the first's
    straight = _run(tmp_path / "straight", 5, [])
    torch.testing.assert_close(resumed.weight, straight.weight)  # exact resume
    _run(tmp_path, 5, calls)  # finished: no step runs, and the recorded time stays
    assert calls == [0, 1, 2, 3, 4] and trained_seconds(tmp_path, "toy") == after
