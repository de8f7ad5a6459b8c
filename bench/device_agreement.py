"""Where CIAR's quality goes at a fixed cloud-call budget: how often the device and the cloud disagree, and how
much of that disagreement the budget can send up at all.

For each held-out prompt the script makes two images with the same seed: the cloud alone (`cloud`) and `ciar`
(prefix injection, phi, the cloud-call budget at `--cloud-rate`; the device side from `--device-bundle` if
given, else the device model in PyTorch). Then it reads both models, teacher-forced, on each image's final
tokens and asks, position by position after the prefix, whether the device's most likely token is the cloud's
("disagree"), and how likely the cloud finds the token that was kept.

- `cloud image`: the disagreement rate on the cloud's own images: the device's error rate in the cloud's contexts.
- `ciar image`: the same on the collaborative images, split by where the gate put each position: `sent` (a draft
  went up, the cloud decided) and `local` (the device's token was kept unverified).
- `perfect-gate floor`: the share of local positions that would still disagree if the gate sent exactly the
  disagreeing positions first, at the number of drafts the run sent: max(0, disagree - sent) / (1 - sent). When
  the device disagrees more often than the budget sends, no gate can keep the device's tokens the cloud's.

    python bench/device_agreement.py --prompts 100 --json docs/results/device_agreement.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ciar.cli.bench import bundle_proposer, device_label, write_result
from ciar.engine import collaborative_generate, get_method
from ciar.engine.gates import BudgetController
from ciar.engine.loop import LOCAL
from ciar.models import GPT, model_probs
from ciar.models.builtin import BuiltinModels, load_builtin
from ciar.training.evaluate import encode_prompts
from ciar.training.scenes import heldout_prompts


@torch.inference_mode()
def teacher_forced(model: GPT, models: BuiltinModels, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The model's processed distribution (CFG as sampled) at every position of `tokens` (1, T): (T, V)."""
    P = model.config.cls_token_num
    c = model.cfg_condition(cond) if models.sampling.guided else cond
    logits = model(cond=c, tokens=tokens.repeat(c.shape[0] // cond.shape[0], 1)).logits
    return model_probs(logits[:, P - 1:P - 1 + tokens.shape[1]], models.sampling)[0]


def compare(models: BuiltinModels, cond: torch.Tensor, tokens: torch.Tensor, start: int) -> dict[str, np.ndarray]:
    """Per position from `start`: does the device's argmax differ from the cloud's; the cloud's probability of
    the token there; is the cloud sure (its top token over 0.9)."""
    p = teacher_forced(models.cloud, models, cond, tokens)[start:]
    q = teacher_forced(models.device, models, cond, tokens)[start:]
    kept = tokens[0, start:]
    return {"disagree": (p.argmax(-1) != q.argmax(-1)).numpy(),
            "p_kept": p.gather(-1, kept[:, None])[:, 0].numpy(),
            "cloud_sure": (p.max(-1).values > 0.9).numpy()}


def summarize(parts: list[dict[str, np.ndarray]], where: list[np.ndarray] | None = None) -> dict[str, float]:
    """The rates over every image's positions, or only those each image's mask in `where` marks."""
    masks = where or [slice(None)] * len(parts)
    cat = {k: np.concatenate([p[k][w] for p, w in zip(parts, masks)]) for k in parts[0]}
    n = len(cat["disagree"])
    if n == 0:
        return {"positions": 0}
    return {"positions": n,
            "disagree": float(cat["disagree"].mean()),
            "disagree_cloud_sure": float((cat["disagree"] & cat["cloud_sure"]).mean()),
            "kept_token_cloud_prob_under_0.01": float((cat["p_kept"] < 0.01).mean()),
            "kept_token_cloud_logprob": float(np.log(np.maximum(cat["p_kept"], 1e-12)).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=100, help="held-out prompts (default 100)")
    p.add_argument("--cloud-rate", type=float, default=0.3, help="ciar's cloud-call budget (default 0.3)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--device-bundle", type=Path, default=None,
                   help="draft from this exported bundle (e.g. runtime/bundles/onnx-int8) instead of PyTorch")
    p.add_argument("--calibration-prompts", type=int, default=20,
                   help="held-out prompts (after the measured ones) that set the budget's starting tau")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if not 0.0 < args.cloud_rate <= 1.0:
        p.error(f"--cloud-rate must be in (0, 1], got {args.cloud_rate}")
    if args.prompts < 1:
        p.error("--prompts must be >= 1")
    from ciar.cli.bench import calibrate_taus
    from ciar.engine import LINKS

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = load_builtin(args.checkpoint)
    proposer = bundle_proposer(models, args.device_bundle, args.threads, "device_agreement.py")
    pool = heldout_prompts(max(1000, args.prompts + args.calibration_prompts))
    prompts, calibration = pool[:args.prompts], pool[args.prompts:args.prompts + args.calibration_prompts]
    tau = calibrate_taus(models, calibration, args.cloud_rate, args.seed, LINKS["lan"], proposer=proposer)["interval"]
    ciar = get_method("ciar", tau=tau)
    m = int(ciar.prefix_fraction * models.cloud.config.block_size)
    base_parts, ciar_parts, sent, local, calls = [], [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="prompts", file=sys.stderr)):
        cond = encode_prompts(models, [prompt])
        seed = args.seed * 1_000_003 + i
        with torch.inference_mode():
            base = collaborative_generate(get_method("cloud"), models.cloud, models.device, cond, models.sampling,
                                          torch.Generator().manual_seed(seed))
            res = collaborative_generate(ciar, models.cloud, models.device, cond, models.sampling,
                                         torch.Generator().manual_seed(seed), phi=models.phi,
                                         budget=BudgetController(tau, args.cloud_rate), proposer=proposer)
        base_parts.append(compare(models, cond, base.tokens, m))
        ciar_parts.append(compare(models, cond, res.tokens, m))
        sent.append(res.sent[0, m:].numpy())
        local.append((res.source[0, m:] == LOCAL).numpy())
        calls.append(res.stats["cloud_calls"])
    on_ciar = summarize(ciar_parts)
    sent_rate = float(np.concatenate(sent).mean())
    floor = max(0.0, on_ciar["disagree"] - sent_rate) / (1.0 - sent_rate)
    result = {"prompts": len(prompts), "seed": args.seed, "cloud_rate_target": args.cloud_rate, "tau": tau,
              "checkpoint": str(args.checkpoint or "shipped"), "device": device_label(proposer),
              "device_layers": models.device.config.n_layer, "cloud_layers": models.cloud.config.n_layer,
              "cloud_calls": float(np.mean(calls)), "sent_rate": sent_rate,
              "cloud_image": summarize(base_parts),
              "ciar_image": {"all": on_ciar, "sent": summarize(ciar_parts, sent),
                             "local": summarize(ciar_parts, local)},
              "perfect_gate_local_floor": floor,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"device {result['device_layers']} layer(s) vs cloud {result['cloud_layers']}, {len(prompts)} prompts, "
          f"cloud calls {result['cloud_calls']:.3f}, drafts sent at {sent_rate:.3f} of positions", file=out)
    print(f"{'positions after the prefix':<30}{'disagree':>10}{'  (cloud sure)':>15}{'kept p<0.01':>13}", file=out)
    for name, row in (("cloud image", result["cloud_image"]), *(
            (f"ciar image, {k}", v) for k, v in result["ciar_image"].items())):
        print(f"{name:<30}{row['disagree']:>10.3f}{row['disagree_cloud_sure']:>15.3f}"
              f"{row['kept_token_cloud_prob_under_0.01']:>13.3f}", file=out)
    print(f"perfect-gate floor of local disagreement at this send rate: {floor:.3f}", file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
