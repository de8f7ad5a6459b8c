"""`ciar export verify`: run a bundle against PyTorch on fixed inputs over a full 256-token decode.

Both backends are fed the same tokens (the PyTorch reference's own draws from a seeded numpy generator), so
every step compares like with like: max abs diff of the processed centre logits and of U, argmax agreement, and
agreement of the gate decision U >= tau (tau: the bundle's, or the quantile that sends the bundle's target share
of drafts). Core ML cannot run on Linux: `coreml_checks` inspects the package instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ciar.models.builtin import BuiltinModels
from ciar.runtime.backend import Step, make_backend
from ciar.runtime.bundle import SHARED_FILES, Bundle, gate_cloud_rate, load_bundle
from ciar.runtime.generator import NO_NEIGHBOUR, neighbour_ids
from ciar.runtime.sampling import draw_table, processed_probs, sample

from .graph import DeviceGraph


class TorchBackend:
    """The PyTorch reference with the runtime's backend interface (the same DeviceGraph that was exported)."""

    def __init__(self, graph: DeviceGraph, cfg_scale: float, temperature: float) -> None:
        self.graph, self.shape = graph.eval(), graph.cache_shape()
        self.scalars = (torch.tensor([cfg_scale]), torch.tensor([temperature or 1.0]))
        self.decode_inputs = (np.zeros((2, 1, graph.device.config.dim), np.float32), np.zeros((1, 2), np.int64))
        self.last_run_s = 0.0
        self.reset()

    def reset(self) -> None:
        self.k, self.v = torch.zeros(self.shape), torch.zeros(self.shape)

    @torch.inference_mode()
    def step(self, embeds: np.ndarray, start: int, neighbours: np.ndarray) -> Step:
        pos = torch.arange(start, start + embeds.shape[1])
        t0 = time.perf_counter()
        c, u, f, k, v = self.graph(torch.from_numpy(np.asarray(embeds, np.float32)), pos,
                                   torch.from_numpy(np.asarray(neighbours, np.int64)), self.k, self.v, *self.scalars)
        self.last_run_s = time.perf_counter() - t0
        self.k[:, :, :, pos], self.v[:, :, :, pos] = k, v  # the step's new rows, as the runtime's backends write them
        return Step(c[0].numpy(), u[0].numpy(), f[0].numpy())


@dataclass
class VerifyReport:
    format: str
    quantize: str
    max_abs_diff: float | None
    u_max_abs_diff: float | None
    argmax_agreement: float | None
    gate_agreement: float | None
    tau: float | None
    steps: int
    checks: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["pass"] for c in self.checks)


def _onnx_checks(bundle: Bundle) -> list[dict]:
    import onnx
    out = []
    for role in ("device", *SHARED_FILES):
        path = bundle.file(role)
        if path.suffix != ".onnx":
            continue
        try:
            onnx.checker.check_model(str(path), full_check=True)
            out.append({"name": f"onnx.checker {path.name}", "pass": True})
        except Exception as e:  # onnx raises ValidationError and friends
            out.append({"name": f"onnx.checker {path.name}", "pass": False, "detail": str(e)[:300]})
    return out


def verify_bundle(path: Path, models: BuiltinModels, prompt: str, seed: int = 0, threads: int = 1) -> VerifyReport:
    from ciar.runtime.generator import CaptionEncoder

    bundle = load_bundle(path)
    checks = [{"name": "manifest, files and SHA-256", "pass": True}]
    if bundle.format == "coreml":
        from .coreml_checks import coreml_checks
        return VerifyReport("coreml", bundle.quantize, None, None, None, None, None, 0,
                            checks + coreml_checks(bundle))
    checks += _onnx_checks(bundle)
    m = bundle.manifest
    s = m["sampling"]
    ref = TorchBackend(DeviceGraph(models.device, m["model"].get("feature_top", 8), bundle.gate, models.codebook()),
                       s["cfg_scale"], s["temperature"])
    art = make_backend(bundle, threads)
    emb = np.load(bundle.file("token_embeddings"))
    prefix = CaptionEncoder(bundle, threads)(prompt)
    P, T = m["model"]["cls_token_num"], m["model"]["block_size"]
    rng = np.random.default_rng(seed)
    diffs, u_diffs, agree, u_ref, u_art, table_diffs = [], [], [], [], [], []
    G, tokens = m["model"]["grid"], np.zeros(T, np.int64)
    none = np.full((P, 2), NO_NEIGHBOUR, np.int64)
    a, b = ref.step(prefix, 0, none), art.step(prefix, 0, none)
    for t in range(T):
        ca, cb = a.centre[-1], b.centre[-1]
        diffs.append(float(np.abs(ca - cb).max()))
        u_diffs.append(float(abs(a.u[-1] - b.u[-1])))
        agree.append(int(ca.argmax()) == int(cb.argmax()))
        u_ref.append(float(a.u[-1]))
        u_art.append(float(b.u[-1]))
        if b.cdf is not None:  # the graph's draw table against the runtime's formula on its own centre
            table = draw_table(cb)
            table_diffs.append(float(np.abs(b.cdf[-1] / b.cdf[-1][-1] - table / table[-1]).max()))
        tok = tokens[t] = sample(processed_probs(ca, s["top_k"], s["top_p"], False), rng)
        if t + 1 < T:
            e, nb = np.stack([emb[[tok]], emb[[tok]]]), neighbour_ids(tokens, t + 1, 1, G)
            a, b = ref.step(e, P + t, nb), art.step(e, P + t, nb)
    u_ref_a, u_art_a = np.array(u_ref), np.array(u_art)
    tau = m["gate"].get("tau")
    if tau is None:
        tau = float(np.quantile(u_ref_a, 1 - gate_cloud_rate(m)))
    gate = float(((u_ref_a >= tau) == (u_art_a >= tau)).mean())
    checks.append({"name": "all outputs finite", "pass": bool(np.isfinite(u_art_a).all())})
    if table_diffs:
        checks.append({"name": "draw table (cdf) is draw_table(centre)", "pass": max(table_diffs) <= 1e-9,
                       "detail": f"largest difference of the normalised tables {max(table_diffs):.1e}"})
    return VerifyReport(bundle.format, bundle.quantize, max(diffs), max(u_diffs), float(np.mean(agree)), gate,
                        tau, T, checks)
