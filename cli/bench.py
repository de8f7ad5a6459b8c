"""`ciar bench methods`: every method on the same held-out prompts and seeds, the cloud-only base measured in the
same run (interleaved per prompt, so machine noise hits every method alike), METHOD.md section 8's table."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ciar.runtime.bundle import DEFAULT_CLOUD_RATE, PREFIX_FRACTION
from ciar.runtime.cli import at_least, fraction

CIAR_PREFIX = PREFIX_FRACTION["interval"]

METHOD_ORDER = ("cloud", "device", "sd", "lantern", "entropy", "maxprob", "latent", "random", "code30", "ciar",
                "ciar-chain", "ciar-inflight", "ciar-lossless")
GATED = {"ciar": "interval", "ciar-chain": "interval", "ciar-inflight": "interval", "entropy": "entropy",
         "maxprob": "maxprob", "latent": "latent"}
# the gates with a tau: the ones the online controller steers and the tau sweep compares
TAU_GATES = ("interval", "entropy", "maxprob", "latent", "random")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    m = sub.add_parser("methods", help="compare every decoding method with the cloud-only base")
    m.add_argument("--prompts", type=at_least(2), default=50,
                   help="held-out prompts (default 50; at least 2: FD and precision/recall compare sets)")
    m.add_argument("--calibration-prompts", type=int, default=20, help="other held-out prompts used to turn "
                   "--cloud-rate into tau for each gate (default 20)")
    m.add_argument("--link", choices=["lan", "wifi", "4g", "all"], default="lan",
                   help="emulated link (default lan). The link is charged analytically (round trips and bytes), so "
                        "'all' reports every link from the same decodes")
    m.add_argument("--cloud-rate", type=float, default=DEFAULT_CLOUD_RATE,
                   help="target cloud-call rate of the gated methods: calibrates each gate's tau to send this share "
                        "of drafts, and with --budget is each image's cloud calls per token (default %(default)s)")
    m.add_argument("--budget", action="store_true",
                   help="hold each image's cloud calls per token (prefix forwards included, as cloud_calls counts "
                        "them) at --cloud-rate for the gated methods (ciar, entropy, maxprob, latent, random) "
                        "with the online controller, starting from the calibrated tau: the gates are then compared at "
                        "matched cloud-call rates")
    m.add_argument("--budget-cap", type=fraction, default=None, metavar="R",
                   help="never spend more than R cloud calls per token on an image instead: tau stays where "
                        "--cloud-rate's calibration puts it until the image has made floor(R x tokens) cloud "
                        "forwards, then nothing more is sent (an image under R is the image of tau fixed). Not with "
                        "--budget")
    m.add_argument("--methods", nargs="*", default=list(METHOD_ORDER), choices=METHOD_ORDER)
    m.add_argument("--same-pipeline", action="store_true",
                   help="run the entropy, maxprob, latent and random gates inside CIAR's pipeline (its prefix "
                        "injection and interval-feature conditioning), so that only the gate differs from ciar "
                        "(METHOD.md's gating ablation); without it they are bare gates")
    m.add_argument("--prefix-fraction", type=fraction, default=None, metavar="F",
                   help="the share of each image the cloud writes first (prefix injection) in the methods that "
                        "inject one: ciar, ciar-chain, ciar-inflight, ciar-lossless, the gates with --same-pipeline "
                        "and every gate of --sweep (default: the shipped bundle's, %s); 0 drops the prefix, so its "
                        "forwards go to verifications instead" % CIAR_PREFIX)
    m.add_argument("--sweep", type=str, default=None, metavar="RATES",
                   help="also sweep tau for every gate at these comma-separated cloud rates (e.g. 0.1,0.2,0.4) "
                        "and plot quality vs cloud_calls")
    m.add_argument("--sweep-prompts", type=at_least(2), default=20,
                   help="prompts per sweep point (default 20, at least 2), and as many again to calibrate tau")
    m.add_argument("--plot", type=Path, default=None, help="PNG for the sweep (default next to --json)")
    m.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also a paired bootstrap over prompts (N resamples): FD and adherence of --reference minus "
                        "every other method's, with 95%% intervals (a difference whose interval straddles 0 is noise)")
    m.add_argument("--reference", default="ciar", choices=METHOD_ORDER,
                   help="the method the bootstrap compares with every other one (default ciar)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=1, help="torch threads (default 1: batch-1 decoding)")
    m.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    m.add_argument("--device-bundle", type=Path, default=None, metavar="DIR",
                   help="run the device side from this exported bundle (`ciar export`; ONNX, or ExecuTorch where "
                        "its runtime is installed), e.g. runtime/bundles/onnx-int8, instead of PyTorch eager: the "
                        "graph, quantization and per-token cost of the on-device runtime. Export it from the same "
                        "weights as --checkpoint")
    m.add_argument("--gate-bundle", type=Path, action="append", default=[], metavar="DIR",
                   help="run the bare entropy, max-prob or latent gate on this bare-gate bundle (`ciar export "
                        "--gate entropy|maxprob|latent`, the same weights and format as --device-bundle): its device "
                        "graph has no Inter-Head, so the bare gate pays a bare device's per-token cost instead of the "
                        "interval graph's. Repeat for each gate; needs --device-bundle (and no --same-pipeline)")
    m.add_argument("--cloud-device", default="cpu", metavar="DEVICE",
                   help="where the cloud model runs: cpu (default), cuda, cuda:N. The device side and the image "
                        "decoder stay on the CPU; every draw still comes from the seeded CPU generator")
    m.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")


def place_cloud(models, device: str, prog: str, option: str = "--cloud-device") -> str:
    """Put the cloud side (cloud GPT and phi) on `device`; returns what ran it, for the JSON (the GPU's name on
    CUDA). A device this machine lacks ends the program with a one-line message."""
    import torch
    try:
        models.cloud_to(device)
    except ValueError as e:
        raise SystemExit(f"{prog}: {option} {e}") from None
    where = torch.device(device)
    return f"{where} ({torch.cuda.get_device_name(where)})" if where.type == "cuda" else "cpu"


def bundle_proposer(models, bundle: Path | None, threads: int, prog: str, option: str = "--device-bundle"):
    """`--device-bundle`: the engine's device side run from an exported bundle, or None (PyTorch eager). A bundle
    that cannot be used ends the program with the bundle's one-line message."""
    if bundle is None:
        return None
    from ciar.engine.proposer import BundleProposer
    from ciar.runtime.bundle import BundleError
    try:
        proposer = BundleProposer(bundle, models.device, models.sampling, threads)
    except BundleError as e:
        raise SystemExit(f"{prog}: {option} {e}") from None
    if option == "--device-bundle" and proposer.bundle.gate != "interval":
        raise SystemExit(f"{prog}: --device-bundle {bundle} is a bare-gate ({proposer.bundle.gate}) bundle, without "
                         "the Inter-Head that ciar and the tau calibration read: pass an interval bundle (`ciar "
                         "export` without --gate) as --device-bundle and this one as --gate-bundle")
    return proposer


