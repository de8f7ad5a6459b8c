"""InterFuse bounds, the U score and the Inter-Head (METHOD.md sections 2-3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ciar.models import GPTConfig, build_device_model, interfuse, interval_stats, process_interval
from ciar.models.gpt import GPT
from ciar.models.interval import (NO_NEIGHBOUR, cfg_combine_interval, interval_bounds, interval_log_bounds,
                                  log_sum_exp_excluding, neighbour_features, neighbour_ids, softplus)
from conftest import randomise


def brute_force_bounds(c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The METHOD.md formulas written literally, in float64."""
    c, r = c.double(), r.double()
    lo, up = (c - r).exp(), (c + r).exp()
    p_lo = lo / (lo + (up.sum(-1, keepdim=True) - up))
    p_up = up / (up + (lo.sum(-1, keepdim=True) - lo))
    return p_lo, p_up


@pytest.mark.parametrize("V,scale", [(7, 1.0), (1024, 5.0), (16384, 3.0)])
def test_matches_literal_formula_on_moderate_logits(V, scale):
    g = torch.Generator().manual_seed(V)
    c = torch.randn(4, V, generator=g) * scale
    r = torch.rand(4, V, generator=g)
    log_lo, log_up = interval_log_bounds(c, r)
    p_lo, p_up = brute_force_bounds(c, r)
    torch.testing.assert_close(log_lo.exp().double(), p_lo, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(log_up.exp().double(), p_up, atol=1e-6, rtol=1e-4)
    lin_lo, lin_up = interval_bounds(c, r)
    torch.testing.assert_close(lin_lo.double(), p_lo, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(lin_up.double(), p_up, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("magnitude", [1.0, 30.0, 1e4])
def test_linear_and_log_bounds_are_one_formula(magnitude):
    """The gate's bounds (linear) and the loss's (log) agree: to float64 rounding in float64, and in float32 to the
    absolute error of a few roundings that U's widths see."""
    g = torch.Generator().manual_seed(int(magnitude))
    c = torch.randn(16, 1024, generator=g, dtype=torch.float64) * magnitude
    r = torch.rand(16, 1024, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 16, dtype=torch.float64)[:, None]
    log_lo, log_up = interval_log_bounds(c, r)
    lin_lo, lin_up = interval_bounds(c, r)
    torch.testing.assert_close(lin_lo, log_lo.exp(), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(lin_up, log_up.exp(), rtol=1e-12, atol=1e-300)
    lo32, up32 = interval_bounds(c.float(), r.float())
    torch.testing.assert_close(lo32.double(), log_lo.exp(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(up32.double(), log_up.exp(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(interfuse(c.float(), r.float()).u.double(), interfuse(c, r).u, rtol=1e-3, atol=1e-9)


def test_softplus_is_torchs():
    """`F.softplus` to one rounding of 1 absolute: log(1 + y) drops a y below that, where log1p keeps it (a radius
    that small is lost in c -+ r anyway)."""
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    torch.testing.assert_close(softplus(x), F.softplus(x), rtol=2e-7, atol=1.2e-7)
    xg = x.clone().requires_grad_()
    softplus(xg).sum().backward()
    nonzero = x != 0  # at 0 itself the two pick different one-sided slopes
    torch.testing.assert_close(xg.grad[nonzero], torch.sigmoid(x)[nonzero], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("V", [2, 16, 1024, 16384])
@pytest.mark.parametrize("magnitude", [1.0, 30.0, 1e4])
def test_bounds_are_valid_everywhere(V, magnitude):
    g = torch.Generator().manual_seed(int(V + magnitude))
    c = (torch.rand(8, V, generator=g) * 2 - 1) * magnitude
    r = torch.rand(8, V, generator=g) * torch.tensor([0.0, 0.01, 0.5, 2.0, 10.0, 100.0, 1e3, 1e4])[:, None]
    iv = interfuse(c, r)
    p_lo, p_up = iv.p_lo, iv.p_up
    log_lo, log_up = interval_log_bounds(c, r)
    for t in (log_lo, log_up, p_lo, p_up, iv.u, iv.omega, iv.sigma):
        assert not torch.isnan(t).any()
    assert torch.isfinite(iv.u).all() and torch.isfinite(p_lo).all() and torch.isfinite(p_up).all()
    tol = 1e-5
    assert (p_lo.sum(-1) <= 1 + tol).all()
    assert (p_up.sum(-1) >= 1 - tol).all()
    assert (p_lo <= p_up + 1e-7).all()
    # any logits inside the box give a softmax between the bounds
    for _ in range(5):
        inside = c + (torch.rand(c.shape, generator=g) * 2 - 1) * r
        p = torch.softmax(inside, -1)
        assert (p >= p_lo - tol).all() and (p <= p_up + tol).all()
    assert (iv.u >= 0).all()


def test_zero_radius_collapses_to_softmax():
    g = torch.Generator().manual_seed(5)
    for V, mag in [(16, 1.0), (16384, 1e4), (1024, 50.0)]:
        c = torch.randn(3, V, generator=g) * mag
        iv = interfuse(c, torch.zeros_like(c))
        sm = torch.softmax(c, -1)
        torch.testing.assert_close(iv.p_lo, sm, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(iv.p_up, sm, atol=1e-6, rtol=1e-5)
        assert iv.u.abs().max() < 1e-9


def test_masked_logits_and_ties():
    c = torch.tensor([[2.0, 2.0, float("-inf"), 0.0]])
    r = torch.tensor([[0.1, 0.1, 0.1, 0.1]])
    iv = interfuse(c, r)
    assert iv.p_lo[0, 2] < 1e-38 and iv.p_up[0, 2] < 1e-38  # a masked logit: 0 to float32's smallest normal
    assert not torch.isnan(interval_log_bounds(c, r)[0]).any()
    torch.testing.assert_close(iv.p_lo[0, 0], iv.p_lo[0, 1])  # ties get equal bounds
    one = interfuse(torch.tensor([[1.0, float("-inf"), float("-inf")]]), torch.full((1, 3), 0.1))  # one entry left
    assert one.p_lo[0, 0] == 1 and one.p_up[0, 0] == 1 and one.p_up[0, 1:].max() < 1e-38
    assert torch.isfinite(one.u).all() and one.u == 0


def test_log_sum_exp_excluding_has_no_cancellation():
    x = torch.tensor([[0.0, -200.0, -201.0], [50.0, 50.0, -10.0]])
    out = log_sum_exp_excluding(x)
    ref = torch.stack([torch.logsumexp(torch.cat([x[:, :i], x[:, i + 1:]], -1), -1) for i in range(3)], -1)
    torch.testing.assert_close(out, ref)


def test_gradients_are_finite():
    g = torch.Generator().manual_seed(6)
    c = (torch.randn(4, 64, generator=g) * 20).requires_grad_()
    r = torch.rand(4, 64, generator=g).requires_grad_()
    log_lo, log_up = interval_log_bounds(c, r)
    (log_lo.logsumexp(-1).sum() + log_up.logsumexp(-1).sum() + interfuse(c, r).u.sum()).backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_u_score_definition():
    g = torch.Generator().manual_seed(7)
    c, r = torch.randn(2, 32, generator=g), torch.rand(2, 32, generator=g)
    iv = interfuse(c, r)
    delta = (iv.p_up - iv.p_lo).double()
    omega = delta.sum(-1)
    sigma = ((delta - delta.mean(-1, keepdim=True)) ** 2).mean(-1).sqrt()
    torch.testing.assert_close(iv.u.double(), omega * sigma, rtol=1e-5, atol=1e-9)
    # a wider box is more uncertain
    assert (interfuse(c, r * 3).u > iv.u).all()
    feats = interval_stats(iv.p_lo, iv.p_up, top=4)
    assert feats.shape == (2, 7)
    torch.testing.assert_close(feats[:, -1], iv.u)
    assert (feats[:, :3] >= feats[:, 1:4]).all()


def test_cfg_interval_contains_every_combination():
    g = torch.Generator().manual_seed(8)
    c, r = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g)
    for s in (0.5, 1.0, 4.0):
        cc, rr = cfg_combine_interval(c, r, s)
        for _ in range(10):
            pick = c + (torch.rand(c.shape, generator=g) * 2 - 1) * r
            cond, uncond = pick.chunk(2)
            combined = uncond + (cond - uncond) * s
            assert ((combined - cc).abs() <= rr + 1e-5).all()
    c2, r2 = process_interval(c, r, cfg_scale=4.0, temperature=2.0)
    cc, rr = cfg_combine_interval(c, r, 4.0)
    torch.testing.assert_close(c2, cc / 2)
    torch.testing.assert_close(r2, rr / 2)


def test_device_model_builder(t2i_config):
    cloud = randomise(GPT(t2i_config))
    device = build_device_model(t2i_config, cloud=cloud)
    assert device.config.n_layer == 1 and len(device.layers) == 1
    assert set(device.state_dict()) - set(cloud.state_dict()) == {
        "inter_head.radius.weight", "inter_head.radius.bias", *(f"inter_head.neighbour.{i}.{p}" for i in (0, 2)
                                                               for p in ("weight", "bias"))}
    torch.testing.assert_close(device.tok_embeddings.weight, cloud.tok_embeddings.weight)
    torch.testing.assert_close(device.layers[0].attention.wqkv.weight, cloud.layers[0].attention.wqkv.weight)
    cond = torch.randn(2, 4, 24)
    out = device.forward_interval(cond=cond)
    assert out.centre.shape == out.radius.shape == (2, 4, 48)
    assert (out.radius >= 0).all()
    torch.testing.assert_close(out.radius, torch.full_like(out.radius, 0.1), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="config"):
        build_device_model(t2i_config.replace(dim=32, n_head=2), cloud=cloud)


def test_radius_head_with_an_mlp_starts_as_the_linear_one(t2i_config):
    """The experimental MLP radius head (`radius_hidden`) adds only inter_head.mlp.* and, its output layer being
    zero at the start, gives exactly the linear head's radius until it trains."""
    cloud = randomise(GPT(t2i_config))
    linear = build_device_model(t2i_config, cloud=cloud)
    mlp = build_device_model(t2i_config, cloud=cloud, radius_hidden=32)
    assert {k for k in set(mlp.state_dict()) - set(linear.state_dict())} == {
        "inter_head.mlp.0.weight", "inter_head.mlp.0.bias", "inter_head.mlp.2.weight", "inter_head.mlp.2.bias"}
    mlp.inter_head.radius.load_state_dict(linear.inter_head.radius.state_dict())
    h = torch.randn(3, 5, t2i_config.dim)
    torch.testing.assert_close(mlp.inter_head(h), linear.inter_head(h))
    mlp.inter_head.mlp[2].weight.data.normal_()  # once trained, the MLP changes the radius
    assert not torch.allclose(mlp.inter_head(h), linear.inter_head(h))


def test_neighbour_ids_in_raster_order_and_the_runtime_twin():
    """Left is the previous token in raster order (a row's first token reads the previous row's last), above is
    `grid` back; none before the image. The numpy runtime's copy gives the same ids for any block of positions."""
    from ciar.runtime.generator import neighbour_ids as numpy_neighbour_ids
    grid, T = 4, 16
    tokens = torch.arange(100, 100 + T)[None]
    nb = neighbour_ids(tokens, grid)[0]
    assert nb.shape == (T, 2)
    assert nb[0].tolist() == [NO_NEIGHBOUR, NO_NEIGHBOUR] and nb[1].tolist() == [100, NO_NEIGHBOUR]
    assert nb[4].tolist() == [103, 100] and nb[15].tolist() == [114, 111]
    flat = tokens[0].numpy()
    for start, n in [(0, 16), (0, 1), (3, 2), (4, 1), (13, 3)]:
        assert numpy_neighbour_ids(flat, start, n, grid).tolist() == nb[start:start + n].tolist()
    assert neighbour_ids(tokens.repeat(3, 1), grid).shape == (3, T, 2)


def test_neighbour_features_read_whether_the_device_continues_its_neighbours():
    centre = torch.tensor([[4.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 3)
    nb = torch.tensor([[0, 0], [1, NO_NEIGHBOUR], [NO_NEIGHBOUR, NO_NEIGHBOUR]])
    f = neighbour_features(centre, nb)
    assert f.shape == (3, 9) and torch.isfinite(f).all()
    rel, is_argmax, has_above, agree = f[:, :2], f[:, 2:4], f[:, 4], f[:, 5]
    assert rel[0].tolist() == [0.0, 0.0] and is_argmax[0].tolist() == [1.0, 1.0] and agree[0] == 1
    torch.testing.assert_close(rel[1], torch.tensor([-0.3, 0.0]))  # log p(1) - log p(0) = -3, / 10
    assert is_argmax[1].tolist() == [0.0, 0.0] and has_above.tolist() == [1.0, 0.0, 0.0] and agree[1] == 0
    assert (f[2, :6] == 0).all()  # no neighbours: only the distribution's own statistics
    p = centre.softmax(-1)[0]
    torch.testing.assert_close(f[0, 6:8], torch.stack([p.max(), p[0] - p[1]]))
    torch.testing.assert_close(f[0, 8], -(p * p.log()).sum() / 3)


def test_neighbour_indicators_are_the_comparisons_they_stand_for():
    """The float arithmetic on the ids gives what the comparisons give: present (id >= 0), is the argmax (at the
    argmax's index; no exact ties in random logits) and left == above with an above neighbour."""
    g = torch.Generator().manual_seed(5)
    centre = torch.randn(3, 200, 64, generator=g) * 4
    nb = torch.randint(NO_NEIGHBOUR, 64, (3, 200, 2), generator=g)
    nb[:, :40, 1] = nb[:, :40, 0]
    nb[:, 40:80, 0] = centre[:, 40:80].argmax(-1)
    nb[:, 80:100] = NO_NEIGHBOUR
    f = neighbour_features(centre, nb)
    present = nb >= 0
    assert torch.equal(f[..., 2:4], ((nb == centre.argmax(-1, keepdim=True)) & present).float())
    assert torch.equal(f[..., 4], present[..., 1].float())
    assert torch.equal(f[..., 5], ((nb[..., 0] == nb[..., 1]) & present[..., 1]).float())
    assert f[..., 2:6].sum() > 0 and (f[..., 2:6] == 0).any()


def test_the_neighbour_scale_starts_as_the_identity_and_then_reads_the_neighbours(t2i_config):
    """Untrained, `processed_box` is `process_interval` exactly (old weights keep their box); trained, the same
    position gets another U when its neighbours change, and only the radius moves."""
    device = build_device_model(t2i_config, cloud=randomise(GPT(t2i_config)))
    c, r = torch.randn(2, 5, 48), torch.rand(2, 5, 48)
    nb = torch.randint(0, 48, (1, 5, 2))
    base = process_interval(c, r, 3.0, 1.0)
    for a, b in zip(device.processed_box(c, r, nb, 3.0, 1.0), base):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    randomise(device.inter_head.neighbour, seed=3, std=0.5)
    c2, r2 = device.processed_box(c, r, nb, 3.0, 1.0)
    torch.testing.assert_close(c2, base[0])
    assert not torch.allclose(r2, base[1]) and (r2 >= 0).all()
    _, r3 = device.processed_box(c, r, torch.full_like(nb, NO_NEIGHBOUR), 3.0, 1.0)
    assert not torch.allclose(interfuse(c2, r2).u, interfuse(c2, r3).u)


def test_weights_without_the_neighbour_scale_load_as_the_identity(tmp_path):
    """Built-in weights saved before the neighbour scale (v4) load, with the untrained (identity) scale; any other
    missing key is still an error."""
    from ciar.models.builtin import load_builtin, save_builtin
    from ciar.models.checkpoint import load_safetensors, save_safetensors
    models = load_builtin()
    save_builtin(models, tmp_path)
    state, _ = load_safetensors(tmp_path / "device.safetensors")
    old = {k: v for k, v in state.items() if not k.startswith("inter_head.neighbour.")}
    save_safetensors(old, tmp_path / "device.safetensors", {"ciar_part": "device"})
    loaded = load_builtin(tmp_path)
    assert (loaded.device.inter_head.neighbour[2].weight == 0).all()
    torch.testing.assert_close(loaded.device.inter_head.radius.weight, models.device.inter_head.radius.weight)
    del old["inter_head.radius.bias"]
    save_safetensors(old, tmp_path / "device.safetensors", {"ciar_part": "device"})
    with pytest.raises(RuntimeError, match="inter_head.radius.bias"):
        load_builtin(tmp_path)


@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.01, 0.001])
def test_gate_bounds_hold_at_low_temperature_on_the_builtin_device(temperature):
    """The processed radius grows as 1 / temperature (here up to thousands of nats): the gate's float32 linear
    bounds keep U as close to float64 as the log-space form does, on the built-in device's boxes over cloud-drawn
    images (a single shift by max(up) would lose every bound below the top once a box is 87 nats wide)."""
    from ciar.models.builtin import load_builtin
    from ciar.models.generate import generate
    from ciar.models.interval import u_score
    from ciar.training.scenes import heldout_prompts
    from ciar.training.stages import device_box
    models = load_builtin()
    s = models.sampling
    cond = models.encode_prompts(heldout_prompts(2))
    with torch.inference_mode():
        tokens = generate(models.cloud, cond, s, torch.Generator().manual_seed(0))
        c, r, _ = device_box(models.device, cond, tokens, s.cfg_scale, temperature)
        reference = u_score(*[t.exp() for t in interval_log_bounds(c.double(), r.double())])[0]
        log_form = u_score(*[t.exp() for t in interval_log_bounds(c, r)])[0].double()
        u = interfuse(c, r).u.double()
    assert torch.isfinite(u).all()
    sendable = reference > 1e-6  # the gate's range (tau is ~5e-5 at T = 1)
    err = ((u - reference).abs() / reference)[sendable].max()
    err_log = ((log_form - reference).abs() / reference)[sendable].max()
    assert err <= max(2 * err_log, 1e-4), (float(err), float(err_log))
    assert (u - reference).abs().max() < 1e-4
