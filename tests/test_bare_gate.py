"""Bare-gate bundles (`ciar export --gate entropy|maxprob|latent`): the device graph without the Inter-Head, for
the entropy, max-prob and latent-spread gates. Parity with PyTorch, the one score formula, the engine, the runtime through a real
bridge, and what is refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import randomise, tau_between_scores
from ciar.cloud_bridge.client import BridgeClient, ClientConfig
from ciar.cloud_bridge.cloud import CloudService
from ciar.cloud_bridge.direct import DirectVerifier
from ciar.cloud_bridge.server import ServerConfig, ServerThread
from ciar.export.bundle import ExportError, export_bundle
from ciar.export.graph import DeviceGraph
from ciar.export.verify import verify_bundle
from ciar.models.builtin import load_builtin
from ciar.models.sampling import bare_score
from ciar.runtime.backend import make_backend
from ciar.runtime.bundle import BundleError, load_bundle
from ciar.runtime.generator import NO_NEIGHBOUR, DeviceGenerator, neighbour_ids

PROMPT = "a small green triangle at the bottom right and a large yellow circle at the top, on a black background"
BARE = ("entropy", "maxprob", "latent")


@pytest.fixture(scope="module")
def models(smoke_weights):
    """Smoke weights with the device randomised: the smoke run leaves its distributions nearly flat, where every
    score is nearly constant and a wrong one would pass."""
    models = load_builtin(smoke_weights)
    randomise(models.device, seed=3, std=0.3)
    return models


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    return {g: export_bundle(models, "onnx", "none", root / g, gate=g, log=lambda s: None)
            for g in ("interval", *BARE)}


def _steps(bundle_dir, tokens: np.ndarray, temperature: float):
    """The backend's outputs for the caption prefix, then `tokens` one at a time: (centre, u, features) per step."""
    b = load_bundle(bundle_dir)
    backend, m = make_backend(b, temperature=temperature), b.manifest["model"]
    emb = np.load(b.file("token_embeddings"))
    prefix = np.zeros((2, m["cls_token_num"], m["dim"]), np.float32)
    prefix[:, :, :4] = 0.5  # any fixed prefix: both graphs see the same one
    out = []
    s = backend.step(prefix, 0, np.full((m["cls_token_num"], 2), NO_NEIGHBOUR, np.int64))
    for t, tok in enumerate(tokens):
        out.append((s.centre[-1].copy(), float(s.u[-1]), s.features[-1].copy()))
        e = emb[[tok]]
        s = backend.step(np.stack([e, e]), m["cls_token_num"] + t, neighbour_ids(tokens, t + 1, 1, m["grid"]))
    return out


@pytest.mark.parametrize("gate", BARE)
def test_a_bare_gate_bundle_matches_pytorch_and_scores_with_the_engines_formula(bundles, models, gate):
    r = verify_bundle(bundles[gate], models, PROMPT, seed=1)
    assert r.steps == 256 and r.ok, r.checks
    assert r.max_abs_diff <= 1e-4 and r.u_max_abs_diff <= 1e-4 and r.argmax_agreement == 1.0
    b = load_bundle(bundles[gate])
    assert b.gate == gate and b.manifest["model"]["feature_dim"] == 0 and b.manifest["gate"]["prefix_fraction"] == 0
    import onnx
    names = {i.name for i in onnx.load(str(b.file("device"))).graph.input}
    assert "neighbours" not in names  # no Inter-Head, no neighbour scale
    size = {g: load_bundle(bundles[g]).manifest["files"]["device"]["bytes"] for g in (gate, "interval")}
    assert size[gate] < size["interval"]

    tokens = np.random.default_rng(0).integers(0, models.device.config.vocab_size, 24)
    bare, full = _steps(bundles[gate], tokens, 1.0), _steps(bundles["interval"], tokens, 1.0)
    scores = [u for _, u, _ in bare]
    # the scores move (a wrong formula cannot pass as a constant); the latent spread of these flat distributions
    # over the smoke VQ's scattered codes sits near its ceiling of 2
    assert max(scores) - min(scores) > (0.01 if gate == "latent" else 0.03), scores
    for (c, u, f), (c_full, u_full, _) in zip(bare, full):
        np.testing.assert_allclose(c, c_full, atol=1e-5)  # the same backbone and output head: the same centre
        assert f.shape == (0,)
        want = float(bare_score(gate, torch.softmax(torch.from_numpy(c).double(), -1), models.codebook().double()))
        assert u == pytest.approx(want, rel=1e-5, abs=1e-6)  # the engine's gate formula on the graph's centre
        assert u != pytest.approx(u_full, rel=1e-3)  # and not the interval's U