def gate_proposers(models, bundles: list[Path], args, prog: str, main=None) -> dict:
    """`--gate-bundle`: the bare gate's name (entropy / maxprob / latent) -> the proposer running its bare-gate
    bundle, beside `main` (the --device-bundle proposer). A bundle that cannot serve a bare gate ends the program
    with a one-line message."""
    if bundles and main is None:
        raise SystemExit(f"{prog}: --gate-bundle compares the bare gates' bundles with an interval bundle's "
                         "device: pass that as --device-bundle")
    if bundles and args.same_pipeline:
        raise SystemExit(f"{prog}: --same-pipeline runs the bare gates on CIAR's interval features, which a "
                         "bare-gate bundle does not have; drop --gate-bundle or --same-pipeline")
    out = {}
    for path in bundles:
        proposer = bundle_proposer(models, path, args.threads, prog, "--gate-bundle")
        gate = proposer.bundle.gate
        if gate == "interval":
            raise SystemExit(f"{prog}: --gate-bundle {path} scores the interval (an Inter-Head bundle); export a "
                             "bare gate's with `ciar export --gate entropy` (or maxprob, latent), or pass this one as "
                             "--device-bundle")
        if gate in out:
            raise SystemExit(f"{prog}: two --gate-bundle bundles for the {gate} gate; pass one")
        kind = f"{proposer.bundle.format} {proposer.bundle.quantize}"
        main_kind = f"{main.bundle.format} {main.bundle.quantize}"
        if kind != main_kind:
            raise SystemExit(f"{prog}: --gate-bundle {path} is {kind}, --device-bundle {main_kind}: export both in one "
                             "format and quantization, so that only the gate's device differs")
        out[gate] = proposer
    return out


