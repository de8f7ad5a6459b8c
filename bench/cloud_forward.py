"""What one cloud forward costs as a function of the tokens it ingests (the CFG pair, one torch thread): the
cloud-only base pays a 1-token forward per image token, a verification pays one forward over the tokens the cloud
has not seen plus the drafts. Their ratio bounds any method's speed-up at a given cloud-call rate.

    python bench/cloud_forward.py --json docs/results/cloud_forward.json
    python bench/cloud_forward.py --device cuda --json docs/results/cloud_forward_cuda.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,3,4,6,8", help="tokens per forward, comma-separated (default 1,2,3,4,6,8)")
    p.add_argument("--repeats", type=int, default=5, help="passes over the image per size; the median is kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the cloud model runs: cpu (default), cuda, cuda:N")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    try:
        sizes = [int(n) for n in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens wants comma-separated integers, got {args.tokens!r}")

    import torch

    from ciar.cli.bench import place_cloud, write_result
    from ciar.models.builtin import load_builtin
    from ciar.training.scenes import heldout_prompts

    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    device = place_cloud(models, args.device, "cloud_forward.py", "--device")
    cloud = models.cloud.eval()
    where = next(cloud.parameters()).device
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    P, T = cloud.config.cls_token_num, cloud.config.block_size
    cond = cloud.cfg_condition(models.encode_prompts(heldout_prompts(1)).to(where))
    rows = {}
    with torch.inference_mode():
        cache = cloud.new_cache(cond.shape[0], P + T)
        cloud(cond=cond, cache=cache)
        for n in sizes:
            tokens = torch.randint(0, cloud.config.vocab_size, (cond.shape[0], n),
                                   generator=torch.Generator().manual_seed(n)).to(where)
            starts = range(0, T - n + 1, n)
            per_pass = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                for at in starts:
                    cloud(tokens=tokens, input_pos=torch.arange(P + at, P + at + n, device=where), cache=cache)
                sync()
                per_pass.append((time.perf_counter() - t0) / len(starts))
            rows[n] = statistics.median(per_pass) * 1000
    base = rows.get(1)
    result = {"threads": args.threads, "device": device, "params_m": sum(q.numel() for q in cloud.parameters()) / 1e6,
              "forward_ms": {str(n): round(ms, 3) for n, ms in rows.items()},
              "relative_to_one_token": {str(n): round(ms / base, 3) for n, ms in rows.items()} if base else None}
    out = sys.stderr if args.json == "-" else sys.stdout
    for n, ms in rows.items():
        print(f"{n:>3} tokens: {ms:6.2f} ms per forward" + (f"  ({ms / base:.2f}x one token)" if base else ""),
              file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
