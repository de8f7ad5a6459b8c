"""How well could ANY device-side score predict where the device and cloud disagree? (MODEL_CARD.md, the gate)

`ciar eval gate` ranks three fixed scores (the Inter-Head's U, the entropy and 1 - max probability of the device's
processed distribution) by AUROC for "device argmax != cloud argmax" on cloud-generated sequences of held-out
prompts. This script bounds what a better Inter-Head could reach: it collects, on the same kind of sequences,
the device-side features each group below can see, fits probes on training-split prompts (never the held-out
ones) and scores them on the held-out gate prompts of `ciar eval gate` (same prompts, seed and labels):

- distribution: statistics of the device's processed distribution (max prob, top-2 margin, entropy, per-branch
  max prob, whether the cond and uncond argmaxes agree, its latent spread) and the Inter-Head's U, Omega, Sigma;
- hidden: the device's final hidden states (cond and uncond), the Inter-Head's only input;
- head inputs: hidden + distribution: everything an Inter-Head on the one-layer device can compute from;
- neighbours: whether the device's argmax equals the token to the left / above, and whether those neighbours
  agree with theirs (on this data a flat region repeats its token): what the Inter-Head's neighbour scale reads
  (v5 on; before it the head saw only h, the head inputs group);
- all: head inputs + neighbours.

Probes: gradient-boosted trees (and logistic regression on the small groups).

A second target (`latent` in the JSON): the latent oracle's score of `bench/oracle_gate.py` (the squared distance
in the VQ codebook's latent space between the device's draft and the cloud's token), expected over the draft, at
every position. What a gate sending a share r of the positions by a score makes of it is `captured_r`: the target
summed over the positions it sends, over the most any ranking could send at r (1 = the oracle). Read for the single
scores (U, entropy, max-prob, and the device distribution's own latent spread, the latent gate's score) and for
regression trees fitted to the target on each feature group.

With `--refit-steps N` the shipped radius head (linear radius and neighbour scale) is also fine-tuned for N steps
on the rank term alone (the pairwise AUROC surrogate of `training/inter_dro.py`) on the training sequences and its
U re-scored: the Inter-Head as it is, trained for nothing but this AUROC. Needs scikit-learn (`pip install -e
.[bench]`).

    python bench/gate_ceiling.py --train-prompts 300 --refit-steps 1000 --json docs/results/gate_ceiling.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ciar.models import entropy, interfuse
from ciar.models.builtin import BuiltinModels, load_builtin
from ciar.models.interval import neighbour_ids, process_interval
from ciar.models.sampling import latent_distance, latent_spread
from ciar.training.evaluate import gate_batches
from ciar.training.inter_dro import rank_loss
from ciar.training.metrics import auroc
from ciar.training.scenes import SceneStream, heldout_prompts

DISTRIBUTION = ["maxprob", "margin", "entropy", "log_u", "omega", "sigma", "maxprob_cond", "maxprob_uncond",
                "branches_agree", "latent_spread"]
NEIGHBOURS = ["argmax_is_left", "argmax_is_above", "left_is_above", "left_is_left2", "above_is_above_left"]
BATCH = 25  # sequences per cloud generate call


@dataclass
class Features:
    scalars: np.ndarray  # (N, len(DISTRIBUTION) + len(NEIGHBOURS))
    hidden: np.ndarray  # (N, 2 * dim): [cond | uncond] final hidden states
    labels: np.ndarray  # (N,) bool: device argmax != cloud argmax
    latent: np.ndarray  # (N,) the latent oracle's score expected over the device's draft (`latent_target`)
    neighbours: np.ndarray  # (N, 2) int64: `neighbour_ids` of each position

    def columns(self, names: list[str]) -> np.ndarray:
        order = DISTRIBUTION + NEIGHBOURS
        return self.scalars[:, [order.index(n) for n in names]]


def _shifted(tokens: torch.Tensor, by: int) -> torch.Tensor:
    """tokens[:, t - by] at every position t (-1 where t < by)."""
    return torch.cat([torch.full((tokens.shape[0], by), -1), tokens[:, :-by]], 1)


def latent_target(p: torch.Tensor, q: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """E_{x~q, y~p} ||e_x - e_y||^2: the score `bench/oracle_gate.py`'s latent oracle gives a device draft x,
    expected over the draft (the oracle reads the cloud's p, a gate on the device cannot)."""
    return latent_distance(q, p, codebook)


def collect(models: BuiltinModels, prompts: list[str], seed: int, desc: str = "") -> Features:
    """Features at every position of the cloud-generated sequences of `gate_batches` (as `ciar eval gate`)."""
    G = models.cloud.config.grid_size
    codebook = models.codebook()
    scalars, hidden, labels, latent, neighbours = [], [], [], [], []
    for g in tqdm(gate_batches(models, prompts, seed, BATCH), total=-(-len(prompts) // BATCH), desc=desc,
                  file=sys.stderr):
        B, q, iv, out, tokens = g.tokens.shape[0], g.q, g.interval, g.device, g.tokens
        top2 = q.topk(2, -1).values
        p_cond, p_uncond = out.centre[:B].softmax(-1), out.centre[B:].softmax(-1)
        nb = neighbour_ids(tokens, G)
        argmax, (left, above) = q.argmax(-1), nb.unbind(-1)
        cols = [top2[..., 0], top2[..., 0] - top2[..., 1], entropy(q),
                iv.u.clamp_min(1e-30).log(), iv.omega, iv.sigma, p_cond.amax(-1), p_uncond.amax(-1),
                p_cond.argmax(-1) == p_uncond.argmax(-1), latent_spread(q, codebook),
                argmax == left, argmax == above, left == above, left == _shifted(tokens, 2),
                above == _shifted(tokens, G + 1)]
        scalars.append(torch.stack([c.float() for c in cols], -1).flatten(0, 1).numpy())
        hidden.append(torch.cat([out.hidden[:B], out.hidden[B:]], -1).flatten(0, 1).numpy())
        labels.append(g.disagree.flatten().numpy())
        latent.append(latent_target(g.p_cloud, q, codebook).flatten().numpy())
        neighbours.append(nb.flatten(0, 1).numpy())
    return Features(np.concatenate(scalars), np.concatenate(hidden), np.concatenate(labels),
                    np.concatenate(latent), np.concatenate(neighbours))


GROUPS = {
    "distribution": lambda f: f.columns(DISTRIBUTION),
    "hidden": lambda f: f.hidden,
    "head_inputs": lambda f: np.c_[f.hidden, f.columns(DISTRIBUTION)],
    "distribution+neighbours": lambda f: f.columns(DISTRIBUTION + NEIGHBOURS),
    "all": lambda f: np.c_[f.hidden, f.scalars],
}
RATES = (0.15, 0.3)  # cloud-call rates at which `captured` reads a ranking of the latent target


def probe_aurocs(train: Features, test: Features) -> dict[str, dict[str, float]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    result: dict[str, dict[str, float]] = {}
    for name, pick in tqdm(GROUPS.items(), desc="probes", file=sys.stderr):
        x_train, x_test = pick(train), pick(test)
        probes = {"trees": HistGradientBoostingClassifier(max_iter=300, random_state=0)}
        if x_train.shape[1] < 64:
            probes["logistic"] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        result[name] = {}
        for kind, probe in probes.items():
            probe.fit(x_train, train.labels)
            result[name][kind] = auroc(probe.predict_proba(x_test)[:, 1], test.labels)
    return result


def captured(score: np.ndarray, target: np.ndarray, rate: float) -> float:
    """The share of the latent target a gate sending the top `rate` of positions by `score` sends, relative to
    the best any ranking could send at that rate (the target's own top `rate`): 1 is the oracle."""
    n = max(1, round(rate * target.size))
    return float(target[np.argsort(-score, kind="stable")[:n]].sum() / np.sort(target)[::-1][:n].sum())


def latent_report(score: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """How well `score` ranks the latent target: Spearman's rho and `captured` at each of RATES."""
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(score, target).statistic),
            **{f"captured_{r}": captured(score, target, r) for r in RATES}}


def probe_latent(train: Features, test: Features) -> dict[str, dict[str, float]]:
    """Regression trees fitted to the latent target on each feature group, read by `latent_report`."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    result = {}
    for name, pick in tqdm(GROUPS.items(), desc="latent probes", file=sys.stderr):
        probe = HistGradientBoostingRegressor(max_iter=300, random_state=0).fit(pick(train), train.latent)
        result[name] = latent_report(probe.predict(pick(test)), test.latent)
    return result


def refit_radius(models: BuiltinModels, train: Features, test: Features, steps: int, seed: int) -> list[dict]:
    """Fine-tune a copy of the shipped radius head (its linear radius and its neighbour scale) on the rank term
    alone; U's held-out AUROC along the way."""
    device, dim, s = models.device, models.device.config.dim, models.sampling
    head = copy.deepcopy(device.inter_head).train()

    def u_of(h: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        h = h.view(-1, 2, dim).transpose(0, 1).reshape(-1, dim)  # [cond rows; uncond rows]
        with torch.no_grad():
            centre = device.output(h).float()
        c, r = process_interval(centre, head(h), s.cfg_scale, s.temperature)
        return interfuse(c, head.scale(c, r, neighbours)).u

    def held_out() -> float:
        with torch.no_grad():
            h, nb = torch.from_numpy(test.hidden), torch.from_numpy(test.neighbours)
            u = torch.cat([u_of(h[i:i + 4096], nb[i:i + 4096]) for i in range(0, len(h), 4096)])
            return auroc(u.numpy(), test.labels)

    h_train, y_train = torch.from_numpy(train.hidden), torch.from_numpy(train.labels)
    nb_train = torch.from_numpy(train.neighbours)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, "rank_loss": None, "auroc": held_out()}]
    for step in tqdm(range(1, steps + 1), desc="refit radius", file=sys.stderr):
        idx = torch.randint(0, len(h_train), (2048,), generator=gen)
        loss = rank_loss(u_of(h_train[idx], nb_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            curve.append({"step": step, "rank_loss": float(loss), "auroc": held_out()})
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    ap.add_argument("--train-prompts", type=int, default=300, help="training-split prompts the probes fit on")
    ap.add_argument("--prompts", type=int, default=100, help="held-out prompts scored (as `ciar eval gate`)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed of the held-out sequences")
    ap.add_argument("--refit-steps", type=int, default=0, help="also refit the radius head on the rank term")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args()
    if args.train_prompts < 1 or args.prompts < 1:
        ap.error("--train-prompts and --prompts must be at least 1")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("bench/gate_ceiling.py needs scikit-learn: pip install -e .[bench]") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    models = load_builtin(args.checkpoint)
    # training-split scenes (never held out), generated with another seed than the held-out sequences
    train = collect(models, SceneStream(seed=424242).batch(args.train_prompts)[1], args.seed + 7,
                    desc="train sequences")
    test = collect(models, heldout_prompts(max(args.prompts, 1000))[: args.prompts], args.seed,
                   desc="held-out sequences")
    single = {"interval": test.columns(["log_u"])[:, 0], "entropy": test.columns(["entropy"])[:, 0],
              "maxprob": -test.columns(["maxprob"])[:, 0], "latent_spread": test.columns(["latent_spread"])[:, 0]}
    result = {"train_prompts": args.train_prompts, "prompts": args.prompts, "seed": args.seed,
              "positions": int(test.labels.size), "disagreement_rate": float(test.labels.mean()),
              "auroc": {k: auroc(v, test.labels) for k, v in single.items()}, "probes": probe_aurocs(train, test),
              "latent": {"mean": float(test.latent.mean()),
                         "single": {k: latent_report(v, test.latent) for k, v in single.items()},
                         "probes": probe_latent(train, test)}}
    if args.refit_steps:
        result["radius_refit"] = refit_radius(models, train, test, args.refit_steps, args.seed)
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
