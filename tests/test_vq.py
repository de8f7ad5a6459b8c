"""The LlamaGen VQ tokenizer: official key names/shapes (strict loading), encode/decode round trips, the
straight-through quantizer and its losses, codebook neighbours, configs and input checks."""
from __future__ import annotations

import json

import pytest
import torch

from ciar.models.vq import VQ_CONFIGS, VQConfig, VQModel


def official_shaped(name: str, **changes) -> VQConfig:
    """A named official layout at a fraction of the width (ch 32 keeps the official 32 GroupNorm groups)."""
    return VQ_CONFIGS[name].replace(**{"ch": 32, "z_channels": 32, "codebook_size": 64, **changes})


def official_layout(cfg: VQConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of LlamaGen's `VQModel` state dict, enumerated from the official architecture (with `ch`,
    `num_res_blocks` and the widths taken from `cfg`)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(p: str, c_in: int, c_out: int, k: int) -> None:
        out[f"{p}.weight"], out[f"{p}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(p: str, c: int) -> None:
        out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)

    def res(p: str, c_in: int, c_out: int) -> None:
        norm(f"{p}.norm1", c_in)
        conv(f"{p}.conv1", c_in, c_out, 3)
        norm(f"{p}.norm2", c_out)
        conv(f"{p}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{p}.nin_shortcut", c_in, c_out, 1)

    def attn(p: str, c: int) -> None:
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    def mid(p: str, c: int) -> None:
        res(f"{p}.0", c, c)
        attn(f"{p}.1", c)
        res(f"{p}.2", c, c)

    ch, n, levels = cfg.ch, cfg.num_res_blocks, len(cfg.encoder_ch_mult)
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    c = ch
    for i, m in enumerate(cfg.encoder_ch_mult):
        for j in range(n):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
            c = ch * m
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, cfg.z_channels, 3)

    c = ch * cfg.decoder_ch_mult[-1]
    conv("decoder.conv_in", cfg.z_channels, c, 3)
    mid("decoder.mid", c)
    for b, i in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            res(f"decoder.conv_blocks.{b}.res.{j}", c, ch * cfg.decoder_ch_mult[i])
            c = ch * cfg.decoder_ch_mult[i]
            if i == levels - 1:
                attn(f"decoder.conv_blocks.{b}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.conv_blocks.{b}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, cfg.in_channels, 3)

    out["quantize.embedding.weight"] = (cfg.codebook_size, cfg.codebook_embed_dim)
    if cfg.codebook_show_usage:
        out["quantize.codebook_used"] = (65536,)
    conv("quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1)
    conv("post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1)
    return out


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def meta_model(cfg: VQConfig) -> VQModel:
    with torch.device("meta"):
        return VQModel(cfg)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def model(cfg: VQConfig, seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(cfg).eval()


# Read from a VQ-16 built by LlamaGen's own `tokenizer/tokenizer_image/vq_model.py`.
OFFICIAL_VQ16 = {
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "quant_conv.weight": (8, 256, 1, 1),
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.norm1.weight": (128,),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
    "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.2.conv2.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_blocks.0.res.2.conv1.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_blocks.4.res.2.conv2.bias": (128,),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


# ---- official layout ---------------------------------------------------------------------------------------------
def test_vq16_matches_official_keys_and_shapes():
    m = meta_model(VQ_CONFIGS["VQ-16"])
    sd = shapes(m)
    for key, shape in OFFICIAL_VQ16.items():
        assert sd.get(key) == shape, key
    assert len(sd) == 344  # the official VQ-16 state dict
    assert sum(p.numel() for p in m.parameters()) == 71_883_403
    assert not any(k.startswith("encoder.conv_blocks.4.downsample") or k.startswith("decoder.conv_blocks.4.upsample")
                   for k in sd)


@pytest.mark.parametrize("cfg", [VQ_CONFIGS["VQ-16"], VQ_CONFIGS["VQ-8"], VQ_CONFIGS["VQ-tiny"],
                                 official_shaped("VQ-16"), official_shaped("VQ-8", codebook_show_usage=False)],
                         ids=["VQ-16", "VQ-8", "VQ-tiny", "VQ-16-narrow", "VQ-8-narrow-no-usage"])
def test_state_dict_layout_is_official(cfg):
    assert shapes(meta_model(cfg)) == official_layout(cfg)


def test_synthetic_official_state_dict_loads_strictly():
    cfg = official_shaped("VQ-16")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in official_layout(cfg).items()}
    sd["quantize.codebook_used"] = torch.randint(0, cfg.codebook_size, (65536,), generator=g).float()
    m = VQModel(cfg)
    m.load_state_dict(sd, strict=True)
    for key, value in m.state_dict().items():
        assert torch.equal(value, sd[key]), key
    with torch.no_grad():
        recon, losses = m.eval()(images(1, 32))
    assert recon.shape == (1, 3, 32, 32) and torch.isfinite(recon).all()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        VQModel(cfg).load_state_dict({**sd, "quantize.extra": torch.zeros(1)}, strict=True)
    with pytest.raises(RuntimeError, match="codebook_used"):
        VQModel(cfg).load_state_dict({k: v for k, v in sd.items() if k != "quantize.codebook_used"}, strict=True)


# ---- encode / decode ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,size,grid", [(VQ_CONFIGS["VQ-tiny"], 64, 16), (official_shaped("VQ-8"), 32, 4)],
                         ids=["VQ-tiny", "VQ-8-narrow"])
def test_encode_decode_shapes(cfg, size, grid):
    m = model(cfg)
    x = images(2, size)
    with torch.no_grad():
        quant, codes = m.encode(x)
        recon = m.decode_code(codes)
        recon_flat = m.decode_code(codes.flatten(1))
    assert quant.shape == (2, cfg.codebook_embed_dim, grid, grid)
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < cfg.codebook_size
    assert recon.shape == x.shape
    torch.testing.assert_close(recon_flat, recon)


def test_non_square_images():
    m = model(VQ_CONFIGS["VQ-tiny"])
    with torch.no_grad():
        _, codes = m.encode(images(1, 64)[..., :32])
        recon = m.decode_code(codes.flatten(1), shape=(16, 8))
    assert codes.shape == (1, 16, 8) and recon.shape == (1, 3, 64, 32)


def test_decode_code_equals_quantizer_path():
    m = model(VQ_CONFIGS["VQ-tiny"])
    with torch.no_grad():
        quant, codes = m.encode(images(2, 64))
        via_quant = m.decode(quant)
        torch.testing.assert_close(m.decode_code(codes), via_quant, atol=1e-5, rtol=1e-4)
        # LlamaGen's call convention: flat codes and a (B, D, h, w) shape
        torch.testing.assert_close(m.decode_code(codes.flatten(1), shape=(2, 8, 16, 16)), via_quant,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.quantize.lookup(codes), quant, atol=1e-6, rtol=1e-5)


def test_l2_normalised_codebook():
    m = model(VQ_CONFIGS["VQ-tiny"])
    with torch.no_grad():
        m.quantize.embedding.weight.mul_(3.0)  # the raw weights need not be unit-norm
        quant, codes = m.encode(images(2, 64))
        looked_up = m.quantize.lookup(codes)
    torch.testing.assert_close(looked_up.norm(dim=1), torch.ones(codes.shape))
    torch.testing.assert_close(quant.norm(dim=1), torch.ones(codes.shape))
    raw = model(VQ_CONFIGS["VQ-tiny"].replace(codebook_l2_norm=False))
    with torch.no_grad():
        raw.quantize.embedding.weight.mul_(3.0)
        codes = torch.arange(6).view(1, 2, 3)
        torch.testing.assert_close(raw.quantize.lookup(codes)[0].permute(1, 2, 0).reshape(6, -1),
                                   raw.quantize.embedding.weight[:6])


# ---- quantizer losses and training ------------------------------------------------------------------------------
def small_config(**changes) -> VQConfig:
    return VQConfig(**{"codebook_size": 32, "codebook_embed_dim": 4, "encoder_ch_mult": (1, 2),
                       "decoder_ch_mult": (1, 2), "z_channels": 16, "ch": 16, "num_res_blocks": 1, "norm_groups": 8,
                       **changes})


def test_losses_and_straight_through():
    m = model(small_config()).train()
    x = images(2, 16)
    recon, losses = m(x)
    assert recon.shape == x.shape
    torch.testing.assert_close(losses.commit, 0.25 * losses.vq)  # same distance, beta-weighted
    assert losses.entropy.item() == 0.0
    _, codes = m.encode(x)
    assert losses.usage == codes.unique().numel() / 32
    # reconstruction gradients reach the encoder (straight-through) but not the codebook
    (recon - x).pow(2).mean().backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None
    losses.vq.backward()
    assert m.quantize.embedding.weight.grad.abs().sum() > 0
    # training forwards record the picked codes in the official rolling history
    torch.testing.assert_close(m.quantize.codebook_used[-codes.numel():], codes.flatten().float())
    before = m.quantize.codebook_used.clone()
    with torch.no_grad():
        m.eval()(x)
    assert torch.equal(m.quantize.codebook_used, before)


def test_entropy_loss_enabled():
    _, losses = model(small_config(entropy_loss_ratio=0.1))(images(2, 16))
    assert losses.entropy.item() != 0.0 and torch.isfinite(losses.entropy)


def test_training_reduces_reconstruction_loss():
    torch.manual_seed(0)
    m = VQModel(small_config()).train()
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        recon, losses = m(x)
        rec = (recon - x).pow(2).mean()
        opt.zero_grad()
        (rec + losses.vq + losses.commit + losses.entropy).backward()
        opt.step()
        history.append(rec.item())
    assert history[-1] < 0.7 * history[0], history


# ---- codebook neighbours ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [True, False])
def test_codebook_neighbours_match_brute_force(l2):
    m = model(small_config(codebook_size=40, codebook_l2_norm=l2))
    with torch.no_grad():
        m.quantize.embedding.weight.copy_(torch.randn(40, 4, generator=torch.Generator().manual_seed(3)))
    k = 5
    nb = m.codebook_neighbours(k, chunk=16)  # several chunks
    assert nb.shape == (40, k) and nb.dtype == torch.int64
    emb = m.quantize.codebook().double()
    for i in range(40):
        assert i not in nb[i].tolist()
        dist = [((emb[i] - emb[j]) ** 2).sum().sqrt().item() for j in range(40)]
        brute = sorted((j for j in range(40) if j != i), key=lambda j: dist[j])[:k]
        assert nb[i].tolist() == brute
        got = [dist[j] for j in nb[i].tolist()]
        assert got == sorted(got)


def test_codebook_neighbours_bad_k():
    m = model(small_config())
    for k in (0, 32):
        with pytest.raises(ValueError, match=r"k must be in \[1, 31\]"):
            m.codebook_neighbours(k)


# ---- errors -----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_helpful_errors():
    m = model(VQ_CONFIGS["VQ-tiny"])
    for bad in (torch.zeros(1, 1, 64, 64), torch.zeros(1, 3, 62, 64), torch.zeros(3, 64, 64)):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\) with H and W positive multiples of 4"):
            m.encode(bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        m.decode(torch.zeros(1, 64, 16, 16))
    with pytest.raises(ValueError, match="12x12 grid"):
        m.decode_code(torch.zeros(1, 150, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        m.decode_code(torch.full((1, 4, 4), 1024))
    with pytest.raises(ValueError, match="integer"):
        m.decode_code(torch.zeros(1, 4, 4))


# ---- configs ----------------------------------------------------------------------------------------------------
def test_configs_round_trip_and_validate():
    assert [VQ_CONFIGS[n].downsample_factor for n in ("VQ-16", "VQ-8", "VQ-tiny")] == [16, 8, 4]
    for cfg in VQ_CONFIGS.values():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert VQConfig.from_dict(d) == cfg
        assert hash(cfg) == hash(VQConfig.from_dict(d))
    tiny = VQ_CONFIGS["VQ-tiny"]
    assert (tiny.codebook_size, tiny.codebook_embed_dim, tiny.codebook_l2_norm) == (1024, 8, True)
    assert sum(p.numel() for p in meta_model(tiny).parameters()) < 2_000_000
    with pytest.raises(ValueError, match="unknown VQConfig fields"):
        VQConfig.from_dict({"codebook_size": 8, "width": 3})
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=24)
    with pytest.raises(ValueError, match="same length"):
        VQConfig(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 2))


# ---- dead-code re-initialisation ---------------------------------------------------------------------------------
def test_dead_codes_follow_the_usage_history():
    m = model(small_config())
    q = m.quantize
    q.codebook_used.copy_(torch.tensor([3, 5, 5, 7]).float().repeat(16384))
    dead = q.dead_codes()
    assert dead.shape == (32,) and dead.dtype == torch.bool
    assert dead.nonzero().flatten().tolist() == [i for i in range(32) if i not in (3, 5, 7)]
    # training forwards record their codes: a code picked in training is no longer dead
    m.train()
    _, codes, _ = q(torch.randn(1, 4, 2, 2))
    assert not q.dead_codes()[codes.flatten()].any()
    with pytest.raises(ValueError, match="codebook_used"):
        model(small_config(codebook_show_usage=False)).quantize.dead_codes()


@pytest.mark.parametrize("l2", [True, False])
def test_reinit_dead_codes_copies_encoder_outputs(l2):
    m = model(small_config(codebook_l2_norm=l2))
    q = m.quantize
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    flat = torch.nn.functional.normalize(flat, dim=-1) if l2 else flat
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 9, 30]] = True
    before = q.embedding.weight.detach().clone()
    idx = q.reinit_dead_codes(z, torch.Generator().manual_seed(1), dead=dead)
    assert idx.tolist() == [1, 4, 9, 30]
    after = q.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])  # live codes untouched
    rows = [int(((flat - after[i]).abs().sum(1) < 1e-6).nonzero()[0]) for i in idx.tolist()]
    assert len(set(rows)) == 4  # four distinct latents (drawn without replacement)
    # each latent drawn now quantizes to its new code, exactly
    z_q = q.codebook()[q.encode(flat[rows].reshape(1, 2, 2, 4).permute(0, 3, 1, 2))[1].flatten()]
    torch.testing.assert_close(z_q, flat[rows])
    # the same generator seed gives the same draw; the default mask comes from the usage history
    m2 = model(small_config(codebook_l2_norm=l2))
    m2.quantize.reinit_dead_codes(z, torch.Generator().manual_seed(1), dead=dead)
    assert torch.equal(m2.quantize.embedding.weight, q.embedding.weight)
    q.codebook_used.copy_(torch.arange(32).float().repeat(2048))
    assert q.reinit_dead_codes(z, torch.Generator().manual_seed(1)).numel() == 0


