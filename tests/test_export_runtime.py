"""Export to ONNX and run it with the torch-free runtime: parity with PyTorch, bad bundles, the CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_proposer_matches_eager, randomise, tau_between_scores
from ciar.export.bundle import ExportError, export_bundle
from ciar.export.graph import DeviceGraph
from ciar.export.verify import TorchBackend, verify_bundle
from ciar.models import interfuse
from ciar.models.builtin import load_builtin
from ciar.models.sampling import draw_table as torch_draw_table
from ciar.models.sampling import filter_logits as torch_filter
from ciar.runtime.backend import make_backend
from ciar.runtime.bundle import BundleError, load_bundle
from ciar.runtime.generator import DeviceGenerator
from ciar.runtime.sampling import Sampler, draw_at, draw_table, processed_probs, sample
from ciar.runtime.sampling import filter_logits as numpy_filter

PROMPT = "a small green triangle at the bottom right and a large yellow circle at the top, on a black background"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def smoke_models(smoke_weights):
    """The smoke run's gate stage leaves the Inter-Head's neighbour scale at the identity (too few steps to train
    it): randomise it, so that the exported graphs' `neighbours` input changes U and a mis-wired one fails."""
    models = load_builtin(smoke_weights)
    randomise(models.device.inter_head.neighbour, seed=5, std=0.1)
    return models


@pytest.fixture(scope="module")
def bundles(smoke_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {q: export_bundle(smoke_models, "onnx", q, root / q, log=lambda s: None) for q in ("none", "int8", "int4")}


def test_fp32_bundle_matches_pytorch_over_a_full_decode(bundles, smoke_models):
    r = verify_bundle(bundles["none"], smoke_models, PROMPT, seed=1)
    assert r.steps == 256 and r.ok, r.checks
    assert r.max_abs_diff <= 1e-4 and r.u_max_abs_diff <= 1e-4
    assert r.argmax_agreement == 1.0 and r.gate_agreement == 1.0
    assert any(c["name"] == "onnx.checker device.onnx" and c["pass"] for c in r.checks)
    assert any(c["name"].startswith("draw table") and c["pass"] for c in r.checks)


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_quantized_bundles_run_and_are_smaller(bundles, smoke_models, q):
    r = verify_bundle(bundles[q], smoke_models, PROMPT, seed=1)
    assert r.ok and np.isfinite(r.max_abs_diff)
    size = load_bundle(bundles[q]).manifest["files"]["device"]["bytes"]
    assert size < 0.4 * load_bundle(bundles["none"]).manifest["files"]["device"]["bytes"]


def test_runtime_reproduces_the_pytorch_reference_decode(bundles, smoke_models):
    """Local-only decode, same seed: the onnxruntime backend and the PyTorch graph draw the same tokens."""
    b = load_bundle(bundles["none"])
    s = b.manifest["sampling"]
    onnx_gen = DeviceGenerator(b, make_backend(b))
    torch_gen = DeviceGenerator(b, TorchBackend(DeviceGraph(smoke_models.device), s["cfg_scale"], s["temperature"]))
    a = onnx_gen.generate(PROMPT, seed=7, tau=float("inf"), decode_image=False)
    r = torch_gen.generate(PROMPT, seed=7, tau=float("inf"), decode_image=False)
    assert np.array_equal(a.tokens, r.tokens)
    again = onnx_gen.generate(PROMPT, seed=7, tau=float("inf"), decode_image=False)
    assert np.array_equal(a.tokens, again.tokens)



@pytest.mark.parametrize("q", ["none", "int8"])
def test_the_decode_step_runs_the_graph_with_its_length_fixed_and_computes_the_same(bundles, q):
    """One-token steps run a second session of the same graph with its length fixed to 1 (onnxruntime folds the
    shape arithmetic away); on the same inputs it returns what the any-length session returns, and the backend
    writes the step's new cache rows at its position and nowhere else."""
    b = load_bundle(bundles[q])
    m = b.manifest["model"]
    P = m["cls_token_num"]
    backend = make_backend(b)
    assert backend.decode_session is not backend.session
    assert [i.shape for i in backend.decode_session.get_inputs() if i.name == "embeds"] == [[2, 1, m["dim"]]]
    rng = np.random.default_rng(0)
    backend.reset()
    backend.step(rng.standard_normal((2, P, m["dim"])).astype(np.float32), 0, np.full((P, 2), -1))
    k0, v0 = backend._k.copy(), backend._v.copy()
    assert np.abs(k0[:, :, :, :P]).sum() > 0 and not k0[:, :, :, P:].any()  # the prefill wrote its P rows
    e, nb = rng.standard_normal((2, 1, m["dim"])).astype(np.float32), np.array([[3, 5]])
    got = backend.step(e, P, nb)
    want = backend.session.run(None, {"embeds": e, "input_pos": np.array([P]), "neighbours": nb, "k_cache": k0,
                                      "v_cache": v0, **backend.scalars})
    for name, a, w in (("centre", got.centre, want[0][0]), ("u", got.u, want[1][0]),
                       ("features", got.features, want[2][0]), ("k row", backend._k[:, :, :, P:P + 1], want[3]),
                       ("v row", backend._v[:, :, :, P:P + 1], want[4]), ("cdf", got.cdf, want[5][0])):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got.cdf[0], draw_table(got.centre[0]), rtol=1e-9)  # the table of its own centre
    for new, old in ((backend._k, k0), (backend._v, v0)):  # every other row as it was
        assert np.array_equal(np.delete(new, P, axis=3), np.delete(old, P, axis=3))
    with pytest.raises(ValueError, match="outside the cache"):
        backend.step(e, m["block_size"] + P, nb)


