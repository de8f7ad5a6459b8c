"""How often could a device that drafts past a verification in flight guess the cloud's next token?

Drafting ahead (`ciar-inflight`, `ciar-device run --lookahead`) keeps its drafts past a Verify only when the cloud
kept the sent draft *and* its token after it (the bonus, sampled from the cloud's p) is the one the device guessed
there. This script runs `ciar` (waiting, the shipped int8 bundle as the device, the budget at --cloud-rate) and, at
every verification, takes the cloud's bonus distribution p and the device's own distribution q at that position
(the device has the draft in its cache by then), and reports per verification:

- kept: the share of verifications that kept the draft (only those can keep drafts made past it);
- the chance that the bonus equals the device's guess for three guessing rules: its most likely token (what the
  loops do), and a draw shared with the cloud, i.e. both sides sampling from one uniform by inverse CDF, or from one
  Gumbel vector by Gumbel-max (exact: the cloud's bonus is still a sample of p);
- the ceiling of any rule, 1 - TV(p, q), the most two coupled draws can agree.

    python bench/bonus_guess.py --prompts 20 --json docs/results/bonus_guess.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ciar.cli.bench import bundle_proposer, write_result
from ciar.engine import collaborative_generate, get_method
from ciar.engine.gates import BudgetController
from ciar.engine.policy import speculative_sampling
from ciar.models.builtin import load_builtin
from ciar.models.sampling import processed_probs
from ciar.training.scenes import heldout_prompts


def agreement(p: torch.Tensor, q: torch.Tensor, gumbel: torch.Tensor) -> dict[str, float]:
    """P(the cloud's bonus equals the device's guess) for each rule, for one pair of distributions (V,)."""
    zero = torch.zeros(1, dtype=p.dtype)
    Fp, Fq = p.cumsum(0), q.cumsum(0)
    lo = torch.maximum(torch.cat([zero, Fp[:-1]]), torch.cat([zero, Fq[:-1]]))
    log_p, log_q = p.clamp_min(1e-300).log(), q.clamp_min(1e-300).log()
    return {"argmax": float(p[q.argmax()]),
            "inverse_cdf": float((torch.minimum(Fp, Fq) - lo).clamp_min(0).sum()),
            "gumbel": float(((log_p + gumbel).argmax(1) == (log_q + gumbel).argmax(1)).double().mean()),
            "ceiling": 1.0 - 0.5 * float((p - q).abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help="held-out prompts (default 20)")
    ap.add_argument("--bundle", type=Path, default=Path("runtime/bundles/onnx-int8"), help="the device bundle")
    ap.add_argument("--cloud-rate", type=float, default=0.3, help="the budget's cloud calls per token")
    ap.add_argument("--tau", type=float, default=1.4e-4, help="the budget's starting tau")
    ap.add_argument("--gumbel-draws", type=int, default=2000, help="Monte Carlo draws for the Gumbel rule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the result here ('-' prints it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = load_builtin()
    proposer = bundle_proposer(models, args.bundle, 1, "bench/bonus_guess.py")
    verdicts: list[tuple[torch.Tensor, bool]] = []  # (the cloud's bonus distribution, draft kept)

    def recording(p, q, drafts, generator):
        n, nxt = speculative_sampling(p, q, drafts, generator)
        verdicts.append((p[0, -1].double(), bool(n[0] == drafts.shape[1])))
        return n, nxt

    pairs: list = []
    method = get_method("ciar", tau=args.tau)
    gumbel = -torch.log(-torch.log(torch.rand(args.gumbel_draws, models.device.config.vocab_size,
                                              generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)))

    class Pairing:
        """The bundle's device side, pairing each verdict with the device's q where the cloud's bonus goes (its
        ingest straight after a Verify writes the sent draft, before the verdict is read)."""
        feature_dim = proposer.feature_dim

        def start(self, cond, num_tokens):
            proposer.start(cond, num_tokens)

        def draft(self, generator):
            return proposer.draft(generator)

        def ingest(self, tokens, at):
            proposer.ingest(tokens, at)
            if len(verdicts) > len(pairs):
                pairs.append((*verdicts[len(pairs)], processed_probs(proposer.centre, proposer.post)[0].double()))

    for i, prompt in enumerate(tqdm(heldout_prompts(1000)[: args.prompts], desc="images")):
        collaborative_generate(method, models.cloud, models.device, models.encode_prompts([prompt]),
                               models.sampling, torch.Generator().manual_seed(args.seed * 1_000_003 + i),
                               phi=models.phi, proposer=Pairing(), policy=recording,
                               budget=BudgetController(method.tau, args.cloud_rate))
    rows = [agreement(p, q, gumbel) for p, was_kept, q in pairs if was_kept]
    kept = len(rows)
    result = {"prompts": args.prompts, "bundle": str(args.bundle), "verifications": len(pairs),
              "kept": kept / len(pairs),
              "bonus_equals_guess": {rule: float(np.mean([r[rule] for r in rows])) for rule in rows[0]}}
    result["drafts_ahead_stand"] = {rule: result["kept"] * v for rule, v in result["bonus_equals_guess"].items()}
    print(f"{len(pairs)} verifications, {kept} kept ({result['kept']:.3f}); P(bonus == guess | kept): " +
          ", ".join(f"{k} {v:.3f}" for k, v in result["bonus_equals_guess"].items()))
    write_result(result, args.json)


if __name__ == "__main__":
    main()