def test_reinit_dead_codes_more_dead_than_latents_and_bad_args():
    q = model(small_config()).quantize
    z = torch.randn(1, 4, 2, 2)
    idx = q.reinit_dead_codes(z, torch.Generator().manual_seed(0), dead=torch.ones(32, dtype=torch.bool))
    assert idx.numel() == 32  # with replacement: 32 codes from 4 latents
    assert q.embedding.weight.unique(dim=0).shape[0] <= 4
    with pytest.raises(ValueError, match="sample"):
        q.reinit_dead_codes(z, torch.Generator(), sample="kmeans")
    with pytest.raises(ValueError, match=r"\(32,\) mask"):
        q.reinit_dead_codes(z, torch.Generator(), dead=torch.ones(8, dtype=torch.bool))


def test_reinit_dead_codes_distance_sampling_prefers_badly_served_latents():
    q = model(small_config()).quantize
    code = q.codebook()[0].detach()
    far = -code  # the farthest point from code 0 on the sphere
    with torch.no_grad():
        q.embedding.weight.copy_(code.repeat(32, 1))  # every code at `code`: only `far` is badly served
    z = torch.cat([code.repeat(15, 1), far[None]]).reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[7] = True
    for seed in range(5):
        q.reinit_dead_codes(z, torch.Generator().manual_seed(seed), dead=dead, sample="distance")
        torch.testing.assert_close(q.codebook()[7], far)
        with torch.no_grad():
            q.embedding.weight[7] = code


