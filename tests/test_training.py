"""`ciar train builtin --smoke` runs every stage end to end; losses and resume behave."""
from __future__ import annotations

import json

import torch

from ciar.models.builtin import load_builtin
from ciar.training.builtin import STAGES, train_builtin
from ciar.training.inter_dro import InterDROConfig, inter_dro_loss


def test_smoke_training_runs_every_stage_and_resumes(tmp_path):
    torch.manual_seed(0)
    weights = train_builtin(tmp_path, smoke=True)
    for stage in STAGES:
        assert (tmp_path / f"{stage}.ckpt.pt").exists(), stage
        rows = [json.loads(line) for line in (tmp_path / f"{stage}.log.jsonl").read_text().splitlines()]
        # the gate stage ranks disagreeing against agreeing positions: smoke models disagree everywhere, so its
        # steps may have no loss (test_the_gate_stage_learns_from_the_neighbours trains it)
        losses = [r["loss"] for r in rows if stage != "gate" or "loss" in r]
        assert rows and all(torch.isfinite(torch.tensor(v)) for v in losses), stage
    models = load_builtin(weights)
    assert models.device.config.n_layer == 1
    # the gate stage's cloud-written sequences are cached with the config that made them
    saved = torch.load(tmp_path / "gate.sequences.pt", weights_only=True)
    assert saved["key"]["sequences"] == 2 and saved["tokens"].shape == (2, models.cloud.config.block_size)
    assert (weights / "features.safetensors").exists()
    # resuming a finished run trains nothing more: the logs do not grow
    before = (tmp_path / "cloud.log.jsonl").read_text()
    seconds = json.loads((weights / "builtin.json").read_text())["meta"]["stage_seconds"]
    train_builtin(tmp_path, smoke=True)
    assert (tmp_path / "cloud.log.jsonl").read_text() == before
    # and records the stages' training time, not its own no-op resume (what `--install` after a run writes)
    assert json.loads((weights / "builtin.json").read_text())["meta"]["stage_seconds"] == seconds


def _radius_gradient(cfg: InterDROConfig) -> float:
    """d loss / d (a common radius) for a centre that misses the cloud's distribution."""
    from ciar.models.interval import interval_log_bounds
    g = torch.Generator().manual_seed(1)
    centre = torch.randn(8, 32, generator=g)
    p_cloud = torch.softmax(torch.randn(8, 32, generator=g) * 2, -1)
    r = torch.full((), 0.1, requires_grad=True)
    log_lo, log_up = interval_log_bounds(centre, r.expand_as(centre))
    loss, _ = inter_dro_loss(log_lo, torch.log_softmax(centre, -1), log_up, p_cloud, cfg)
    loss.backward()
    return float(r.grad)


def test_the_paper_loss_closes_a_symmetric_box_and_coverage_opens_it():
    """The anchors of p_lo and p_up cancel on a shared radius and the L1 width term wins: the gradient on the
    radius is positive (gradient descent narrows the box) even where the centre misses the cloud. The coverage
    term turns it negative (the box widens towards the cloud)."""
    assert _radius_gradient(InterDROConfig()) > 0
    assert _radius_gradient(InterDROConfig(use_align=False, use_dro=False)) > 0
    assert _radius_gradient(InterDROConfig(lambda_cov=3.0)) < 0


def test_coverage_is_zero_when_the_box_contains_the_cloud():
    g = torch.Generator().manual_seed(2)
    p_cloud = torch.softmax(torch.randn(4, 16, generator=g), -1)
    log_c = torch.log(p_cloud)
    _, parts = inter_dro_loss(log_c - 0.5, log_c, log_c + 0.5, p_cloud, InterDROConfig(lambda_cov=2.0))
    assert parts["coverage"] == 0
    _, parts = inter_dro_loss(log_c + 0.5, log_c, log_c + 1.0, p_cloud, InterDROConfig(lambda_cov=2.0))
    torch.testing.assert_close(parts["coverage"], 2.0 * ((log_c + 0.5).exp() - p_cloud).sum(-1).mean())


