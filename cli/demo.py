"""`ciar demo`: the main job on the built-in default model. CIAR collaborative decoding of one caption: the cloud
writes the prefix, the device drafts every token and keeps the certain ones, the cloud verifies the uncertain ones.
Device and cloud run in this process behind the engine's transport, with an emulated link (the websocket bridge
will put a real socket there). Writes image.png, uncertainty.png, cloud_only.png and stats.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the caption")
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same image")
    p.add_argument("--cloud-rate", type=float, default=0.3, help="target share of drafts sent to the cloud")
    p.add_argument("--link", choices=["lan", "wifi", "4g"], default="wifi", help="emulated link (default wifi)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ciar.engine import LINKS, collaborative_generate, get_method
    from ciar.engine.gates import calibrate_tau
    from ciar.engine.loop import PREFIX
    from ciar.models.builtin import load_builtin
    from ciar.runtime.images import save_png, uncertainty_map, upscale
    from ciar.training.evaluate import decode_tokens, encode_prompts

    torch.set_num_threads(1)
    models = load_builtin(args.checkpoint)
    link = LINKS[args.link]
    cond = encode_prompts(models, [args.prompt])
    probe = collaborative_generate(get_method("device"), models.cloud, models.device, cond, models.sampling,
                                   torch.Generator().manual_seed(args.seed + 1), link=link)
    u = probe.u.flatten().numpy()
    tau = calibrate_tau(u[~np.isnan(u)], args.cloud_rate)
    runs = {}
    for name, method in (("cloud", get_method("cloud")), ("ciar", get_method("ciar", tau=tau))):
        runs[name] = collaborative_generate(method, models.cloud, models.device, cond, models.sampling,
                                            torch.Generator().manual_seed(args.seed), phi=models.phi, link=link,
                                            caption_bytes=len(args.prompt.encode()))
    ciar, base = runs["ciar"], runs["cloud"]
    image = decode_tokens(models, ciar.tokens)[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_png(upscale(image, 4), args.out_dir / "image.png")
    save_png(upscale(decode_tokens(models, base.tokens)[0], 4), args.out_dir / "cloud_only.png")
    save_png(uncertainty_map(image, ciar.sent[0].numpy(), (ciar.source[0] == PREFIX).numpy()),
             args.out_dir / "uncertainty.png")
    st = ciar.stats
    stats = {"prompt": args.prompt, "seed": args.seed, "link": args.link, "tau": tau,
             "tokens": st["tokens"], "local": st["local"], "cloud": st["cloud"], "sent": st["sent"],
             "cloud_calls": st["cloud_calls"], "bytes_up": st["bytes_up"], "bytes_down": st["bytes_down"],
             "seconds": st["seconds"], "device_seconds": st["device_seconds"], "cloud_seconds": st["cloud_seconds"],
             "link_seconds": st["link_seconds"], "cloud_only_seconds": base.stats["seconds"],
             "speedup_vs_cloud_only": base.stats["seconds"] / st["seconds"],
             "transport": "in-process (emulated link)"}
    (args.out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"wrote {args.out_dir}/image.png, uncertainty.png, cloud_only.png, stats.json")
        print(f"{stats['local']:.0f} of {stats['tokens']} tokens kept on the device, {stats['sent']:.0f} verified by "
              f"the cloud; cloud_calls {stats['cloud_calls']:.2f}; {stats['speedup_vs_cloud_only']:.2f}x the "
              f"cloud-only time on the emulated {args.link} link")
    return 0