def test_reinit_dead_codes_weights_restrict_the_draw():
    q = model(small_config()).quantize
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.zeros(2, 3, 3)
    weights[1, 2, 0] = 0.5  # only this latent may be drawn
    target = torch.nn.functional.normalize(z[1, :, 2, 0], dim=0)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[2, 5]] = True
    for sample in ("uniform", "distance"):
        q.reinit_dead_codes(z, torch.Generator().manual_seed(0), dead=dead, sample=sample, weights=weights)
        torch.testing.assert_close(q.codebook()[[2, 5]], target.repeat(2, 1))  # more codes than drawable latents
    with pytest.raises(ValueError, match=r"weights must be \(B, h, w\)"):
        q.reinit_dead_codes(z, torch.Generator(), dead=dead, weights=torch.ones(2, 9))
    with pytest.raises(ValueError, match="zero sampling probability"):
        q.reinit_dead_codes(z, torch.Generator(), dead=dead, weights=torch.zeros(2, 3, 3))


def test_reinit_dead_codes_limit():
    q = model(small_config()).quantize
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    before = q.embedding.weight.detach().clone()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[10:30] = True
    idx = q.reinit_dead_codes(z, torch.Generator().manual_seed(0), dead=dead, limit=5)
    assert idx.numel() == 5 and dead[idx].all() and torch.equal(idx, idx.sort().values)
    changed = (q.embedding.weight.detach() != before).any(1)
    assert changed.nonzero().flatten().tolist() == idx.tolist()
    assert q.reinit_dead_codes(z, torch.Generator(), dead=dead, limit=0).numel() == 0
    assert q.reinit_dead_codes(z, torch.Generator(), dead=dead, limit=100).numel() == 20


