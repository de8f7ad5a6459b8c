"""A resumable training loop: progress bar, JSONL loss log, periodic checkpoints, exact resume.

Data for step i must be a pure function of (seed, i) (see `data.step_rng`), so resuming needs only the model,
optimizer and step counter: no RNG state to restore.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


def run_loop(name: str, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             step_fn: Callable[[int], dict[str, float]], steps: int, out_dir: Path,
             ckpt_every: int = 200, log_every: int = 10,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[dict]:
    """Run `step_fn(step)` for steps [resume point, steps); returns the log rows of this call."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / f"{name}.ckpt.pt", out_dir / f"{name}.log.jsonl"
    start, prior = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        prior = float(state.get("seconds", 0.0))

    def save(step: int) -> None:
        state = {"modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                 "step": step, "seconds": prior + time.perf_counter() - t0}  # training time over every resume
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    rows: list[dict] = []
    with tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True, mininterval=2.0) as bar, \
            log_path.open("a") as log:
        for step in range(start, steps):
            for m in modules.values():
                m.train()
            losses = step_fn(step)
            if scheduler is not None:
                scheduler.step()
            bar.update(1)
            if step % log_every == 0 or step == steps - 1:
                row = {"step": step, "seconds": round(time.perf_counter() - t0, 2),
                       **{k: round(float(v), 5) for k, v in losses.items()}}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
            if (step + 1) % ckpt_every == 0:
                save(step + 1)
    if start < steps:
        save(steps)
    for m in modules.values():
        m.eval()
    return rows


def trained_seconds(out_dir: Path, name: str) -> float | None:
    """Seconds a stage's loop has trained over all its runs, from its checkpoint (None: no checkpoint, or one
    written before the field existed)."""
    path = out_dir / f"{name}.ckpt.pt"
    if not path.exists():
        return None
    seconds = torch.load(path, weights_only=True).get("seconds")
    return None if seconds is None else float(seconds)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 10% of the base learning rate."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