def test_inter_dro_parts_and_ablation_switches():
    g = torch.Generator().manual_seed(0)
    V = 16
    logits = torch.randn(6, V, generator=g)
    p_cloud = torch.softmax(torch.randn(6, V, generator=g), -1)
    log_mid = torch.log_softmax(logits, -1)
    log_lo, log_up = log_mid - 0.3, (log_mid + 0.3).clamp(max=0)
    full, parts = inter_dro_loss(log_lo, log_mid, log_up, p_cloud, InterDROConfig())
    assert set(parts) == {"anchor_mid", "anchor_up", "anchor_lo", "align", "lo_dro"}
    anchor, parts_a = inter_dro_loss(log_lo, log_mid, log_up, p_cloud, InterDROConfig(use_align=False, use_dro=False))
    assert set(parts_a) == {"anchor_mid", "anchor_up", "anchor_lo"}
    torch.testing.assert_close(full, anchor + parts["align"] + parts["lo_dro"])
    # a perfect device (all three equal to p_cloud) has zero L1 and align terms
    exact = torch.log(p_cloud)
    _, parts_e = inter_dro_loss(exact, exact, exact, p_cloud, InterDROConfig())
    assert parts_e["align"].abs() < 1e-6
    # DRO weights favour the hardest rows: with a large alpha the loss approaches the worst row's CE
    hard, parts_h = inter_dro_loss(log_lo, log_mid, log_up, p_cloud, InterDROConfig(alpha=100.0))
    ce = -(p_cloud * (log_lo - torch.logsumexp(log_lo, -1, keepdim=True))).sum(-1)
    torch.testing.assert_close(parts_h["lo_dro"], ce.max(), atol=1e-2, rtol=0)


def _width_gradient(radius: float, centre_misses: bool) -> float:
    """d width-term / d (a common radius): only the width term, so its own pull is measured."""
    from ciar.models.interval import interval_log_bounds
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(8, 32, generator=g)
    p_cloud = torch.softmax(torch.randn(8, 32, generator=g) * 2 if centre_misses else centre, -1)
    r = torch.full((), radius, requires_grad=True)
    log_lo, log_up = interval_log_bounds(centre, r.expand_as(centre))
    _, parts = inter_dro_loss(log_lo, torch.log_softmax(centre, -1), log_up, p_cloud,
                              InterDROConfig(lambda_width=1.0))
    width = parts.pop("width")
    assert width > 0
    cfg = InterDROConfig(lambda_width=1.0, lambda_v=0.0, lambda_p=0.0, use_align=False, use_dro=False)
    loss, _ = inter_dro_loss(log_lo, torch.log_softmax(centre, -1), log_up, p_cloud, cfg)
    loss.backward()
    return float(r.grad)


def test_the_width_term_sizes_the_box_to_the_rejection_probability():
    """A narrow box around a centre that misses the cloud is widened; a wide box around a centre that matches the
    cloud (TV = 0) is narrowed. With the term off, the loss has no `width` part."""
    assert _width_gradient(0.01, centre_misses=True) < 0
    assert _width_gradient(2.0, centre_misses=False) > 0
    g = torch.Generator().manual_seed(4)
    p_cloud = torch.softmax(torch.randn(4, 16, generator=g), -1)
    log_c = torch.log(p_cloud)
    _, parts = inter_dro_loss(log_c - 0.5, log_c, log_c + 0.5, p_cloud, InterDROConfig())
    assert "width" not in parts


def test_the_rank_term_orders_u_by_disagreement():
    """The rank term is a pairwise logistic loss on log U: it is small when every position where the device's
    argmax misses the cloud's has a larger U than every position where they agree, large when reversed, and its
    gradient widens the boxes of the disagreeing positions."""
    from ciar.models.interval import interval_log_bounds
    g = torch.Generator().manual_seed(5)
    centre = torch.randn(6, 16, generator=g) * 3
    p_cloud = torch.softmax(centre, -1).clone()
    p_cloud[:3] = torch.softmax(torch.randn(3, 16, generator=g) * 3, -1)  # rows 0-2 disagree (checked below)
    disagree = centre.argmax(-1) != p_cloud.argmax(-1)
    assert disagree[:3].all() and not disagree[3:].any()
    cfg = InterDROConfig(lambda_rank=1.0, lambda_v=0.0, lambda_p=0.0, use_align=False, use_dro=False)

    def rank_loss(radius: torch.Tensor) -> torch.Tensor:
        log_lo, log_up = interval_log_bounds(centre, radius[:, None].expand_as(centre))
        return inter_dro_loss(log_lo, torch.log_softmax(centre, -1), log_up, p_cloud, cfg)[0]

    wide_where_wrong = torch.tensor([2.0] * 3 + [0.01] * 3)
    assert rank_loss(wide_where_wrong) < 0.1 < 1.0 < rank_loss(wide_where_wrong.flip(0))
    r = torch.full((6,), 0.3, requires_grad=True)
    rank_loss(r).backward()
    assert (r.grad[:3] < 0).all() and (r.grad[3:] > 0).all()