# ---- the VQ training stage: the v1 recipe switches ------------------------------------------------------------
def _stage_cfg(**changes):
    return {"seed": 3, "base": "VQ-tiny", "overrides": {"codebook_size": 64, "entropy_loss_ratio": 0.1},
            "steps": 4, "batch": 2, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "fg_weight": 5.0,
            "dead_code_every": 1, "dead_code_until": 4, "dead_code_sample": "distance", **changes}


def test_pixel_weights_mark_shape_pixels():
    from ciar.training.data import scene_batch
    from ciar.training.scenes import SceneStream
    from ciar.training.stages import _pixel_weights
    x, _ = scene_batch(0, 0, 4)
    assert _pixel_weights(x, 1.0) is None
    w = _pixel_weights(x, 5.0)
    _, _, scenes = SceneStream(seed=(0, 0)).batch(4)
    from ciar.training.scenes import BACKGROUND_RGB
    for img, wi, scene in zip(x, w, scenes):
        bg = torch.tensor(BACKGROUND_RGB[scene.background]).float().div(127.5).sub(1.0)
        shape_px = (img - bg[:, None, None]).abs().amax(0) > 1e-6
        assert shape_px.any()
        assert torch.equal(wi[0] == 5.0, shape_px) and torch.equal(wi[0] == 1.0, ~shape_px)


