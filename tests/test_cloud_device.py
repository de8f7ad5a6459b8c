"""The cloud verifier on a GPU (`--cloud-device cuda`, `ciar serve --device cuda`): the engine's CloudVerifier and
the bridge's CloudService run their forward where the cloud's weights are, keep their interface on the CPU and
draw from the caller's CPU generator.

The refusals run everywhere. The CUDA tests run where torch sees a GPU (this project's CI has none: they are
skipped there, and run by hand on a lent GPU machine; docs/BENCHMARKS.md says when they last ran): exactness of
speculative decoding with the cloud on the GPU (greedy tokens and the chi-square test), same seed same image, the
GPU cloud against the CPU cloud, and the bridge's cloud on the GPU behind a real websocket server."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ciar.engine import METHODS, collaborative_generate, get_method
from ciar.engine.gates import calibrate_tau
from ciar.engine.verifier import CloudVerifier
from ciar.models import SamplingConfig
from ciar.models.builtin import load_builtin
from ciar.models.phi import IntervalProjection, PhiConfig
from test_engine import _chi_square_fails, _joint_cloud_distribution, conditions, tiny

CIAR = str(Path(sys.executable).parent / "ciar")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on a GPU machine: see docs/BENCHMARKS.md)")
PROMPT = "a small green triangle at the bottom right and a large yellow circle in the centre, on a black background"


# ------------------------------------------------------------------------------------------------ refusals
def test_a_device_this_machine_lacks_is_refused_with_what_to_do():
    models = load_builtin(None)
    with pytest.raises(ValueError, match="not a torch device"):
        models.cloud_to("gpu")
    if not CUDA:
        with pytest.raises(ValueError, match="no CUDA device here"):
            models.cloud_to("cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        models.cloud_to(f"cuda:{torch.cuda.device_count() + 3}")
    assert next(models.cloud.parameters()).device.type == "cpu"  # a refusal moves nothing
    res = subprocess.run([CIAR, "bench", "methods", "--prompts", "2", "--cloud-device", "gpu"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "--cloud-device" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([CIAR, "serve", "--port", "0", "--device", "gpu"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "--device" in res.stderr and "Traceback" not in res.stderr


def test_the_verifier_refuses_phi_away_from_the_cloud():
    cloud, _ = tiny()
    phi = IntervalProjection(PhiConfig(32, 11, cloud.config.dim)).to("meta")
    with pytest.raises(ValueError, match="phi is on meta"):
        CloudVerifier(cloud, SamplingConfig(), phi)
    from ciar.cloud_bridge.cloud import CloudService
    models = load_builtin(None)
    models.phi.to("meta")
    with pytest.raises(ValueError, match="phi is on meta"):
        CloudService(models, max_sessions=1)


# ------------------------------------------------------------------------------------------------ on a GPU
@needs_cuda
@pytest.mark.parametrize("name", ["sd", "ciar-lossless"])
def test_greedy_speculative_methods_equal_the_gpu_cloud(name):
    cloud, device = tiny()
    gpu = copy.deepcopy(cloud).to("cuda")
    s = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    cond = conditions(3)
    base = collaborative_generate(METHODS["cloud"], gpu, device, cond, s, torch.Generator().manual_seed(0))
    out = collaborative_generate(METHODS[name], gpu, device, cond, s, torch.Generator().manual_seed(5))
    assert out.tokens.device.type == "cpu" and torch.equal(out.tokens, base.tokens)
    cpu = collaborative_generate(METHODS["cloud"], cloud, device, cond, s, torch.Generator().manual_seed(0))
    assert float((cpu.tokens == base.tokens).float().mean()) >= 0.95  # the same model, up to float rounding


@needs_cuda
@pytest.mark.parametrize("name", ["sd", "ciar-lossless"])
def test_sampling_with_the_gpu_cloud_samples_the_cloud_distribution(name):
    cloud, device = tiny(vocab=6, block=4, dim=32, layers=2)
    s = SamplingConfig(cfg_scale=2.0, temperature=1.0)
    cond = conditions(1, seed=3)
    n, V = 6000, cloud.config.vocab_size
    out = collaborative_generate(get_method(name), copy.deepcopy(cloud).to("cuda"), device, cond.repeat(n, 1, 1), s,
                                 torch.Generator().manual_seed(11))
    counts = torch.bincount(out.tokens[:, 0] * V + out.tokens[:, 1], minlength=V * V).view(V, V)
    assert not _chi_square_fails(counts, _joint_cloud_distribution(cloud, cond, s))


@needs_cuda
def test_builtin_ciar_on_the_gpu_cloud_same_seed_same_image():
    models = load_builtin(None).cloud_to("cuda")
    cpu = load_builtin(None)
    cond = models.encode_prompts([PROMPT])

    def run(m, seed, method):
        return collaborative_generate(method, m.cloud, m.device, cond, m.sampling, torch.Generator().manual_seed(seed),
                                      phi=m.phi)

    u = run(models, 1, get_method("ciar", tau=float("inf"))).u.flatten().numpy()
    method = get_method("ciar", tau=calibrate_tau(u[np.isfinite(u)], 0.3))

    a, b, other = run(models, 4, method), run(models, 4, method), run(models, 5, method)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sent, b.sent)
    assert a.stats["cloud_calls"] > 0.1 and (other.tokens != a.tokens).any()
    greedy = SamplingConfig(cfg_scale=models.sampling.cfg_scale, temperature=0.0)
    g_gpu = collaborative_generate(METHODS["cloud"], models.cloud, models.device, cond, greedy,
                                   torch.Generator().manual_seed(0))
    g_cpu = collaborative_generate(METHODS["cloud"], cpu.cloud, cpu.device, cond, greedy,
                                   torch.Generator().manual_seed(0))
    assert float((g_gpu.tokens == g_cpu.tokens).float().mean()) >= 0.95


@needs_cuda
def test_bridge_with_the_cloud_on_the_gpu():
    """A real websocket server whose CloudService runs on the GPU: the image through the socket equals the
    in-process one on the same GPU service; a greedy cloud-only session agrees with the CPU cloud."""
    from ciar.cloud_bridge.client import BridgeClient, ClientConfig
    from ciar.cloud_bridge.cloud import CloudService
    from ciar.cloud_bridge.direct import DirectVerifier
    from ciar.cloud_bridge.server import ServerConfig, ServerThread
    from ciar.runtime.backend import OnnxBackend
    from ciar.runtime.bundle import load_bundle
    from ciar.runtime.cli import default_bundle
    from ciar.runtime.generator import DeviceGenerator
    from ciar.runtime.verifier import SessionParams

    models = load_builtin(None).cloud_to("cuda")
    bundle = load_bundle(default_bundle())
    device = DeviceGenerator(bundle, OnnxBackend(bundle))
    probe = device.generate(PROMPT, 1, np.inf, prefix_fraction=0.0, decode_image=False)
    tau = calibrate_tau(probe.u[np.isfinite(probe.u)], 0.3)
    service = CloudService(models, max_sessions=8)
    assert service.cache.k.device.type == "cuda"
    reference = device.generate(PROMPT, 5, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)))
    with ServerThread(service, ServerConfig(port=0)) as url:
        client = BridgeClient(ClientConfig(url))
        through = device.generate(PROMPT, 5, tau, verifier=client)
        assert reference.stats["sent"] >= 10 and through.stats["unverified"] == 0
        np.testing.assert_array_equal(through.tokens, reference.tokens)
        greedy = SessionParams(PROMPT, 3, device.T, device.T, 3.0, 0.0, 0, 1.0)
        on_gpu = BridgeClient(ClientConfig(url, timeout_s=60)).open(greedy)
    on_cpu = DirectVerifier(CloudService(load_builtin(None), max_sessions=1)).open(greedy)
    assert len(on_gpu) == device.T and float(np.mean(on_gpu == on_cpu)) >= 0.95
