"""`ciar demo`: the main job on the built-in default model, end to end over a real socket.

Starts the cloud bridge (`ciar serve`, the PyTorch cloud verifier) on a free localhost port, runs the torch-free
device runtime on the shipped int8 ONNX bundle through the websocket client: the cloud writes the prefix, the
device drafts every token and keeps the certain ones, the cloud verifies the uncertain ones. For comparison the
cloud alone writes the same caption through the same bridge. Writes image.png, uncertainty.png, cloud_only.png
and stats.json, then shuts everything down.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ciar.runtime.bundle import DEFAULT_CLOUD_RATE

DEFAULT_PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


def rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the caption")
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same image")
    p.add_argument("--cloud-rate", type=rate, default=DEFAULT_CLOUD_RATE,
                   help="cloud calls per image token: tau from the bundle's measured cloud-call table (`ciar export "
                        "calibrate`), as `ciar-device run --cloud` takes it, held for the whole image "
                        "(default %(default)s)")
    p.add_argument("--bundle", type=Path, default=None, help="device bundle (default: the shipped int8 ONNX)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from ciar.cloud_bridge.client import BridgeClient, ClientConfig
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.server import ServerConfig, ServerThread
    from ciar.models.builtin import load_builtin
    from ciar.runtime.backend import make_backend
    from ciar.runtime.bundle import load_bundle
    from ciar.runtime.cli import choose_tau, default_bundle
    from ciar.runtime.generator import PREFIX, DeviceGenerator
    from ciar.runtime.images import save_png, uncertainty_map, upscale
    from ciar.runtime.rates import cloud_calls_per_token
    from ciar.runtime.verifier import SessionParams

    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle or default_bundle())
    device = DeviceGenerator(bundle, make_backend(bundle, 1))
    tau, tau_from = choose_tau(bundle, None, args.cloud_rate, cloud=True)  # as `ciar-device run --cloud`

    service = CloudService(load_builtin(args.checkpoint), max_sessions=4)
    with ServerThread(service, ServerConfig(port=0)) as url:
        client = BridgeClient(ClientConfig(url))
        result = device.generate(args.prompt, args.seed, tau, verifier=client)
        bridge = client.stats.summary()
        # the base: the cloud writes every token (one request; the tokens come back in one frame)
        base_client = BridgeClient(ClientConfig(url, timeout_s=120.0))
        m = bundle.manifest
        t0 = time.perf_counter()
        base_tokens = base_client.open(SessionParams(args.prompt, args.seed, device.T, device.T,
                                                     m["sampling"]["cfg_scale"], m["sampling"]["temperature"],
                                                     m["sampling"]["top_k"], m["sampling"]["top_p"]))
        base_s = time.perf_counter() - t0
        base_client.close()
    if bridge["offline_reason"] or len(base_tokens) != device.T:
        raise RuntimeError(f"the local bridge failed: {bridge['offline_reason'] or 'no cloud-only tokens'}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_png(upscale(result.image, 4), args.out_dir / "image.png")
    save_png(upscale(device.decoder(base_tokens), 4), args.out_dir / "cloud_only.png")
    save_png(uncertainty_map(result.image, result.sent, result.source == PREFIX), args.out_dir / "uncertainty.png")
    st = result.stats
    stats = {"prompt": args.prompt, "seed": args.seed, "tau": tau, "tau_from": tau_from,
             "cloud_rate_target": args.cloud_rate,
             "tokens": st["tokens"], "local": st["local"], "cloud": st["cloud"], "prefix": st["prefix"],
             "sent": st["sent"], "unverified": st["unverified"],
             "cloud_calls": cloud_calls_per_token(st["prefix"], bridge["verified"], st["tokens"]),
             "bytes_up": bridge["bytes_up"], "bytes_down": bridge["bytes_down"],
             "seconds": st["seconds"], "device_seconds": st["device_s"], "cloud_seconds": st["cloud_s"],
             "verify_ms_p50": bridge["verify_ms_p50"], "cloud_only_seconds": base_s,
             "speedup_vs_cloud_only": base_s / st["seconds"],
             "cloud_forwards": service.forwards, "bundle": str(bundle.path),
             "transport": f"websocket bridge on {url} (real socket, this machine)"}
    (args.out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"wrote {args.out_dir}/image.png, uncertainty.png, cloud_only.png, stats.json")
        print(f"{stats['local']} of {stats['tokens']} tokens kept on the device, {stats['sent']} verified by the "
              f"cloud over the websocket bridge, {stats['prefix']} written by it; cloud_calls "
              f"{stats['cloud_calls']:.2f}; {stats['seconds']:.2f} s vs {base_s:.2f} s cloud-only "
              f"({stats['speedup_vs_cloud_only']:.2f}x)")
    return 0