def test_the_neighbours_input_reaches_u_and_the_runtime_gives_the_torch_u(bundles, smoke_models):
    """The exported graph's `neighbours` input changes U (and nothing else), and the runtime's decode gives, at
    every position, the U of one teacher-forced PyTorch pass with `neighbour_ids` of the tokens it drew."""
    from ciar.models.interval import neighbour_ids
    b = load_bundle(bundles["none"])
    m, backend = b.manifest, make_backend(b)
    gen = DeviceGenerator(b, backend)
    emb, P = gen.embeddings, m["model"]["cls_token_num"]
    prefix = gen.caption(PROMPT)
    steps = {}
    for nb in ([[5, 9]], [[-1, -1]]):
        backend.reset()
        backend.step(prefix, 0, np.full((P, 2), -1))
        step = backend.step(np.stack([emb[[5]]] * 2), P, np.array(nb))  # views of bound buffers: copy
        steps[str(nb)] = (step.centre.copy(), float(step.u[0]))
    (ca, ua), (cc, uc) = steps.values()
    assert np.array_equal(ca, cc) and abs(ua - uc) > 1e-3 * abs(uc), (ua, uc)
    r = gen.generate(PROMPT, seed=3, tau=float("inf"), decode_image=False)
    d = smoke_models.device
    s = smoke_models.sampling
    tokens = torch.from_numpy(r.tokens)[None]
    cond = smoke_models.encode_prompts([PROMPT])
    with torch.no_grad():
        out = d.forward_interval(cond=d.cfg_condition(cond), tokens=tokens[:, :-1].repeat(2, 1))
        want = interfuse(*d.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:],
                                          neighbour_ids(tokens, d.config.grid_size), s.cfg_scale, s.temperature)).u
    np.testing.assert_allclose(r.u, want[0].numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chain,lookahead", [(1, 0), (4, 0), (1, 4), (3, 6)])
def test_a_collaborative_decode_keeps_the_cache_teacher_forced_through_rewinds(bundles, smoke_models, chain,
                                                                              lookahead):
    """Through a cloud (DirectVerifier: the bridge's service, no socket), with chains of uncertain drafts whose
    rejected tails the device rewinds, and with drafts made past a verification in flight that its verdict voids:
    every U on record is the U of one teacher-forced pass over the final tokens (a stale KV cache entry, a wrong
    rewind position or wrong neighbours would show), and the chains follow the uncertain runs."""
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.direct import DirectVerifier
    from ciar.models.interval import neighbour_ids
    from ciar.runtime.generator import CLOUD, VERIFIED
    b = load_bundle(bundles["none"])
    gen = DeviceGenerator(b, make_backend(b))
    probe = gen.generate(PROMPT, seed=1, tau=float("inf"), prefix_fraction=0.0, decode_image=False)
    tau = float(np.quantile(probe.u[np.isfinite(probe.u)], 0.6))
    verifier, verdicts = DirectVerifier(CloudService(smoke_models, max_sessions=1)), []
    submit = verifier.submit

    def recording(start, tokens, features, k):
        v = submit(start, tokens, features, k)
        verdicts.append((len(k), v.n_accepted))
        return v

    verifier.submit = recording
    r = gen.generate(PROMPT, seed=3, tau=tau, verifier=verifier, chain=chain, lookahead=lookahead,
                     decode_image=False)
    assert r.stats["unverified"] == 0 and (r.source == CLOUD).any() and (r.source == VERIFIED).any()
    assert len(verdicts) == verifier.seq and max(k for k, _ in verdicts) == chain
    if chain > 1:  # chains of several drafts, and rejections that voided the drafts after them
        assert len(verdicts) < r.stats["sent"] and any(a < k - 1 for k, a in verdicts)
    if lookahead:  # drafts made ahead that a verdict voided (this untrained cloud rarely picks the device's guess)
        assert r.stats["voided"] > 0
    d, s, P = smoke_models.device, smoke_models.sampling, b.manifest["model"]["cls_token_num"]
    tokens = torch.from_numpy(r.tokens)[None]
    with torch.no_grad():
        out = d.forward_interval(cond=d.cfg_condition(smoke_models.encode_prompts([PROMPT])),
                                 tokens=tokens[:, :-1].repeat(2, 1))
        want = interfuse(*d.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:],
                                          neighbour_ids(tokens, d.config.grid_size), s.cfg_scale, s.temperature)).u
    drafted = np.isfinite(r.u)
    assert drafted.sum() > 150
    np.testing.assert_allclose(r.u[drafted], want[0].numpy()[drafted], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def builtin_fp32(tmp_path_factory):
    """The shipped built-in models as an fp32 bundle: the graph computes a cache entry the same whichever tokens
    share its call (int8 graphs quantize activations with one scale per call, so there they differ slightly)."""
    models = load_builtin(None)
    return models, export_bundle(models, "onnx", "none", tmp_path_factory.mktemp("fp32") / "b", log=lambda s: None)


@pytest.mark.parametrize("chain,greedy,rate", [(1, False, None), (3, False, None), (1, True, None), (1, False, 0.3),
                                               (3, False, 0.3)])
def test_drafting_past_a_verification_in_flight_gives_the_waiting_loops_image(builtin_fp32, chain, greedy, rate):
    """Lookahead changes when the device reads a verdict, never the image: with the built-in models (whose cloud
    often keeps the device's draft and picks its guess), every lookahead gives the waiting loop's tokens, sources,
    U and uncertainty map, while drafts made ahead really stood and really were voided and drafted again. With a
    cloud-call budget too: a verdict that voids drafts made ahead puts tau back where the waiting loop has it."""
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.direct import DirectVerifier
    from ciar.runtime.budget import BudgetController
    models, path = builtin_fp32
    b = load_bundle(path)
    gen = DeviceGenerator(b, make_backend(b))
    probe = gen.generate(PROMPT, seed=1, tau=float("inf"), prefix_fraction=0.0, decode_image=False)
    tau = float(np.quantile(probe.u[np.isfinite(probe.u)], 0.7))
    service = CloudService(models, max_sessions=1)
    runs = {la: gen.generate(PROMPT, seed=4, tau=tau, verifier=DirectVerifier(service), chain=chain, greedy=greedy,
                             lookahead=la, decode_image=False,
                             budget=None if rate is None else BudgetController(tau, rate)) for la in (0, 1, 4, 9)}
    if rate is not None:  # the budget really moved tau
        assert runs[0].stats["tau_end"] != tau and runs[0].stats["budget"] == rate
    wait = runs[0]
    assert wait.stats["sent"] > 20 and wait.stats["voided"] == wait.stats["kept_ahead"] == 0
    for la in (1, 4, 9):
        r = runs[la]
        np.testing.assert_array_equal(r.tokens, wait.tokens)
        np.testing.assert_array_equal(r.source, wait.source)
        np.testing.assert_array_equal(r.sent, wait.sent)
        # a rewind re-ingests several tokens in one graph call: the same cache entries up to float reassociation
        # in the batched matmuls (relative 4e-5 on v6's U, whose values are near 1e-4)
        np.testing.assert_allclose(r.u, wait.u, rtol=1e-4, atol=1e-9)
        assert r.stats["kept_ahead"] > 0 and r.stats["voided"] > 0 and r.stats["drafts"] > wait.stats["drafts"]
    assert runs[9].stats["voided"] > runs[1].stats["voided"]  # deeper lookahead, more drafts thrown away
    other = gen.generate(PROMPT, seed=5, tau=tau, verifier=DirectVerifier(service), chain=chain, greedy=greedy,
                         lookahead=4, decode_image=False)
    assert greedy or (other.tokens != wait.tokens).any()  # the seed matters: the equality is not vacuous


@pytest.mark.parametrize("chain,lookahead", [(1, 0), (1, 4), (3, 0), (3, 4)])
def test_greedy_runtime_sending_every_draft_writes_the_greedy_cloud_image(builtin_fp32, chain, lookahead):
    """The bridge path is exact: greedy on both sides, every draft sent, no interval features (the cloud's
    distribution is then its own), the runtime's tokens are the greedy cloud-only tokens, whatever the device drafts
    and however far it drafts ahead."""
    import dataclasses

    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.direct import DirectVerifier
    from ciar.runtime.verifier import SessionParams
    models, path = builtin_fp32
    b = load_bundle(path)
    gen = DeviceGenerator(b, make_backend(b))
    service = CloudService(models, max_sessions=2)
    cfg = b.manifest["sampling"]["cfg_scale"]
    cloud_only = DirectVerifier(service).open(SessionParams(PROMPT, 3, gen.T, gen.T, cfg, 0.0, 0, 1.0))

    class GreedyCloud(DirectVerifier):
        def open(self, params):
            return super().open(dataclasses.replace(params, temperature=0.0, feature_dim=0))

    r = gen.generate(PROMPT, 3, -np.inf, verifier=GreedyCloud(service), greedy=True, chain=chain,
                     lookahead=lookahead, decode_image=False)
    assert r.stats["sent"] > 100 and r.stats["unverified"] == 0
    np.testing.assert_array_equal(r.tokens, cloud_only)
    if lookahead:
        assert r.stats["kept_ahead"] > 0 and r.stats["voided"] > 0


def test_runtime_greedy_equals_torch_generate(bundles, smoke_models):
    from ciar.models import SamplingConfig
    from ciar.models.generate import generate
    from ciar.training.data import caption_batch
    b = load_bundle(bundles["none"])
    gen = DeviceGenerator(b, make_backend(b))
    out = gen.generate(PROMPT, seed=0, tau=float("inf"), greedy=True, decode_image=False)
    s = SamplingConfig(cfg_scale=b.manifest["sampling"]["cfg_scale"], temperature=0.0)
    with torch.inference_mode():
        cond = smoke_models.text(*caption_batch([PROMPT]))
        ref = generate(smoke_models.device, cond, s, torch.Generator().manual_seed(0))[0].numpy()
    assert np.array_equal(out.tokens, ref)


def test_numpy_and_torch_filtering_agree():
    rng = np.random.default_rng(0)
    for top_k, top_p in [(0, 1.0), (10, 1.0), (0, 0.8), (25, 0.9), (1, 1.0)]:
        logits = rng.normal(size=(4, 200)).astype(np.float32) * 3
        a = np.isfinite(numpy_filter(logits, top_k, top_p))
        b = torch.isfinite(torch_filter(torch.from_numpy(logits), top_k, top_p)).numpy()
        assert np.array_equal(a, b), (top_k, top_p)


@pytest.mark.parametrize("top_k,top_p,greedy", [(0, 1.0, False), (20, 1.0, False), (0, 0.9, False), (0, 1.0, True)])
def test_the_loop_sampler_draws_what_sample_of_processed_probs_draws(top_k, top_p, greedy):
    """The generation loop's allocation-free draw is the reference draw: same uniforms, same tokens."""
    rng = np.random.default_rng(1)
    sampler = Sampler(512, top_k, top_p, greedy)
    for seed in range(200):
        logits = (rng.normal(size=512) * rng.uniform(0.5, 8)).astype(np.float32)
        assert sampler.draw(logits, np.random.default_rng(seed).random()) == \
            sample(processed_probs(logits, top_k, top_p, greedy), np.random.default_rng(seed))
        np.testing.assert_array_equal(sampler.probs(logits), processed_probs(logits, top_k, top_p, greedy))


def test_the_draw_table_is_one_formula_in_torch_and_numpy_and_draws_the_reference_token():
    """The ONNX graph's `cdf` is `models.sampling.draw_table` of its centre logits; the runtime draws from it with
    `draw_at`, from its own numpy `draw_table` otherwise: the two tables agree to float64 rounding and a draw from
    either is the reference draw. A table that skipped a position (shifted by one) would draw other tokens."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(8, 512)) * rng.uniform(0.5, 8, (8, 1))).astype(np.float32)
    tables = torch_draw_table(torch.from_numpy(logits)).numpy()
    assert tables.dtype == np.float64 and tables.shape == logits.shape
    sampler = Sampler(512, 0, 1.0, greedy=False)
    shifted = 0
    for x, table in zip(logits, tables):
        np.testing.assert_allclose(table, draw_table(x), rtol=1e-12)
        for seed in range(50):
            u = np.random.default_rng(seed).random()
            want = sample(processed_probs(x, 0, 1.0, False), np.random.default_rng(seed))
            assert sampler.draw(x, u, table) == draw_at(table, u) == sampler.draw(x, u) == want
            shifted += draw_at(np.concatenate([[0.0], table[:-1]]), u) != want
    assert shifted > 100  # the test can fail: a mis-aligned table draws other tokens
    # filters change the distribution: a filtering sampler draws from the logits, not the given table
    assert Sampler(512, 1, 1.0, greedy=False).draw(logits[0], 0.999, tables[0]) == int(logits[0].argmax())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("missing", "missing file"),
    ("hash", "SHA-256"),
    ("version", "format_version"),
    ("truncated", "bytes"),
    ("manifest", "not valid JSON"),
])
def test_bad_bundles_fail_with_one_line(bundles, tmp_path, damage, message):
    b = _copy(bundles["int8"], tmp_path / "b")
    mf = b / "manifest.json"
    if damage == "missing":
        (b / "vq_decoder.onnx").unlink()
    elif damage == "hash":
        data = bytearray((b / "device.onnx").read_bytes())
        data[-10] ^= 0xFF
        (b / "device.onnx").write_bytes(bytes(data))
    elif damage == "version":
        m = json.loads(mf.read_text())
        m["format_version"] = 99
        mf.write_text(json.dumps(m))
    elif damage == "truncated":
        data = (b / "device.onnx").read_bytes()
        (b / "device.onnx").write_bytes(data[: len(data) // 2])
    elif damage == "manifest":
        mf.write_text("{not json")
    with pytest.raises(BundleError, match=message):
        load_bundle(b)
    res = subprocess.run([str(BIN / "ciar-device"), "run", "--bundle", str(b), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


class _NoTable:
    """A backend whose steps carry no draw table (as the ExecuTorch and PyTorch ones): the loop draws from numpy."""

    def __init__(self, backend) -> None:
        self.backend, self.decode_inputs = backend, backend.decode_inputs

    @property
    def last_run_s(self) -> float:
        return self.backend.last_run_s

    def reset(self) -> None:
        self.backend.reset()

    def step(self, embeds, start, neighbours):
        return dataclasses.replace(self.backend.step(embeds, start, neighbours), cdf=None)


def test_the_loop_draws_the_same_image_from_the_graphs_draw_table_as_from_numpy(bundles):
    """A sampled image (local, then with chains sent to the offline verifier) through the graph's `cdf` output is
    the image the loop draws from the centre logits with numpy, token for token."""
    b = load_bundle(bundles["int8"])
    backend = make_backend(b)
    assert backend.step(np.zeros((2, 1, b.manifest["model"]["dim"]), np.float32), 10, np.full((1, 2), -1)).cdf \
        is not None
    with_table, without = DeviceGenerator(b, backend), DeviceGenerator(b, _NoTable(make_backend(b)))
    for seed, tau, chain in ((4, float("inf"), 1), (5, 2e-5, 4)):
        a = with_table.generate(PROMPT, seed=seed, tau=tau, chain=chain, decode_image=False)
        r = without.generate(PROMPT, seed=seed, tau=tau, chain=chain, decode_image=False)
        assert np.array_equal(a.tokens, r.tokens) and np.array_equal(a.sent, r.sent), seed


def test_quantization_keeps_the_neighbour_scale_float(bundles):
    """The Inter-Head's neighbour scale stays float in the int8 and int4 graphs (`NEIGHBOUR_SCALE_NODES`, matched
    inside whatever scope the exported module gives its nodes)."""
    import onnx
    for q, quantized in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        nodes = onnx.load(str(bundles[q] / "device.onnx")).graph.node
        assert any(n.op_type == quantized for n in nodes), q  # the rest is quantized
        scale = [n.op_type for n in nodes if "/neighbour/" in n.name]
        assert scale.count("MatMul") == 2 and quantized not in scale, (q, scale)


def test_a_graph_without_the_draw_table_is_refused_with_what_to_do(bundles, tmp_path):
    """A format-4 manifest over a device graph without `cdf` (a format-3 graph, or one edited by hand)."""
    import onnx
    from ciar.runtime.bundle import write_manifest
    b = _copy(bundles["none"], tmp_path / "b")
    model = onnx.load(str(b / "device.onnx"))
    keep = [o for o in model.graph.output if o.name != "cdf"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(b / "device.onnx"))
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, {k: v for k, v in m.items() if k not in ("files", "format_version")},
                   {role: e["path"] for role, e in m["files"].items()})
    with pytest.raises(BundleError, match="no output cdf.*re-export"):
        make_backend(load_bundle(b))


def test_truncated_model_with_matching_manifest_is_refused_by_the_backend(bundles, tmp_path):
    from ciar.runtime.bundle import write_manifest
    b = _copy(bundles["int8"], tmp_path / "b")
    data = (b / "device.onnx").read_bytes()
    (b / "device.onnx").write_bytes(data[: len(data) // 3])
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, {k: v for k, v in m.items() if k not in ("files", "format_version")},
                   {role: e["path"] for role, e in m["files"].items()})
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        make_backend(load_bundle(b))


def test_export_errors(smoke_models, tmp_path):
    with pytest.raises(ExportError, match="unknown format"):
        export_bundle(smoke_models, "tflite", "none", tmp_path)
    with pytest.raises(ExportError, match="unknown quantization"):
        export_bundle(smoke_models, "onnx", "int3", tmp_path)


def test_device_cli_run_and_bench(bundles, tmp_path):
    out, stats = tmp_path / "img.png", tmp_path / "stats.json"
    res = subprocess.run([str(BIN / "ciar-device"), "run", "--bundle", str(bundles["int8"]), "--cloud-rate", "0.3",
                          "--out", str(out), "--stats", str(stats)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    s = json.loads(stats.read_text())
    for key in ("tokens", "local", "cloud", "unverified", "seconds"):
        assert key in s
    assert s["tokens"] == 256 and s["local"] + s["unverified"] == 256
    assert (tmp_path / "img_uncertainty.png").exists()
    bad = subprocess.run([str(BIN / "ciar-device"), "run", "--chain", "0"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--chain: must be at least 1, got 0" in bad.stderr
    bad = subprocess.run([str(BIN / "ciar-device"), "run", "--lookahead", "-1"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--lookahead: must be at least 0, got -1" in bad.stderr
    res = subprocess.run([str(BIN / "ciar-device"), "bench", "--bundle", str(bundles["int8"]), "--images", "1",
                          "--warmup-images", "0", "--json", "-"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)["bundles"][0]
    for key in ("format", "quantize", "prefill_ms", "step_ms_p50", "step_ms_p95", "tokens_per_s", "floor_ms",
                "overhead_fraction", "overhead_us_per_step", "peak_rss_mb"):
        assert key in row
    assert 0 <= row["overhead_fraction"] < 1 and row["floor_ms"] > 0
    # the runtime's own microseconds per step: positive, and less than a whole step
    assert 0 < row["overhead_us_per_step"] < 1e3 * row["step_ms_p95"]


def test_device_cli_tau_fixed_by_default_budget_and_budget_cap(bundles, tmp_path):
    """By default tau stays where the calibration table puts --cloud-rate, so the image is the one --tau with that
    value draws; --budget steers tau per image instead (and the stats say which ran). --budget-cap R starts there
    and only raises tau while the image is over R."""
    from ciar.runtime.cli import tau_for

    b = bundles["int8"]
    tau = tau_for(load_bundle(b), None, 0.1)
    stats = {}
    for name, extra in (("fixed", ["--cloud-rate", "0.1"]), ("tau", ["--tau", repr(tau)]),
                        ("held", ["--cloud-rate", "0.1", "--budget"])):
        path = tmp_path / f"{name}.json"
        res = subprocess.run([str(BIN / "ciar-device"), "run", "--bundle", str(b), *extra, "--seed", "3",
                              "--out", str(tmp_path / f"{name}.png"), "--stats", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        stats[name] = json.loads(path.read_text())
        assert f"over tau={tau:.3g}" in res.stdout or name == "held"
    fixed, by_tau, held = stats["fixed"], stats["tau"], stats["held"]
    assert not fixed["budget"] and not by_tau["budget"] and held["budget"]
    assert fixed["sent"] == by_tau["sent"] and fixed["local"] == by_tau["local"]
    assert (tmp_path / "fixed.png").read_bytes() == (tmp_path / "tau.png").read_bytes()
    # --budget-cap: a ceiling from the same start. Never reached (1.0), tau never moves: the fixed image; a cap under
    # the fixed image's rate sends fewer, near the cap
    low = max(1, fixed["sent"] // 2) / fixed["tokens"]
    for name, cap in (("cap1", "1.0"), ("caplow", repr(low))):
        path = tmp_path / f"{name}.json"
        res = subprocess.run([str(BIN / "ciar-device"), "run", "--bundle", str(b), "--cloud-rate", "0.1",
                              "--budget-cap", cap, "--seed", "3", "--out", str(tmp_path / f"{name}.png"),
                              "--stats", str(path)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        stats[name] = json.loads(path.read_text())
    assert stats["cap1"]["budget_cap"] == 1.0 and stats["cap1"]["sent"] == fixed["sent"]
    assert (tmp_path / "cap1.png").read_bytes() == (tmp_path / "fixed.png").read_bytes()
    assert stats["caplow"]["sent"] < fixed["sent"]
    assert held["sent"] != fixed["sent"]  # the controller did steer this image
    bad = subprocess.run([str(BIN / "ciar-device"), "run", "--budget", "--budget-cap", "0.2"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "not allowed with" in bad.stderr
    bad = subprocess.run([str(BIN / "ciar-device"), "run", "--bundle", str(b), "--tau", "0.5", "--budget",
                          "--out", str(tmp_path / "never.png")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pass --cloud-rate R instead" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "never.png").exists()


def test_calibrate_records_what_each_tau_spends_with_the_cloud(bundles, smoke_models, tmp_path):
    """`ciar export calibrate`: the quantile table's taus decoded with the cloud in the loop; the manifest gets what
    each spent, the files stay valid; the runtime reads a measured rate back as its tau (with a cloud and the
    bundle's prefix only), and that tau spends the recorded rate again on the same prompts and seeds."""
    from ciar.cli.calibrate import SEED, calibrate_bundle, calibration_prompts, cloud_decode
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.runtime.cli import choose_tau, tau_for
    from ciar.runtime.generator import DeviceGenerator

    b = tmp_path / "b"
    shutil.copytree(bundles["int8"], b)
    table = calibrate_bundle(b, smoke_models, 2, rates=(0.1, 0.3, 0.6))
    bundle = load_bundle(b)  # the hashes still hold
    assert bundle.manifest["gate"]["cloud_calls"] == table and table["prompts"] == 2
    assert table["taus"] == sorted(tau_for(bundle, None, r) for r in (0.1, 0.3, 0.6))
    assert all(a >= c for a, c in zip(table["calls"], table["calls"][1:]))
    assert table["calls"][0] == table["measured"][0] and all(c <= m for c, m in zip(table["calls"], table["measured"]))
    rate = table["calls"][0]
    tau, source = choose_tau(bundle, None, rate, cloud=True)
    assert source == "cloud_calls" and tau == table["taus"][0]
    assert choose_tau(bundle, None, rate, cloud=False) == (tau_for(bundle, None, rate), "u_quantiles")
    assert choose_tau(bundle, None, rate, cloud=True, prefix_fraction=0.5)[1] == "u_quantiles"
    assert choose_tau(bundle, 0.25, None, cloud=True) == (0.25, "tau")
    gen = DeviceGenerator(bundle, make_backend(bundle))
    service = CloudService(smoke_models, max_sessions=1)
    spent = [cloud_decode(gen, service, prompt, SEED + i, tau)[1] for i, prompt in enumerate(calibration_prompts(2))]
    assert float(np.mean(spent)) == rate
    # bad input: no bundle, a directory that is not one, rates that give one tau
    with pytest.raises(BundleError, match="no manifest.json"):
        calibrate_bundle(tmp_path, smoke_models, 1)
    with pytest.raises(BundleError, match="at least two rates"):
        calibrate_bundle(b, smoke_models, 1, rates=(0.3,))
    for extra, said in (([], "which bundle?"), ([str(b), "--rates", "0.1", "1.5"], "--rates must lie in (0, 1)"),
                        ([str(b), "--prompts", "0"], "--prompts must be at least 1")):
        res = subprocess.run([str(BIN / "ciar"), "export", "calibrate", *extra], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode != 0 and said in res.stderr and "Traceback" not in res.stderr
    assert load_bundle(b).manifest["gate"]["cloud_calls"] == table  # refused: nothing written


@pytest.mark.parametrize("lookahead", [0, 4])
def test_runtime_cap_is_hard_with_the_cloud_in_the_loop(bundles, smoke_models, lookahead):
    """The torch-free loop against the PyTorch cloud, waiting for each verdict or drafting ahead: tau = 0 sends
    every draft, a cap of 0.2 stops the image's cloud forwards (prefill, prefix, verifications) at floor(0.2 T)."""
    from ciar.cli.calibrate import cloud_decode
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.runtime.budget import BudgetController
    from ciar.runtime.generator import DeviceGenerator

    bundle = load_bundle(bundles["int8"])
    gen, service = DeviceGenerator(bundle, make_backend(bundle)), CloudService(smoke_models, max_sessions=1)
    spent = {}
    for name, budget in (("free", None), ("cap", BudgetController.capped(0.0, 0.2))):
        r, spent[name] = cloud_decode(gen, service, "a red circle at the top left", 5, 0.0, budget, lookahead)
    T = r.stats["tokens"]
    assert spent["free"] > 0.2 and spent["cap"] == math.floor(0.2 * T) / T


def test_bundle_proposer_drafts_what_the_eager_proposer_drafts(bundles, smoke_models):
    """The engine's device side run from the fp32 ONNX bundle gives the eager proposer's draft, q, U and features
    at every position: one-token steps, a block of tokens, and a rewind (a block written again from earlier)."""
    from ciar.engine.proposer import BundleProposer

    assert_proposer_matches_eager(BundleProposer(bundles["none"], smoke_models.device, smoke_models.sampling),
                                  smoke_models, PROMPT)


def test_engine_on_a_bundle_proposer_is_exact_and_gates_as_eager(bundles, smoke_models):
    """Greedy: ciar-lossless from the bundle returns the cloud-only tokens; ciar from the bundle makes the same
    tokens and sends the same drafts as ciar in PyTorch eager (the fp32 graph's U agrees)."""
    from ciar.engine import collaborative_generate, get_method
    from ciar.engine.proposer import BundleProposer

    m = smoke_models
    greedy = dataclasses.replace(m.sampling, temperature=0.0)
    cond = m.encode_prompts([PROMPT])
    exported = BundleProposer(bundles["none"], m.device, greedy)

    def run(name, proposer, tau=None):
        return collaborative_generate(get_method(name, tau=tau), m.cloud, m.device, cond, greedy,
                                      torch.Generator().manual_seed(0), phi=m.phi, proposer=proposer)

    base = run("cloud", None)
    assert torch.equal(run("ciar-lossless", exported).tokens, base.tokens)
    probe = run("ciar", exported, tau=float("inf"))
    tau = tau_between_scores(probe.u)
    a, b = run("ciar", None, tau), run("ciar", exported, tau)
    assert 0 < b.stats["sent"] < 256
    assert torch.equal(a.sent, b.sent) and torch.equal(a.tokens, b.tokens)


def test_bundle_proposer_refuses_what_it_cannot_run(bundles, smoke_models, t2i_config):
    from ciar.engine.proposer import BundleProposer
    from ciar.models import DeviceModel

    m = smoke_models
    exported = BundleProposer(bundles["int8"], m.device, m.sampling)
    with pytest.raises(ValueError, match="one image at a time"):
        exported.start(m.encode_prompts([PROMPT, PROMPT]), 256)
    with pytest.raises(BundleError, match="export it from the same weights"):
        BundleProposer(bundles["int8"], DeviceModel(t2i_config), m.sampling)
    with pytest.raises(BundleError, match="no manifest.json"):
        BundleProposer(bundles["int8"].parent, m.device, m.sampling)