def test_pixel_weights_edge_band():
    from ciar.training.stages import _pixel_weights
    x = -torch.ones(1, 3, 8, 8)
    x[:, 0, 2:5, 2:5] = 1.0  # a 3x3 red square on black
    w = _pixel_weights(x, 1.0, 2.0)[0, 0]
    edge = torch.zeros(8, 8, dtype=torch.bool)
    edge[1:6, 1:6] = True
    edge[3, 3] = False  # the square's centre sees only the square
    assert torch.equal(w == 3.0, edge) and torch.equal(w == 1.0, ~edge)
    w = _pixel_weights(x, 5.0, 2.0)[0, 0]
    assert w[3, 3] == 5.0 and w[2, 2] == 7.0 and w[1, 1] == 3.0 and w[0, 0] == 1.0


def test_vq_stage_with_dead_code_reinit_is_deterministic_and_resumable(tmp_path, monkeypatch):
    import json

    from ciar.training import stages
    cfg = _stage_cfg()
    straight = stages.train_vq(cfg, tmp_path / "a")
    log = [json.loads(line) for line in (tmp_path / "a" / "vq.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 3] and "reinit" not in log[0] and "reinit" in log[1]
    plain = stages.train_vq({**cfg, "dead_code_every": 0}, tmp_path / "plain")  # the switch does something
    assert not torch.equal(plain.quantize.embedding.weight, straight.quantize.embedding.weight)
    again = stages.train_vq(cfg, tmp_path / "b")
    # interrupted after the step-2 checkpoint, then resumed by re-running the same call
    real_batch = stages.scene_batch

    def crash_at_2(seed, step, n):
        if step == 2:
            raise KeyboardInterrupt
        return real_batch(seed, step, n)

    monkeypatch.setattr(stages, "scene_batch", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        stages.train_vq(cfg, tmp_path / "c")
    assert torch.load(tmp_path / "c" / "vq.ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(stages, "scene_batch", real_batch)
    resumed = stages.train_vq(cfg, tmp_path / "c")
    for name, ref in straight.state_dict().items():
        assert torch.equal(again.state_dict()[name], ref), name
        assert torch.equal(resumed.state_dict()[name], ref), name


def test_vq_stage_error_sampled_reinit(tmp_path):
    from ciar.training import stages
    from ciar.training.data import scene_batch
    cfg = _stage_cfg(dead_code_sample="error", dead_code_max=8)
    a = stages.train_vq(cfg, tmp_path / "a")
    b = stages.train_vq(cfg, tmp_path / "b")
    assert torch.equal(a.quantize.embedding.weight, b.quantize.embedding.weight)
    d = stages.train_vq(_stage_cfg(), tmp_path / "distance")
    assert not torch.equal(a.quantize.embedding.weight, d.quantize.embedding.weight)
    # the error look-ahead leaves the usage history alone
    m = stages.VQModel(stages.vq_config(cfg)).train()
    opt = torch.optim.AdamW(m.parameters())
    history = m.quantize.codebook_used.clone()
    x, _ = scene_batch(0, 0, 2)
    assert stages._reinit_dead_codes(m, opt, x, 0, 1, "error") > 0
    assert torch.equal(m.quantize.codebook_used, history) and m.quantize.training
    with pytest.raises(ValueError, match="dead_code_sample"):
        stages._reinit_dead_codes(m, opt, x, 0, 1, "kmeans")


def test_shipped_vq_recipe_weights_shapes_and_v1_only_adds_dead_code_switches():
    import json

    from ciar.training.builtin import CONFIG_DIR
    from ciar.training.stages import vq_config
    shipped = json.loads((CONFIG_DIR / "vq.json").read_text())  # recipe v1b
    v1 = json.loads((CONFIG_DIR / "vq_v1.json").read_text())
    assert shipped["fg_weight"] > 1 and shipped["edge_weight"] > 0 and "dead_code_every" not in shipped
    assert v1["dead_code_every"] > 0 and v1["fg_weight"] == shipped["fg_weight"]
    cfg = vq_config(v1)
    assert (cfg.encoder_ch_mult, cfg.ch, cfg.codebook_embed_dim) == ((1, 1, 2), 32, 8)  # still VQ-tiny
