"""What sharing one machine costs the device and the cloud: the exported device graph's step (the engine's
`BundleProposer.ingest`, one thread) timed alone, and with a cloud verification forward (4 tokens, the CFG pair)
run every N device steps in between, as `ciar bench methods` interleaves them in one process; and the cloud's
verification forward timed back to back (as the cloud-only base runs) and between device steps. On a phone the
cloud is elsewhere; here the two pass their weights and caches through the same processor caches.

    python bench/colocation.py --json docs/results/colocation.json

Each setting decodes one image's positions (255 device steps) per pass; passes alternate between the settings and
the median per setting is kept.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", default="0,10,3", help="a cloud forward every N device steps, comma-separated; 0 is "
                   "the device alone (default 0,10,3: ciar's 0.29 calls per token is about one in 3.4)")
    p.add_argument("--passes", type=int, default=5, help="passes per setting; the median is kept (default 5)")
    p.add_argument("--bundle", type=Path, default=Path("runtime/bundles/onnx-int8"))
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    try:
        settings = [int(n) for n in args.every.split(",")]
    except ValueError:
        p.error(f"--every wants comma-separated integers, got {args.every!r}")

    import torch

    from ciar.cli.bench import bundle_proposer, write_result
    from ciar.models.builtin import load_builtin
    from ciar.training.scenes import heldout_prompts

    torch.set_num_threads(1)
    models = load_builtin(None)
    proposer = bundle_proposer(models, args.bundle, 1, "colocation.py")
    cloud, T = models.cloud.eval(), models.cloud.config.block_size
    P = cloud.config.cls_token_num
    cond = models.encode_prompts(heldout_prompts(1))
    ids = torch.randint(0, cloud.config.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    verify = torch.randint(0, cloud.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def one_pass(every: int, device: bool = True) -> tuple[float, float]:
        """ms per device step and per cloud forward (nan where none ran)."""
        proposer.start(cond, T)
        cache = cloud.new_cache(2, P + T)
        cloud(cond=cloud.cfg_condition(cond), cache=cache)
        device_s = cloud_s = 0.0
        forwards = 0
        for t in range(T - 1):
            if device:
                t0 = time.perf_counter()
                proposer.ingest(ids[None, t:t + 1], t)
                device_s += time.perf_counter() - t0
            if every and t % every == 0 and t + 4 <= T:
                t0 = time.perf_counter()
                cloud(tokens=verify, input_pos=torch.arange(P + t, P + t + 4), cache=cache)
                cloud_s += time.perf_counter() - t0
                forwards += 1
        return (device_s / (T - 1) * 1000 if device else math.nan,
                cloud_s / forwards * 1000 if forwards else math.nan)

    cloud_every = min([n for n in settings if n] or [3])
    per: dict[str, list[tuple[float, float]]] = {str(n): [] for n in settings}
    per["cloud alone"] = []
    for _ in range(args.passes):
        for n in settings:
            per[str(n)].append(one_pass(n))
        per["cloud alone"].append(one_pass(cloud_every, device=False))
    dev = {k: statistics.median(d for d, _ in v) for k, v in per.items()}
    cld = {k: statistics.median(c for _, c in v) for k, v in per.items()}
    out = sys.stderr if args.json == "-" else sys.stdout
    for k in per:
        label = {"0": "device alone", "cloud alone": "cloud forwards back to back"}.get(
            k, f"a cloud forward every {k} device steps")
        cells = [] if math.isnan(dev[k]) else [f"device step {dev[k]:6.3f} ms ({dev[k] / dev.get('0', dev[k]):.2f}x)"]
        if not math.isnan(cld[k]):
            cells.append(f"cloud forward {cld[k]:6.3f} ms ({cld[k] / cld['cloud alone']:.2f}x)")
        print(f"{label:<40} " + ", ".join(cells), file=out)
    def rounded(ms: dict[str, float]) -> dict[str, float | None]:
        return {k: None if math.isnan(v) else round(v, 4) for k, v in ms.items()}

    write_result({"bundle": str(args.bundle), "passes": args.passes, "cloud_tokens_per_forward": 4,
                  "device_step_ms": rounded(dev), "cloud_forward_ms": rounded(cld)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
