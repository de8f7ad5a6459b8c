"""Load on the cloud bridge: N concurrent device sessions (the torch-free runtime on the shipped int8 bundle, one
thread each) against one `ciar serve` in this process, with batching across sessions on and off, side by side.

    python bench/bridge_load.py --sessions 1 8 32 --json docs/results/bridge_load.json
    python bench/bridge_load.py --device cuda --sessions 1 8 32 --json docs/results/bridge_load_cuda.json

Reports per run: wall time, images/s, verify requests per cloud forward (the batching gain), session steps per
forward, and client-side verify latency p50 / p95 (request sent -> verdict received, over the real socket).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ciar.cli.bench import place_cloud
from ciar.cloud_bridge.client import BridgeClient, ClientConfig
from ciar.cloud_bridge.cloud import CloudService
from ciar.cloud_bridge.server import ServerConfig, ServerThread
from ciar.engine.gates import calibrate_tau
from ciar.models.builtin import load_builtin
from ciar.runtime.backend import OnnxBackend
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import default_bundle, environment
from ciar.runtime.generator import DeviceGenerator

PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


def run_load(models, bundle, n: int, max_batch: int, tau: float, seed0: int) -> dict:
    service = CloudService(models, max_sessions=max(n, 1))
    gens = [DeviceGenerator(bundle, OnnxBackend(bundle)) for _ in range(n)]
    out, errors = [None] * n, []
    with ServerThread(service, ServerConfig(port=0, max_batch=max_batch)) as url:
        def one(i):
            try:
                c = BridgeClient(ClientConfig(url, timeout_s=120))
                r = gens[i].generate(PROMPT, seed0 + i, tau, verifier=c, decode_image=False)
                out[i] = (r.stats, c.stats)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    verify_ms = np.concatenate([np.asarray(c.verify_ms) for _, c in out])
    verifies = sum(c.verified for _, c in out)
    unverified = sum(s["unverified"] for s, _ in out)
    # verify forwards: total forwards minus the prefill/prefix ones is not separable after batching, so report
    # verify requests per forward over the whole run and session steps per forward
    return {"sessions": n, "max_batch": max_batch, "wall_s": wall, "images_per_s": n / wall,
            "verify_requests": verifies, "unverified": unverified, "cloud_forwards": service.forwards,
            "session_steps": service.work_items, "steps_per_forward": service.work_items / service.forwards,
            "verify_requests_per_forward": verifies / service.forwards,
            "verify_ms_p50": float(np.percentile(verify_ms, 50)), "verify_ms_p95": float(np.percentile(verify_ms, 95))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cloud-rate", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the cloud forward")
    p.add_argument("--device", default="cpu", help="where the cloud model runs: cpu (default), cuda, cuda:N")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, bundle = load_builtin(None), load_bundle(default_bundle())
    cloud_device = place_cloud(models, args.device, "bridge_load.py", "--device")
    probe = DeviceGenerator(bundle, OnnxBackend(bundle)).generate(PROMPT, 1, np.inf, prefix_fraction=0.0,
                                                                  decode_image=False)
    tau = calibrate_tau(probe.u[np.isfinite(probe.u)], args.cloud_rate)
    rows = []
    for n in args.sessions:
        for max_batch in (1, 64):  # side by side: no batching, then batching
            row = run_load(models, bundle, n, max_batch, tau, 1000)
            rows.append(row)
            print(f"sessions {n:>3} max_batch {max_batch:>3}: wall {row['wall_s']:6.2f} s, "
                  f"{row['images_per_s']:5.2f} img/s, verify/forward {row['verify_requests_per_forward']:5.2f}, "
                  f"steps/forward {row['steps_per_forward']:5.2f}, verify p50 {row['verify_ms_p50']:7.1f} ms "
                  f"p95 {row['verify_ms_p95']:7.1f} ms, unverified {row['unverified']}", file=sys.stderr)
    result = {"environment": environment(), "cloud_device": cloud_device, "prompt": PROMPT,
              "cloud_rate": args.cloud_rate, "tau": tau, "torch_threads": args.threads,
              "date": time.strftime("%Y-%m-%d"), "runs": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