def device_label(proposer) -> str:
    """What ran the device side, for the JSON."""
    if proposer is None:
        return "pytorch-eager"
    return f"bundle {proposer.bundle.path} ({proposer.bundle.format}, {proposer.bundle.quantize})"


def calibrate_taus(models, prompts, rate: float, seed: int, link, progress=None, proposer=None,
                   prefix: float | None = None) -> dict[str, float]:
    """Gate kind -> the tau that sends `rate` of the drafts: each prompt decoded once with every draft kept (the
    first `prefix` of it written by the cloud; default CIAR's), every gate's score recorded at every draft, and the
    (1 - rate) quantile taken. `proposer` runs the device side (default: PyTorch eager); the bench scripts reuse
    this calibration."""
    import numpy as np
    import torch

    from ciar.engine import collaborative_generate
    from ciar.engine.gates import calibrate_tau
    from ciar.engine.methods import Method
    from ciar.training.evaluate import encode_prompts

    probe = Method("calibration", gate="never", prefix_fraction=CIAR_PREFIX if prefix is None else prefix)
    codebook = models.codebook()
    scores: dict[str, list] = {k: [] for k in GATED.values()}
    for i, prompt in enumerate(prompts):
        res = collaborative_generate(probe, models.cloud, models.device, encode_prompts(models, [prompt]),
                                     models.sampling, torch.Generator().manual_seed(seed + 10_000 + i), link=link,
                                     proposer=proposer, codebook=codebook)
        for kind in scores:
            v = res.scores[kind].flatten().numpy()
            scores[kind].append(v[~np.isnan(v)])
        if progress:
            progress(1)
    return {kind: calibrate_tau(np.concatenate(v), rate) for kind, v in scores.items()}


def _method_for(name: str, taus: dict[str, float], rate: float, same_pipeline: bool = False,
                prefix: float | None = None):
    """The method `name` at its calibrated tau; with `same_pipeline`, the entropy / maxprob / latent / random gates
    run inside CIAR's pipeline (prefix injection, phi), as the tau sweep runs them. `prefix` replaces the share
    of the image the cloud writes first wherever the method injects CIAR's prefix."""
    from ciar.engine import get_method
    from ciar.models.sampling import BARE_SCORES
    if name in GATED:
        method = get_method(name, tau=taus[GATED[name]])
    elif name == "random":
        method = get_method(name, tau=1.0 - rate)
    else:
        method = get_method(name)
    if same_pipeline and name in (*BARE_SCORES, "random"):
        method = dataclasses.replace(get_method("ciar"), name=name, gate=method.gate, tau=method.tau)
    if prefix is not None and method.prefix_fraction == CIAR_PREFIX:
        method = dataclasses.replace(method, prefix_fraction=prefix)
    return method