@pytest.mark.parametrize("gate", ["entropy", "latent"])
def test_the_engine_runs_the_bare_gates_on_a_bare_bundle_as_on_eager(bundles, models, gate):
    """A bare gate on its bare bundle makes eager's tokens and sends eager's drafts; the interval gate (and the
    phi conditioning) refuse a device without an Inter-Head."""
    from ciar.engine import collaborative_generate, get_method
    from ciar.engine.proposer import BundleProposer

    m = models
    cond = m.encode_prompts([PROMPT])
    bare = BundleProposer(bundles[gate], m.device, m.sampling)
    assert bare.feature_dim == 0

    def run(name, proposer, tau):
        return collaborative_generate(get_method(name, tau=tau), m.cloud, m.device, cond, m.sampling,
                                      torch.Generator().manual_seed(0), phi=m.phi, proposer=proposer,
                                      codebook=m.codebook())

    probe = run(gate, bare, float("inf"))
    assert probe.u.isnan().all()  # no interval recorded for a device that has none
    tau = tau_between_scores(probe.scores[gate])
    a, b = run(gate, None, tau), run(gate, bare, tau)
    assert 0 < b.stats["sent"] < 256 and b.stats["cloud"] > b.stats["sent"] - 1
    assert torch.equal(a.sent, b.sent) and torch.equal(a.tokens, b.tokens)
    for name in ("ciar", "ciar-inflight"):
        with pytest.raises(ValueError, match="bare-gate bundle"):
            run(name, bare, 0.1)


def test_the_runtime_runs_a_bare_bundle_through_a_real_bridge(bundles, models):
    """No prefix, no features: the session opens without interval features, the Verifies carry none, and the
    image through the websocket server is the in-process one."""
    b = load_bundle(bundles["maxprob"])
    device = DeviceGenerator(b, make_backend(b))
    probe = device.generate(PROMPT, 1, np.inf, decode_image=False)
    tau = float(np.quantile(probe.u[np.isfinite(probe.u)], 0.7))
    reference = device.generate(PROMPT, 5, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)))
    service = CloudService(models, max_sessions=4)
    st = ServerThread(service, ServerConfig(port=0, tokens=frozenset({"alice"}), idle_timeout_s=30))
    url = st.start()
    try:
        client = BridgeClient(ClientConfig(url, token="alice"))
        through = device.generate(PROMPT, 5, tau, verifier=client)
    finally:
        st.stop()
    assert reference.stats["prefix"] == 0 and reference.stats["sent"] >= 10 and through.stats["unverified"] == 0
    np.testing.assert_array_equal(through.tokens, reference.tokens)
    np.testing.assert_array_equal(through.source, reference.source)
    assert client.stats.verified == through.stats["sent"]
    alone = device.generate(PROMPT, 5, np.inf, decode_image=False)
    assert (alone.tokens != reference.tokens).any()  # the cloud changed the image: the equality is not vacuous


def test_the_gate_kinds_are_one_list():
    from ciar.export.graph import GATES
    from ciar.models.sampling import BARE_SCORES
    from ciar.runtime.bundle import GATE_KINDS
    assert GATES == GATE_KINDS == ("interval", *BARE_SCORES)


def test_what_a_bare_gate_export_refuses(models, bundles, tmp_path):
    with pytest.raises(ExportError, match="unknown gate"):
        export_bundle(models, "onnx", "none", tmp_path / "x", gate="variance", log=lambda s: None)
    with pytest.raises(ExportError, match="onnx or executorch"):
        export_bundle(models, "coreml", "none", tmp_path / "y", gate="entropy", log=lambda s: None)
    with pytest.raises(ValueError, match="unknown gate"):
        DeviceGraph(models.device, gate="variance")
    with pytest.raises(ValueError, match="codebook"):
        DeviceGraph(models.device, gate="latent")
    bad = shutil.copytree(bundles["entropy"], tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["gate"]["kind"] = "variance"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown gate kind 'variance'"):
        load_bundle(bad)
    old = shutil.copytree(bundles["interval"], tmp_path / "old")  # written before the field: an interval bundle
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["gate"]["kind"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(old).gate == "interval"


def test_bare_and_interval_graphs_share_the_backbone_weights(models):
    """The bare graph is the interval graph's backbone: with the Inter-Head's radius doubled, the bare outputs do
    not move and the interval ones do."""
    inputs = (torch.randn(2, 3, models.device.config.dim), torch.arange(10, 13), torch.tensor([[-1, -1], [4, -1],
              [5, -1]]))
    results = {}
    for gate in ("interval", "maxprob"):
        g = DeviceGraph(models.device, gate=gate)
        k = torch.zeros(g.cache_shape())
        before = g(*inputs, k, k.clone(), torch.tensor([3.0]), torch.tensor([1.0]))
        with torch.no_grad():
            for p in g.device.inter_head.parameters():
                p.mul_(2.0)
        after = g(*inputs, k, k.clone(), torch.tensor([3.0]), torch.tensor([1.0]))
        results[gate] = torch.equal(before[1], after[1])
    assert results == {"interval": False, "maxprob": True}
