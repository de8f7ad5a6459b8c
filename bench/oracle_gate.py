"""How much could ANY gate beat max-prob on image quality at a matched cloud-call rate? An oracle gate that reads
the cloud.

The engine issue asks the interval gate to beat the entropy and max-prob gates on FD at a matched cloud-call rate;
on the built-in models the three tie (docs/BENCHMARKS.md, sections 3 and 3h). `bench/gate_ceiling.py` bounds what a
device-side score can rank (AUROC); this script bounds what ranking can buy in the images. It runs the device's
gates (ciar, entropy, max-prob, and `latent`: the spread of the device's own distribution in the VQ codebook's
latent space, `ciar.models.sampling.latent_spread`) beside three gates no device can have, each scoring the
device's draft with the cloud's own processed distribution p at that position (a second cloud cache that follows
the device's stream; the cloud is not charged for it, and no speed is reported):

- `oracle-draft`: the chance that speculative sampling rejects this very draft x, max(0, 1 - p(x) / q(x)): it
  sends exactly the drafts the cloud would most likely replace;
- `oracle-tv`: the total variation TV(p, q) = sum max(0, q - p) at the position, before the draft is drawn: the
  best a gate can do that, like max-prob, entropy and the interval, scores the position rather than the token;
- `oracle-latent`: how far the draft lies from what the cloud would write in the VQ codebook's latent space,
  E_{y~p} ||e(x) - e(y)||^2: a gate that cares about what the image decoder sees rather than code identity
  (visually interchangeable codes count as close; LANTERN's premise).

Every method runs the one engine loop (`collaborative_generate`) on the same prompts, seeds and device graph as
`ciar bench methods`, with each image's cloud calls held at `--cloud-rate` by the budget controller and tau
calibrated on the same held-out calibration prompts; the oracles run in the bare gates' pipeline (no prefix
injection, no interval features). The oracle's score travels in the draft's U slot, so the loop, the budget and
the acceptance rule are the ones every method uses. Quality and the paired bootstrap are `ciar bench methods`'s.

A method given as `NAME@RATE` (e.g. `latent@0.14`) is held at that cloud-call rate instead of `--cloud-rate`, tau
calibrated for it: a gate that lands a little above the others' rate can be checked below it in the same table.

With `--divergence N` the first N images of every method are made again with the cloud reading every draft (the
gate's decisions unchanged; the JSON says whether the images came out the same) to ask where the gap lies:
TV(p, q) summed over an image's drafted positions is the number of drafts speculative sampling would expect to
reject if every one went up; the part left on kept positions is the divergence the image keeps, and 1 - kept /
drafted the share of it the gate sent. (ciar's cloud also reads the interval features, which this p does not.)

    python bench/oracle_gate.py --prompts 900 --cloud-rate 0.15 --reference maxprob --divergence 100 --tokens DIR \
        --json docs/results/oracle_gate_900_rate0.15.json    (docs/BENCHMARKS.md section 3i)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ciar.cli.bench import (GATED, bundle_proposer, calibrate_taus, device_label, print_bootstrap, quality_rows,
                            run_methods, timing_rows, write_result)
from ciar.engine import LINKS, get_method
from ciar.engine.loop import LOCAL
from ciar.engine.methods import Method
from ciar.engine.proposer import DeviceProposer, Proposer
from ciar.engine.types import Draft
from ciar.models import GPT, SamplingConfig, model_probs
from ciar.models.builtin import load_builtin
from ciar.models.sampling import latent_distance
from ciar.runtime.cli import at_least
from ciar.training.evaluate import paired_quality_bootstrap
from ciar.training.scenes import heldout_prompts

ORACLES = ("oracle-draft", "oracle-tv", "oracle-latent")
DEVICE_GATES = ("ciar", "entropy", "maxprob", "latent")


def oracle_score(kind: str, p: Tensor, q: Tensor, token: Tensor, codebook: Tensor | None = None) -> Tensor:
    """(B,) the oracle's score of a draft `token` (B,) drawn from q (B, V), given the cloud's p (B, V); the latent
    oracle also reads the VQ codebook (V, D)."""
    if kind == "oracle-tv":
        return (q - p).clamp_min(0).sum(-1)
    if kind == "oracle-draft":
        px, qx = p.gather(-1, token[:, None])[:, 0], q.gather(-1, token[:, None])[:, 0]
        return (1 - px / qx).clamp_min(0)
    if kind == "oracle-latent":
        if codebook is None:
            raise ValueError("the latent oracle needs the VQ codebook")
        return latent_distance(torch.nn.functional.one_hot(token, p.shape[-1]).to(p.dtype), p, codebook)
    raise ValueError(f"unknown oracle {kind!r}; choose one of {ORACLES}")


class OracleProposer:
    """A proposer whose drafts are the wrapped proposer's, read by the cloud: it keeps a second cloud KV cache fed
    with exactly the tokens the device ingests (rewinds included), so at every draft it knows the cloud's processed
    distribution p at that position given the image so far. With an oracle `kind` it puts `oracle_score` in the
    draft's U (the gate that reads U then is that oracle); with None the draft goes out untouched. Either way it
    records TV(p, q) at every drafted position: `traces` holds one (T,) tensor per image (nan where nothing was
    drafted)."""

    def __init__(self, inner: Proposer, cloud: GPT, sampling: SamplingConfig, kind: str | None,
                 codebook: Tensor | None = None) -> None:
        if kind is not None and kind not in ORACLES:
            raise ValueError(f"unknown oracle {kind!r}; choose one of {ORACLES}")
        self.inner, self.cloud, self.sampling, self.kind = inner, cloud.eval(), sampling, kind
        self.codebook = codebook
        self.feature_dim = inner.feature_dim
        self.traces: list[Tensor] = []

    @torch.inference_mode()
    def start(self, cond: Tensor, num_tokens: int) -> None:
        self.inner.start(cond, num_tokens)
        c = self.cloud.cfg_condition(cond) if self.sampling.guided else cond
        self.rows = c.shape[0] // cond.shape[0]
        self.cache = self.cloud.new_cache(c.shape[0], self.cloud.config.cls_token_num + num_tokens)
        self.logits = self.cloud(cond=c, cache=self.cache).logits[:, -1]
        self.traces.append(torch.full((num_tokens,), float("nan")))

    @torch.inference_mode()
    def ingest(self, tokens: Tensor, at: int) -> None:
        self.inner.ingest(tokens, at)
        P = self.cloud.config.cls_token_num
        pos = torch.arange(P + at, P + at + tokens.shape[1])
        self.logits = self.cloud(tokens=tokens.repeat(self.rows, 1), cache=self.cache, input_pos=pos).logits[:, -1]

    @torch.inference_mode()
    def draft(self, generator: torch.Generator) -> Draft:
        d = self.inner.draft(generator)
        p = model_probs(self.logits, self.sampling)
        self.traces[-1][self.inner.pos] = float(oracle_score("oracle-tv", p, d.q, d.token)[0])
        if self.kind is None:
            return d
        return dataclasses.replace(d, u=oracle_score(self.kind, p, d.q, d.token, self.codebook))


def kept_divergence(traces: list[Tensor], sources: list[Tensor]) -> dict[str, float]:
    """Per image, the device-cloud divergence TV(p, q) summed over the drafted positions (the expected number of
    drafts speculative sampling would reject if every one were verified) and over those kept on the device
    unverified; the share of it the gate sent is 1 - kept / drafted (over all images)."""
    drafted = torch.stack([t.nansum() for t in traces])
    kept = torch.stack([t[s[0] == LOCAL].nansum() for t, s in zip(traces, sources)])
    return {"drafted_tv": float(drafted.mean()), "kept_tv": float(kept.mean()),
            "sent_share_of_tv": float(1 - kept.sum() / drafted.sum()),
            "local_tokens": float(torch.stack([(s[0] == LOCAL).sum() for s in sources]).float().mean())}


def load_images(directory: Path | None, name: str, key: dict) -> dict | None:
    """A method's images, per-image stats and tau (and the divergence rows already measured on them, by image
    count) from an earlier run with the same `key`, else None."""
    path = directory / f"{name}.pt" if directory else None
    if path is None or not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    if saved["key"] != key:
        return None
    return {"tokens": saved["tokens"], "stats": saved["stats"], "tau": saved["tau"],
            "divergence": saved.get("divergence", {})}


def save_images(directory: Path | None, name: str, key: dict, run: dict) -> None:
    if directory:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "divergence": run.get("divergence", {}),
                    **{k: run[k] for k in ("tokens", "stats", "tau")}}, directory / f"{name}.pt")


def method_spec(spec: str) -> tuple[str, float | None]:
    """`NAME` or `NAME@RATE` (a gate held at another cloud-call rate than --cloud-rate) -> (NAME, RATE or None).
    Raises argparse.ArgumentTypeError, saying what is allowed, for anything else."""
    name, at, rate = spec.partition("@")
    if name not in ("cloud", *DEVICE_GATES, *ORACLES):
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from cloud, {', '.join(DEVICE_GATES)}, "
                                         f"{', '.join(ORACLES)} (a gate may carry @RATE, e.g. latent@0.14)")
    if not at:
        return name, None
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if name == "cloud" or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: @RATE must be a cloud-call rate in (0, 1) after a gate's name")
    return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompts", type=at_least(2), default=100, help="held-out prompts (those of `ciar bench methods`)")
    ap.add_argument("--calibration-prompts", type=at_least(1), default=20,
                    help="the held-out prompts after them that turn --cloud-rate into each gate's tau")
    ap.add_argument("--cloud-rate", type=float, default=0.15, help="cloud calls per token every gate is held at")
    ap.add_argument("--methods", nargs="+", default=[*DEVICE_GATES, *ORACLES], metavar="METHOD",
                    help=f"from cloud, {', '.join(DEVICE_GATES)}, {', '.join(ORACLES)}; a gate's NAME@RATE holds it "
                         "at another cloud-call rate than --cloud-rate (e.g. latent@0.14: a rate-matched check)")
    ap.add_argument("--reference", default="oracle-draft", help="the method the bootstrap compares with the others")
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples over prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    ap.add_argument("--device-bundle", type=Path, default=Path("runtime/bundles/onnx-int8"),
                    help="the device graph (an interval bundle); 'eager' for the device model in PyTorch")
    ap.add_argument("--divergence", type=int, default=0, metavar="N",
                    help="also decode the first N prompts again with the cloud reading every draft (whatever the "
                         "gate), and report per image the device-cloud divergence TV(p, q) summed over the drafted "
                         "positions and over those kept on the device: how much of it each gate sent")
    ap.add_argument("--tokens", type=Path, default=None, metavar="DIR",
                    help="keep each method's images (and --divergence rows) here, and reuse those made with the same "
                         "prompts, seed, rate and device: methods can then be decoded by separate runs (one per core) "
                         "and compared by a last one that decodes nothing")
    ap.add_argument("--json", default=None, help="write the results here ('-' prints them)")
    args = ap.parse_args(argv)
    if not 0 < args.cloud_rate < 1:
        ap.error(f"--cloud-rate must be in (0, 1), got {args.cloud_rate}")
    if args.reference not in args.methods:
        ap.error(f"--reference {args.reference} is not among --methods")
    try:
        specs = {spec: method_spec(spec) for spec in args.methods}
    except argparse.ArgumentTypeError as e:
        ap.error(f"--methods: {e}")
    rate_of = {spec: rate or args.cloud_rate for spec, (_, rate) in specs.items()}

    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    bundle = None if str(args.device_bundle) == "eager" else args.device_bundle
    base = bundle_proposer(models, bundle, args.threads, "oracle_gate.py")
    device = base or DeviceProposer(models.device, models.sampling)
    codebook = models.codebook()
    oracles = {k: OracleProposer(device, models.cloud, models.sampling, k, codebook)
               for k in ORACLES if k in {name for name, _ in specs.values()}}
    link = LINKS["lan"]
    pool = heldout_prompts(max(1000, args.prompts + args.calibration_prompts))
    prompts, calibration = pool[:args.prompts], pool[args.prompts:args.prompts + args.calibration_prompts]
    t0 = time.perf_counter()

    key = {"prompts": len(prompts), "calibration_prompts": len(calibration), "seed": args.seed,
           "device": device_label(base), "checkpoint": str(args.checkpoint)}
    saved_as = {spec: {**key, "cloud_rate": rate} for spec, rate in rate_of.items()}  # each method's cache key
    device_taus: dict[float, dict[str, float]] = {}  # rate -> gate kind -> tau

    def calibrated_tau(name: str, rate: float) -> float:
        """The gate's tau for `rate`, calibrated on the calibration prompts (the probe writes CIAR's prefix, as
        `ciar bench methods`'s does); the oracles score the probe's drafts with the cloud."""
        if name == "cloud":  # the cloud writes every token: no gate, no tau
            return 0.0
        if name in ORACLES:
            return calibrate_taus(models, calibration, rate, args.seed, link, proposer=oracles[name])["interval"]
        if rate not in device_taus:
            device_taus[rate] = calibrate_taus(models, calibration, rate, args.seed, link, proposer=base)
        return device_taus[rate][GATED[name]]

    def method_at(name: str, tau: float) -> Method:
        return Method(name, gate="interval", tau=tau) if name in ORACLES else get_method(name, tau=tau)

    runs: dict[str, dict] = {}
    with tqdm(total=len(prompts) * len(specs), desc="oracle gate", file=sys.stderr) as bar:
        for spec, (name, _) in specs.items():
            kept = load_images(args.tokens, spec, saved_as[spec])
            if kept is None:
                tau = calibrated_tau(name, rate_of[spec])
                kept = run_methods(models, prompts, {spec: method_at(name, tau)}, link, args.seed, None, bar.update,
                                   budget_rate=rate_of[spec], proposer=oracles.get(name, base))[spec]
                kept["tau"] = tau
                save_images(args.tokens, spec, saved_as[spec], kept)
            else:
                bar.update(len(prompts))
            runs[spec] = kept
    divergence = {}
    if args.divergence:  # the first N images again, each draft read by the cloud (the gates' decisions unchanged)
        n = min(args.divergence, len(prompts))
        with tqdm(total=n * len(runs), desc="divergence", file=sys.stderr) as bar:  # of the gated methods
            for spec, r in runs.items():
                name = specs[spec][0]
                if name == "cloud":  # no drafts
                    bar.update(n)
                    continue
                known = r.setdefault("divergence", {})
                if str(n) not in known:
                    recorder = OracleProposer(device, models.cloud, models.sampling,
                                              name if name in ORACLES else None, codebook)
                    again = run_methods(models, prompts[:n], {spec: method_at(name, r["tau"])}, link, args.seed,
                                        None, bar.update, budget_rate=rate_of[spec], proposer=recorder)[spec]
                    same = all(torch.equal(a, b) for a, b in zip(again["tokens"], r["tokens"]))
                    known[str(n)] = {**kept_divergence(recorder.traces, again["sources"]), "images": n,
                                     "same_images": same}
                    save_images(args.tokens, spec, saved_as[spec], r)
                else:
                    bar.update(n)
                divergence[spec] = known[str(n)]
    samples: dict = {}
    quality = quality_rows(runs, models, prompts, samples)
    timing = timing_rows(runs, base="none")
    keep = ("cloud_calls", "sent", "local", "cloud_forwards")
    table = {name: {**{k: timing[name][k] for k in keep}, **quality[name]} for name in runs}
    result = {"prompts": len(prompts), "seed": args.seed, "cloud_rate_target": args.cloud_rate,
              "device": device_label(base), "taus": {n: r["tau"] for n, r in runs.items()}, "rates": rate_of,
              "methods": table, **({"divergence": divergence} if divergence else {}),
              "bootstrap": paired_quality_bootstrap(samples, args.reference, args.bootstrap, args.seed),
              "seconds": round(time.perf_counter() - t0, 1)}
    stream = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'method':<18}{'calls/token':>12}{'sent/image':>12}{'adherence':>11}{'FD':>8}", file=stream)
    for name, row in table.items():
        print(f"{name:<18}{row['cloud_calls']:>12.3f}{row['sent']:>12.1f}{row['adherence']:>11.3f}{row['fd']:>8.2f}",
              file=stream)
    print_bootstrap(result["bootstrap"], stream)
    for name, d in divergence.items():
        print(f"  {name:<18} TV drafted {d['drafted_tv']:.1f} / image, kept on the device {d['kept_tv']:.1f}, "
              f"sent {d['sent_share_of_tv']:.0%} of it ({d['images']} images)", file=stream)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