def run_methods(models, prompts, methods, link, seed: int, neighbours, progress=None,
                budget_rate: float | None = None, proposer=None, gate_proposers: dict | None = None,
                cap: bool = False) -> dict[str, dict]:
    """Per method: token grids, where each token came from (`GenerationResult.source`) and per-image stats, one
    image at a time, methods interleaved per prompt. With `budget_rate`, every gated method holds each image's
    cloud calls per token there, its prefix forwards included (a fresh `BudgetController` per image, starting from
    the method's tau; with `cap`, `budget_rate` is a ceiling instead: tau stays the method's until the image has
    spent it, then nothing more is sent). `proposer` runs the device side (default: the device model in PyTorch eager);
    `gate_proposers` (gate -> proposer) runs the methods behind that gate instead (the bare-gate bundles)."""
    import torch

    from ciar.engine import collaborative_generate
    from ciar.engine.gates import BudgetController
    from ciar.training.evaluate import encode_prompts

    out = {name: {"tokens": [], "sources": [], "stats": [], "timelines": []} for name in methods}
    codebook = models.codebook()
    for i, prompt in enumerate(prompts):
        cond = encode_prompts(models, [prompt])
        for name, method in methods.items():
            budget = None
            if budget_rate is not None and method.gate in TAU_GATES:
                budget = (BudgetController.capped if cap else BudgetController)(method.tau, budget_rate)
            res = collaborative_generate(method, models.cloud, models.device, cond, models.sampling,
                                         torch.Generator().manual_seed(seed * 1_000_003 + i), phi=models.phi,
                                         link=link, neighbours=neighbours, budget=budget,
                                         caption_bytes=len(prompt.encode()),
                                         proposer=(gate_proposers or {}).get(method.gate, proposer),
                                         codebook=codebook)
            out[name]["tokens"].append(res.tokens)
            out[name]["sources"].append(res.source)
            out[name]["stats"].append(res.stats)
            out[name]["timelines"].append(res.timeline)
        if progress:
            progress(1)
    return out


def relink(runs: dict[str, dict], link) -> dict[str, dict]:
    """The same decodes timed on another link: each session's timeline (measured compute, counted round trips and
    bytes) is replayed with the link's round trip and bandwidth."""
    out = {}
    for name, r in runs.items():
        stats = []
        for st, timeline in zip(r["stats"], r["timelines"]):
            seconds = timeline.seconds(link)
            stats.append({**st, "link_seconds": timeline.link_seconds(link), "seconds": seconds,
                          "waiting_seconds": seconds - st["device_seconds"]})
        out[name] = {"tokens": r["tokens"], "stats": stats, "timelines": r["timelines"]}
    return out


def quality_rows(runs: dict[str, dict], models, prompts, samples: dict | None = None) -> dict[str, dict]:
    """Adherence, FD and precision / recall / F1 of each method's images (independent of the link). With
    `samples`, each method's per-prompt `QualitySample` is put there (for the paired bootstrap)."""
    import torch

    from ciar.training.evaluate import decode_tokens, quality_and_sample
    from ciar.training.features import load_feature_net

    net = load_feature_net(models.directory)
    rows = {}
    for name, r in runs.items():
        q, sample = quality_and_sample(decode_tokens(models, torch.cat(r["tokens"])), prompts, name, net)
        rows[name] = {"adherence": q.adherence, "fd": q.fd, "fd_floor": q.fd_floor, "precision": q.precision,
                      "recall": q.recall, "f1": q.f1}
        if samples is not None:
            samples[name] = sample
    return rows


def timing_rows(runs: dict[str, dict], base: str = "cloud") -> dict[str, dict]:
    """Means per image (and the cloud calls' 90th percentile and maximum over images); speed-up and cloud compute
    relative to the cloud-only base of the same run."""
    import numpy as np

    def mean(name, key):
        return float(np.mean([s[key] for s in runs[name]["stats"]]))

    rows = {}
    for name in runs:
        row = {k: mean(name, k) for k in ("cloud_calls", "bytes_up", "bytes_down", "tokens_per_cloud_forward",
                                          "local", "sent", "seconds", "device_seconds", "cloud_seconds",
                                          "link_seconds", "waiting_seconds", "cloud_forwards", "requests",
                                          "stale_requests", "drafts", "rewinds", "voided", "kept_ahead")}
        calls = [s["cloud_calls"] for s in runs[name]["stats"]]
        row["cloud_calls_p90"], row["cloud_calls_max"] = float(np.percentile(calls, 90)), float(np.max(calls))
        if base in runs:
            row["speedup"] = mean(base, "seconds") / row["seconds"]
            row["cloud_seconds_ratio"] = row["cloud_seconds"] / mean(base, "cloud_seconds")
        rows[name] = row
    return rows


