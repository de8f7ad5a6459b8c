"""`ciar export calibrate DIR`: measure what a bundle's taus spend with the cloud in the loop, and record it.

The bundle's quantile table (`gate.u_quantiles`) says what share of drafts a tau flags on the device alone. With a
cloud, a tau spends something else (docs/BENCHMARKS.md 3m: the table's tau for 0.3 spent 0.259 calls per token).
This decodes held-out prompts through the runtime's own loop against the PyTorch cloud in this process (the
bridge's `CloudService`, no socket) at the taus the quantile table gives for a grid of rates, and writes the
cloud calls per token each tau spent into the manifest as `gate.cloud_calls`, which `ciar-device run --cloud`
then reads (`ciar.runtime.rates.measured_tau`). The bundle's files are not touched; their hashes stay valid.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ciar.runtime.bundle import BundleError, load_bundle

RATES = (0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
SEED = 7_000  # other seeds than the benchmarks' (seed * 1_000_003 + i)
PROMPT_SEED = 31_337  # the calibration prompts' own stream


def calibration_prompts(n: int) -> list[str]:
    """Held-out scenes drawn independently from their own seed (`sampled_heldout_prompts`): the evaluation list
    keeps each scene once, which makes its later prompts busier than the scene distribution (and its tail spent
    about 0.02 calls per token more than its first 600 prompts at the same tau)."""
    from ciar.training.scenes import sampled_heldout_prompts
    return sampled_heldout_prompts(n, PROMPT_SEED)


def cloud_decode(gen, service, prompt: str, seed: int, tau: float, budget=None, lookahead: int = 0):
    """One image through the runtime's loop (`gen`, a `DeviceGenerator`; `lookahead` as `ciar-device run
    --lookahead`) against `service` (a `CloudService`) in this process, nothing decoded to pixels -> (the
    `DeviceResult`, its cloud calls per token as `ciar-device run` counts them). What the calibration measures and
    what the benchmarks check it with."""
    from ciar.cloud_bridge.direct import DirectVerifier
    from ciar.runtime.rates import cloud_calls_per_token

    v = DirectVerifier(service)
    r = gen.generate(prompt, seed, tau, verifier=v, decode_image=False, budget=budget, lookahead=lookahead)
    return r, cloud_calls_per_token(r.stats["prefix"], v.seq, r.stats["tokens"])


def measure_cloud_calls(bundle, models, prompts: list[str], rates=RATES, threads: int = 1,
                        seed: int = SEED) -> dict:
    """Cloud calls per token (`cloud_calls_per_token`, as `ciar-device run` reports them) at the quantile table's
    tau for each rate, averaged over `prompts` (same prompts and seeds at every tau), at the bundle's prefix.
    `calls` is `measured` made non-increasing in tau (a running minimum) so that it can be interpolated."""
    from tqdm import tqdm

    from ciar.cloud_bridge.cloud import CloudService
    from ciar.runtime.backend import make_backend
    from ciar.runtime.cli import tau_for
    from ciar.runtime.generator import DeviceGenerator

    gen = DeviceGenerator(bundle, make_backend(bundle, threads), threads)
    service = CloudService(models, max_sessions=1)
    taus = sorted({tau_for(bundle, None, r) for r in rates if 0 < r < 1})
    if len(taus) < 2:
        raise BundleError(f"need at least two rates in (0, 1) with distinct taus, got {list(rates)}")
    measured = []
    with tqdm(total=len(taus) * len(prompts), desc="calibrating with the cloud", file=sys.stderr) as bar:
        for tau in taus:
            spent = []
            for i, prompt in enumerate(prompts):
                spent.append(cloud_decode(gen, service, prompt, seed + i, tau)[1])
                bar.update(1)
            measured.append(float(np.mean(spent)))
    return {"taus": taus, "calls": [float(c) for c in np.minimum.accumulate(measured)], "measured": measured,
            "prompts": len(prompts), "seed": seed, "prefix_fraction": bundle.manifest["gate"]["prefix_fraction"]}


def calibrate_bundle(path: Path, models, prompts: int, rates=RATES, threads: int = 1) -> dict:
    """Measure and write `gate.cloud_calls` into `path`/manifest.json; returns the table."""
    bundle = load_bundle(path)
    if bundle.manifest["gate"].get("u_quantiles") is None:
        raise BundleError(f"{path}: the manifest has no quantile table (gate.u_quantiles) to take taus from; "
                         "re-export it with `ciar export`")
    table = measure_cloud_calls(bundle, models, calibration_prompts(prompts), rates, threads)
    bundle.manifest["gate"]["cloud_calls"] = table  # the manifest as read, files and hashes as they were
    (bundle.path / "manifest.json").write_text(json.dumps(bundle.manifest, indent=1))
    load_bundle(path)  # still a valid bundle
    return table
