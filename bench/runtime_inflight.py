"""The torch-free device runtime against a real `ciar serve` process over real sockets: waiting for every verdict
against drafting on past the verification in flight (`ciar-device run --lookahead N`), with the cloud writing
the whole image through the same bridge as the base, side by side per prompt, on links made by a delaying TCP
proxy (each direction holds every byte for half the round trip).

    python bench/runtime_inflight.py --prompts 30 --json docs/results/runtime_inflight.json

Device and cloud are separate processes (one thread each) on this machine's cores; the proxy is a third process.
Reports per link and loop: seconds per image (caption, prefill, drafts, verifications; the VQ decode left out, as
it is the same for every loop), the speed-up over the cloud writing the image alone, drafts made and voided,
and Verifies per image. The image does not depend on the link or the loop's timing (tests/test_bridge.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from ciar.cli.bench import write_result
from ciar.cloud_bridge.client import BridgeClient, ClientConfig
from ciar.runtime.backend import make_backend
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import at_least, default_bundle, environment, tau_for
from ciar.runtime.generator import DeviceGenerator
from ciar.runtime.verifier import SessionParams
from ciar.training.scenes import heldout_prompts

LINKS = {"lan": 1.0, "wifi": 10.0, "4g": 50.0}  # round trip, ms (engine/link.py's profiles; bandwidth not shaped)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proxy(listen: int, target: int, rtt_ms: float) -> None:
    """Forward localhost:listen to localhost:target, each chunk delivered rtt/2 after it arrived, in order."""
    delay = rtt_ms / 2000

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                dst.write(data)
                await dst.drain()
            dst.close()

        task = asyncio.create_task(deliver())
        try:
            while data := await src.read(1 << 16):
                queue.put_nowait((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(None)
        await task

    async def client(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _start_serve(threads: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    ciar = Path(sys.executable).parent / "ciar"
    proc = subprocess.Popen([str(ciar), "serve", "--port", str(port), "--threads", str(threads),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != f"listening on ws://127.0.0.1:{port}":
        proc.kill()
        raise RuntimeError(f"ciar serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, port


def engine_rows(prompts: list[str], tau: float, loops: dict[str, int], seed: int, links: list[str],
                bundle: Path) -> dict[str, dict]:
    """The engine's prediction for the same loops: device side on the same bundle (`BundleProposer`), cloud in
    this process, each session's timeline priced on the engine's profile of each link (one verification in
    flight, as the runtime does)."""
    import dataclasses

    import torch

    from ciar.cli.bench import bundle_proposer, relink, run_methods, timing_rows
    from ciar.engine import get_method
    from ciar.engine.link import LINKS as ENGINE_LINKS
    from ciar.models.builtin import load_builtin

    torch.set_num_threads(1)
    models = load_builtin(None)
    waiting = get_method("ciar", tau=tau)
    methods = {"cloud": get_method("cloud"), **{name: dataclasses.replace(waiting, name=name, lookahead=n)
                                                for name, n in loops.items()}}
    runs = run_methods(models, prompts, methods, ENGINE_LINKS["lan"], seed, None,
                       proposer=bundle_proposer(models, bundle, 1, "runtime_inflight.py"))
    out = {}
    for link in links:
        table = timing_rows(relink(runs, ENGINE_LINKS[link]))
        out[link] = {name: {"speedup": r["speedup"], "seconds": r["seconds"], "device_s": r["device_seconds"],
                            "cloud_s": r["waiting_seconds"], "verifies": r["requests"] - 1, "drafts": r["drafts"],
                            "voided": r["voided"], "kept_ahead": r["kept_ahead"]} for name, r in table.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=30, help="held-out prompts (default 30)")
    p.add_argument("--lookahead", type=at_least(1), nargs="+", default=[1, 4, 8],
                   help="lookaheads to run beside the waiting loop (default 1 4 8)")
    p.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    p.add_argument("--cloud-rate", type=float, default=0.3, help="tau from the bundle's calibration (default 0.3)")
    p.add_argument("--bundle", type=Path, default=None, help="device bundle (default: the shipped int8 ONNX)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="threads of the device and of the cloud (default 1)")
    p.add_argument("--engine", action="store_true",
                   help="also price the same prompts, seeds and tau with the engine's in-process timeline "
                        "(`ciar bench methods`' link model) for each loop, beside the measured rows")
    p.add_argument("--json", default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if not 0.0 <= args.cloud_rate <= 1.0:
        p.error(f"--cloud-rate must be in [0, 1], got {args.cloud_rate}")
    from tqdm import tqdm
    out = sys.stderr if args.json == "-" else sys.stdout  # the JSON alone on stdout

    bundle = load_bundle(args.bundle or default_bundle())
    gen = DeviceGenerator(bundle, make_backend(bundle, args.threads), args.threads)
    tau = tau_for(bundle, None, args.cloud_rate)
    prompts = heldout_prompts(args.prompts)
    s = bundle.manifest["sampling"]
    loops = {"waiting": 0, **{f"lookahead {n}": n for n in args.lookahead}}
    serve, port = _start_serve(args.threads)
    rows: dict[str, dict] = {}
    try:
        for link in args.links:
            listen = _free_port()
            proxy = mp.Process(target=_proxy, args=(listen, port, LINKS[link]), daemon=True)
            proxy.start()
            url = f"ws://127.0.0.1:{listen}"
            for _ in range(50):  # wait for the proxy to listen
                try:
                    socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            runs = {name: [] for name in ["cloud", *loops]}
            for i, prompt in enumerate(tqdm(prompts, desc=link, file=sys.stderr)):
                seed = args.seed * 1_000_003 + i
                c = BridgeClient(ClientConfig(url, timeout_s=60))
                params = SessionParams(prompt, seed, gen.T, gen.T, s["cfg_scale"], s["temperature"], s["top_k"],
                                       s["top_p"])
                t0 = time.perf_counter()
                c.open(params)
                runs["cloud"].append({"seconds": time.perf_counter() - t0})
                c.close()
                for name, lookahead in loops.items():
                    c = BridgeClient(ClientConfig(url, timeout_s=60))
                    r = gen.generate(prompt, seed, tau, verifier=c, lookahead=lookahead, decode_image=False)
                    if r.stats["unverified"]:
                        raise RuntimeError(f"{name}: {r.stats['unverified']} drafts unverified "
                                           f"({c.stats.offline_reason})")
                    runs[name].append({**{k: r.stats[k] for k in ("seconds", "device_s", "cloud_s", "drafts",
                                                                   "voided", "kept_ahead", "sent")},
                                       "verifies": c.stats.verified, "tokens": r.tokens,
                                       "verify_ms": float(np.median(c.stats.verify_ms)) if c.stats.verify_ms
                                       else 0.0})
            proxy.terminate()
            base = np.mean([x["seconds"] for x in runs["cloud"]])
            same = all(np.array_equal(a["tokens"], b["tokens"]) for name in loops
                       for a, b in zip(runs["waiting"], runs[name]))
            table = {}
            for name, rs in runs.items():
                mean = {k: float(np.mean([x[k] for x in rs])) for k in rs[0] if k != "tokens"}
                table[name] = {**mean, "speedup": base / mean["seconds"]}
            rows[link] = {"rtt_ms": LINKS[link], "same_tokens_as_waiting": same, "methods": table}
            print(f"\n{link} (round trip {LINKS[link]} ms): cloud alone {base:.3f} s per image; "
                  f"every loop's tokens {'equal' if same else 'differ from'} the waiting loop's", file=out)
            print(f"{'loop':<14}{'s/image':>9}{'speed-up':>10}{'device s':>10}{'waiting s':>10}{'drafts':>8}"
                  f"{'voided':>8}{'kept ahead':>11}{'verifies':>9}", file=out)
            for name, row in table.items():
                if name == "cloud":
                    print(f"{name:<14}{row['seconds']:>9.3f}{1.0:>9.2f}x", file=out)
                    continue
                print(f"{name:<14}{row['seconds']:>9.3f}{row['speedup']:>9.2f}x{row['device_s']:>10.3f}"
                      f"{row['cloud_s']:>10.3f}{row['drafts']:>8.0f}{row['voided']:>8.0f}{row['kept_ahead']:>11.1f}"
                      f"{row['verifies']:>9.1f}", file=out)
        # where a Verify's time goes on the server (every link and loop together: the proxy delays outside it)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
            stats = json.loads(reply.read())
        server = {k: stats[k] for k in ("verify_ms_p50", "queued_ms_p50", "forward_ms_p50", "verify_requests")}
        print(f"\nserver, per Verify (p50): whole step {server['verify_ms_p50']:.2f} ms, of it in the forward "
              f"{server['forward_ms_p50']:.2f} ms and queued {server['queued_ms_p50']:.2f} ms; the device waited "
              + ", ".join(f"{link} {np.median([r['methods'][n]['verify_ms'] for n in loops]):.2f} ms"
                          for link, r in rows.items()), file=out)
    finally:
        serve.terminate()
        serve.wait(30)
    if args.engine:
        for link, predicted in engine_rows(prompts, tau, loops, args.seed, args.links, bundle.path).items():
            rows[link]["engine"] = predicted
            print(f"\n{link}: speed-up measured here / priced by the engine's timeline (same prompts, seeds, tau)",
                  file=out)
            for name in ["waiting", *[n for n in loops if n != "waiting"]]:
                print(f"{name:<14}{rows[link]['methods'][name]['speedup']:>7.2f}x / {predicted[name]['speedup']:.2f}x"
                      f"   device s {rows[link]['methods'][name]['device_s']:.3f} / {predicted[name]['device_s']:.3f}"
                      f"   waiting s {rows[link]['methods'][name]['cloud_s']:.3f} / {predicted[name]['cloud_s']:.3f}",
                      file=out)
    result = {"prompts": args.prompts, "tau": tau, "cloud_rate": args.cloud_rate, "bundle": str(bundle.path),
              "links": rows, "server": server, "environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