def _print_table(table: dict[str, dict], link: str, stream) -> None:
    cols = ("adherence", "fd", "f1", "speedup", "cloud_calls", "bytes_up", "bytes_down", "tokens_per_cloud_forward",
            "cloud_seconds_ratio")
    print(f"link={link}", file=stream)
    print(f"{'method':<14}" + "".join(f"{c[:12]:>13}" for c in cols), file=stream)
    for name, row in table.items():
        cells = "".join(f"{row.get(c, float('nan')):>13.4g}" for c in cols)
        print(f"{name:<14}{cells}", file=stream)


def print_bootstrap(boot: dict, stream) -> None:
    """The paired bootstrap's lines: --reference minus every other method, FD and adherence with 95% intervals."""
    print(f"paired bootstrap over prompts ({boot['resamples']} resamples): {boot['reference']} minus", file=stream)
    for name, d in boot["minus"].items():
        fd, adh = d["fd"], d["adherence"]
        print(f"  {name:<14} FD {fd['mean']:+.2f} [{fd['ci95'][0]:+.2f}, {fd['ci95'][1]:+.2f}]   adherence "
              f"{adh['mean']:+.4f} [{adh['ci95'][0]:+.4f}, {adh['ci95'][1]:+.4f}]", file=stream)


def _sweep(models, prompts, rates, seed, link, neighbours, progress=None, proposer=None,
           prefix: float | None = None) -> dict[str, list]:
    """Every gate at every rate on the first half of `prompts`, tau calibrated on the second half; `progress` is
    called once per decoded image (len(rates) * (1 + len(TAU_GATES)) * len(prompts) // 2 in all). `prefix`
    replaces CIAR's prefix share, for every gate alike."""
    calib = {r: calibrate_taus(models, prompts[len(prompts) // 2:], r, seed, link, progress, proposer, prefix)
             for r in rates}
    eval_prompts = prompts[: len(prompts) // 2]
    points: dict[str, list] = {}
    for gate in TAU_GATES:
        for r in rates:
            # every gate gets CIAR's prefix injection and conditioning (--same-pipeline), so only the gate differs
            method = _method_for("ciar" if gate == "interval" else gate, calib[r], r, same_pipeline=True,
                                 prefix=prefix)
            method = dataclasses.replace(method, name=f"{gate}@{r}")
            runs = run_methods(models, eval_prompts, {method.name: method}, link, seed, neighbours, progress,
                               proposer=proposer)
            row = {**timing_rows(runs, base="none")[method.name],
                   **quality_rows(runs, models, eval_prompts)[method.name]}
            points.setdefault(gate, []).append({"rate": r, "cloud_calls": row["cloud_calls"], "fd": row["fd"],
                                                "adherence": row["adherence"],
                                                "prefix_fraction": method.prefix_fraction})
    return points


def _plot(points: dict[str, list], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for gate, pts in points.items():
        x = [p["cloud_calls"] for p in pts]
        ax[0].plot(x, [p["fd"] for p in pts], "o-", label=gate)
        ax[1].plot(x, [p["adherence"] for p in pts], "o-", label=gate)
    ax[0].set(xlabel="cloud_calls (forwards per token)", ylabel="FD (lower is better)")
    ax[1].set(xlabel="cloud_calls (forwards per token)", ylabel="adherence")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ciar.engine import LINKS
    from ciar.models.builtin import load_builtin
    from ciar.models.sampling import BARE_SCORES
    from ciar.training.scenes import heldout_prompts

    if args.bootstrap and args.reference not in args.methods:
        raise SystemExit(f"ciar bench methods: --bootstrap compares --reference {args.reference} with the other "
                         "methods; add it to --methods")
    if args.budget and args.budget_cap is not None:
        raise SystemExit("ciar bench methods: --budget holds each image at --cloud-rate, --budget-cap caps it at R; "
                         "pass one of them")
    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    cloud_device = place_cloud(models, args.cloud_device, "ciar bench methods")
    proposer = bundle_proposer(models, args.device_bundle, args.threads, "ciar bench methods")
    bare = gate_proposers(models, args.gate_bundle, args, "ciar bench methods", proposer)
    charged = [g for g in BARE_SCORES if g in args.methods and g not in bare and not args.same_pipeline]
    if proposer is not None and charged:
        print(f"ciar bench methods: note: {' and '.join(charged)} run on the interval bundle's device graph and pay "
              "its Inter-Head; for a bare gate's own (cheaper) device pass --gate-bundle DIR from `ciar export "
              "--gate <gate>` (docs/BENCHMARKS.md section 3g)", file=sys.stderr)
    link = LINKS["lan" if args.link == "all" else args.link]
    pool = heldout_prompts(max(1000, args.prompts + args.calibration_prompts + 2 * args.sweep_prompts))
    prompts = pool[: args.prompts]
    calibration = pool[args.prompts: args.prompts + args.calibration_prompts]
    t0 = time.perf_counter()
    taus = calibrate_taus(models, calibration, args.cloud_rate, args.seed, link, proposer=proposer,
                          prefix=args.prefix_fraction)
    neighbours = models.vq.codebook_neighbours(min(1000, models.vq.config.codebook_size - 1))
    methods = {name: _method_for(name, taus, args.cloud_rate, args.same_pipeline, args.prefix_fraction)
               for name in args.methods}
    with tqdm(total=len(prompts), desc=f"methods ({args.link})", file=sys.stderr) as bar:
        runs = run_methods(models, prompts, methods, link, args.seed, neighbours, bar.update,
                           budget_rate=args.cloud_rate if args.budget else args.budget_cap, proposer=proposer,
                           gate_proposers=bare, cap=args.budget_cap is not None)
    links = list(LINKS) if args.link == "all" else [args.link]
    samples: dict = {}
    quality = quality_rows(runs, models, prompts, samples)
    tables = {name: {m: {**row, **quality[m]} for m, row in timing_rows(relink(runs, LINKS[name])).items()}
              for name in links}
    table = tables[links[0]]
    result = {"link": args.link, "prompts": len(prompts), "seed": args.seed, "cloud_rate_target": args.cloud_rate,
              "budget": args.budget, "budget_cap": args.budget_cap, "same_pipeline": args.same_pipeline,
              "prefix_fraction": {m: methods[m].prefix_fraction for m in methods}, "taus": taus,
              "threads": args.threads, "device": device_label(proposer),
              "gate_devices": {g: device_label(p) for g, p in bare.items()}, "cloud_device": cloud_device,
              "methods": table}
    if len(links) > 1:
        result["links"] = tables
    if args.bootstrap:
        from ciar.training.evaluate import paired_quality_bootstrap
        result["bootstrap"] = paired_quality_bootstrap(samples, args.reference, args.bootstrap, args.seed)
    if args.sweep:
        rates = [float(r) for r in args.sweep.split(",")]
        sweep_prompts = pool[args.prompts + args.calibration_prompts:][: 2 * args.sweep_prompts]
        images = len(rates) * (1 + len(TAU_GATES)) * (len(sweep_prompts) // 2)
        with tqdm(total=images, desc="tau sweep", file=sys.stderr) as bar:
            result["sweep"] = _sweep(models, sweep_prompts, rates, args.seed, link, neighbours, bar.update, proposer,
                                     args.prefix_fraction)
        plot = args.plot or (Path(args.json).with_suffix(".png") if args.json not in (None, "-") else
                             Path("sweep.png"))
        _plot(result["sweep"], plot)
        result["plot"] = str(plot)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    stream = sys.stderr if args.json == "-" else sys.stdout
    for name in links:
        _print_table(tables[name], name, stream)
    if args.bootstrap:
        print_bootstrap(result["bootstrap"], stream)
    write_result(result, args.json)
    return 0


def write_result(result: dict, dest: str | None) -> None:
    """`--json` convention of the benchmarks: '-' prints the JSON on stdout, a path writes it there."""
    if dest == "-":
        print(json.dumps(result))
    elif dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(json.dumps(result, indent=1))