def test_the_gate_stage_learns_from_the_neighbours(t2i_config):
    """The gate stage's objective through `processed_box`: positions 'disagree' exactly where the device's argmax
    is not its left neighbour. U from h alone cannot see that (AUROC ~0.5); a few hundred steps of the rank term on
    the neighbour scale alone (everything else frozen) lift U's AUROC above 0.9."""
    from ciar.models import GPT, build_device_model, interfuse
    from ciar.training.inter_dro import rank_loss
    from ciar.training.metrics import auroc
    from conftest import randomise
    device = build_device_model(t2i_config, cloud=randomise(GPT(t2i_config)))
    g = torch.Generator().manual_seed(0)
    N, V = 1024, t2i_config.vocab_size
    centre, radius = torch.randn(2 * N, V, generator=g) * 2, torch.rand(2 * N, V, generator=g) * 0.3
    c = centre[N:] + (centre[:N] - centre[N:]) * 2.0
    continues = torch.rand(N, generator=g) < 0.5
    left = torch.where(continues, c.argmax(-1), torch.randint(0, V, (N,), generator=g))
    neighbours = torch.stack([left, torch.randint(0, V, (N,), generator=g)], -1)
    disagree = c.argmax(-1) != left

    def u() -> torch.Tensor:
        return interfuse(*device.processed_box(centre, radius, neighbours, 2.0, 1.0)).u

    before = auroc(u().detach().numpy(), disagree.numpy())
    opt = torch.optim.AdamW(device.inter_head.neighbour.parameters(), lr=1e-2)
    frozen = device.inter_head.radius.weight.clone()
    for _ in range(200):
        loss = rank_loss(u(), disagree)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = auroc(u().detach().numpy(), disagree.numpy())
    assert before < 0.7 < 0.9 < after, (before, after)
    assert torch.equal(device.inter_head.radius.weight, frozen)
    assert rank_loss(u(), torch.zeros(N, dtype=torch.bool)) is None  # one class: nothing to rank


def test_the_paired_bootstrap_of_gate_aurocs():
    """Resampling whole images: a score that ranks better gets an interval above zero, an identical one exactly
    zero, and the same seed gives the same interval."""
    import numpy as np
    from ciar.training.evaluate import _paired_bootstrap
    rng = np.random.default_rng(0)
    images, T = 40, 16
    y = rng.random(images * T) < 0.3
    good = y + rng.normal(0, 0.6, y.size)
    worse = y + rng.normal(0, 1.5, y.size)
    out = _paired_bootstrap({"interval": good, "entropy": worse, "maxprob": good.copy()}, y, images, 200, seed=1)
    lo, hi = out["interval_minus_entropy"]["ci95"]
    assert 0 < lo < out["interval_minus_entropy"]["mean"] < hi
    assert out["interval_minus_maxprob"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert _paired_bootstrap({"interval": good, "entropy": worse}, y, images, 200, seed=1)[
        "interval_minus_entropy"] == out["interval_minus_entropy"]


def test_device_layers_trains_a_deeper_device_on_an_earlier_runs_cloud(smoke_weights, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    ciar = str(Path(sys.executable).parent / "ciar")
    res = subprocess.run([ciar, "train", "builtin", "--smoke", "--out", str(tmp_path), "--device-layers", "2",
                          "--cloud-from", str(smoke_weights)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    models = load_builtin(tmp_path / "weights")
    assert models.device.config.n_layer == 2 and models.cloud.config.n_layer == load_builtin(
        smoke_weights).cloud.config.n_layer
    for stage in ("features", "vq", "text", "cloud"):  # taken as they are, not trained again
        assert not (tmp_path / f"{stage}.ckpt.pt").exists(), stage
    for part in ("cloud", "vq", "text", "features"):
        mine, theirs = load_file(tmp_path / "weights" / f"{part}.safetensors"), load_file(
            smoke_weights / f"{part}.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    meta, earlier = (json.loads((d / "builtin.json").read_text())["meta"]
                     for d in (tmp_path / "weights", smoke_weights))
    assert meta["cloud_from"] == str(smoke_weights)
    assert all(meta["stage_seconds"][s] == earlier["stage_seconds"][s] for s in ("features", "vq", "text", "cloud"))
    assert meta["stage_configs"]["device"]["n_layer"] == 2
    assert meta["stage_configs"]["cloud"] == earlier["stage_configs"]["cloud"]
    bad = subprocess.run([ciar, "train", "builtin", "--device-layers", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--device-layers: must be at least 1, got 0" in bad.stderr
    # weights without a builtin.json, or written without stage records: refused, saying what is needed
    nowhere = subprocess.run([ciar, "train", "builtin", "--smoke", "--out", str(tmp_path / "b"), "--cloud-from",
                              str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert nowhere.returncode == 2 and "missing builtin.json" in nowhere.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in smoke_weights.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((bare / "builtin.json").read_text())
    del manifest["meta"]["stage_configs"]
    (bare / "builtin.json").write_text(json.dumps(manifest))
    refused = subprocess.run([ciar, "train", "builtin", "--smoke", "--out", str(tmp_path / "c"), "--cloud-from",
                              str(bare)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--cloud-from needs weights written by `ciar train builtin`" in refused.stderr
