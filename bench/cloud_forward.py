"""What one cloud forward costs as a function of the tokens it ingests (the CFG pair, one torch thread): the
cloud-only base pays a 1-token forward per image token, a verification pays one forward over the tokens the cloud
has not seen plus the drafts. Their ratio bounds any method's speed-up at a given cloud-call rate.

    python bench/cloud_forward.py --json docs/results/cloud_forward.json
    python bench/cloud_forward.py --device cuda --json docs/results/cloud_forward_cuda.json
    python bench/cloud_forward.py --device cuda --shape GPT-XL --dtype bf16 --json xl.json

`--shape` times a LlamaGen-sized cloud (t2i: 120 caption tokens of width 2048, 16384 codes, 256 image tokens) with
random weights instead of the built-in model: what a forward costs does not depend on the weights' values. It says
what the cloud step of a production-sized cloud costs next to the built-in one; it generates no image.
"""
from __future__ import annotations

import argparse
import os
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
    p.add_argument("--shape", default=None, metavar="NAME", help="time a LlamaGen-sized cloud with random weights "
                   "instead of the built-in one: GPT-B, GPT-L, GPT-XL, ..., GPT-7B")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and cache (default fp32)")
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

    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    device = place_cloud(models, args.device, "cloud_forward.py", "--device")  # checks the device for --shape too
    where = next(models.cloud.parameters()).device
    cloud, cond = _cloud(models, args.shape, where, p)
    cloud = cloud.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).eval()
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    P, T = cloud.config.cls_token_num, cloud.config.block_size
    cond = cloud.cfg_condition(cond.to(device=where, dtype=next(cloud.parameters()).dtype))
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
    result = {"threads": args.threads, "device": device, "shape": args.shape or "built-in", "dtype": args.dtype,
              "params_m": sum(q.numel() for q in cloud.parameters()) / 1e6,
              "forward_ms": {str(n): round(ms, 3) for n, ms in rows.items()},
              "relative_to_one_token": {str(n): round(ms / base, 3) for n, ms in rows.items()} if base else None}
    out = sys.stderr if args.json == "-" else sys.stdout
    for n, ms in rows.items():
        print(f"{n:>3} tokens: {ms:6.2f} ms per forward" + (f"  ({ms / base:.2f}x one token)" if base else ""),
              file=out)
    write_result(result, args.json)
    return 0


def _cloud(models, shape: str | None, where, parser):
    """The built-in cloud and a real caption's condition, or a LlamaGen-sized t2i GPT built on `where` (seeded
    random weights) and a random condition."""
    import torch

    from ciar.models import GPT
    from ciar.models.config import GPT_CONFIG_NAMES, gpt_config
    from ciar.training.scenes import heldout_prompts

    if shape is None:
        return models.cloud, models.encode_prompts(heldout_prompts(1))
    if shape not in GPT_CONFIG_NAMES:
        parser.error(f"--shape {shape!r}: choose one of {', '.join(GPT_CONFIG_NAMES)}")
    cfg = gpt_config(shape, model_type="t2i", cls_token_num=120, caption_dim=2048, vocab_size=16384, block_size=256)
    need = 4 * 12.5 * cfg.n_layer * cfg.dim ** 2  # bytes of fp32 weights while initialising (about 12 dim^2 a layer)
    have = (torch.cuda.get_device_properties(where).total_memory if where.type == "cuda"
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > 0.8 * have:
        parser.error(f"--shape {shape} needs about {need / 2**30:.0f} GiB while it is initialised in fp32; "
                     f"{where} has {have / 2**30:.0f} GiB (use a smaller shape, or a GPU)")
    torch.manual_seed(0)
    with torch.device(where):  # initialise on the target device: a 7B model never sits in host memory
        cloud = GPT(cfg)
    cond = torch.randn(1, cfg.cls_token_num, cfg.caption_dim, generator=torch.Generator().manual_seed(0))
    return cloud, cond


if __name__ == "__main__":
    sys.exit(main())
