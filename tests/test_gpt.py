"""The GPT core: cached decoding equals one full causal forward; verify/rewind; CFG; masks; configs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ciar.models import GPT, GPTConfig, KVCache, gpt_config
from ciar.models.config import GPT_CONFIG_NAMES
from ciar.models.gpt import ReadOnlyKVCache, precompute_rope_2d
from conftest import randomise


def make_cond(model: GPT, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cfg.model_type == "c2i":
        return torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=g)


def decode_with_cache(model: GPT, cond: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Prefill the prefix, then feed tokens one at a time; returns logits predicting tokens[:, 0..T-1]."""
    P = model.config.cls_token_num
    out = [model(cond=cond, cache=cache, input_pos=torch.arange(P)).logits[:, -1:]]
    for i in range(tokens.shape[1] - 1):
        out.append(model(tokens=tokens[:, i:i + 1], input_pos=torch.tensor([P + i]), cache=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["t2i", "c2i"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg_batch", [False, True])
@pytest.mark.parametrize("prefix_rope", ["zero", "identity", "grid"])
def test_cached_decode_matches_full_forward(request, kind, batch, cfg_batch, prefix_rope):
    model = randomise(GPT(dataclasses.replace(request.getfixturevalue(f"{kind}_config"), prefix_rope=prefix_rope)))
    cond = make_cond(model, batch)
    if cfg_batch:
        cond = model.cfg_condition(cond)
    T = model.config.block_size
    tokens = torch.randint(0, model.config.vocab_size, (cond.shape[0], T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.image_logits(cond, tokens).logits
        cached = decode_with_cache(model, cond, tokens, model.new_cache(cond.shape[0]))
    assert full.shape == cached.shape == (cond.shape[0], T, model.config.vocab_size)
    assert (full - cached).abs().max().item() <= 1e-5
    assert full.abs().max() > 0.1  # the comparison is not vacuous


def test_cfg_halves_differ_and_null_condition(t2i_config, c2i_config):
    for cfg in (t2i_config, c2i_config):
        model = randomise(GPT(cfg))
        cond = make_cond(model, 2)
        doubled = model.cfg_condition(cond)
        assert doubled.shape[0] == 4
        logits = model(cond=doubled).logits[:, -1]
        assert not torch.allclose(logits[:2], logits[2:])
        # both null rows are identical (the same learned null condition)
        torch.testing.assert_close(logits[2], logits[3])


def test_verify_block_rewind_redecode_equals_fresh(t2i_config):
    model = randomise(GPT(t2i_config))
    P, V = model.config.cls_token_num, model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    cond = make_cond(model, 2)
    prefix = torch.randint(0, V, (2, 5), generator=g)
    drafts = torch.randint(0, V, (2, 4), generator=g)
    other = torch.randint(0, V, (2, 4), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(cond=cond, cache=cache)
        model(tokens=prefix, input_pos=torch.arange(P, P + 5), cache=cache)
        # verification: k=4 draft tokens in one forward
        block = model(tokens=drafts, input_pos=torch.arange(P + 5, P + 9), cache=cache).logits
        # rewind by 3 positions (only the first draft accepted), decode other tokens there
        redo = model(tokens=other[:, :3], input_pos=torch.arange(P + 6, P + 9), cache=cache).logits

        fresh = model.new_cache(2)
        model(cond=cond, cache=fresh)
        seq = torch.cat([prefix, drafts[:, :1], other[:, :3]], dim=1)
        ref = model(tokens=seq, input_pos=torch.arange(P, P + 9), cache=fresh).logits
        full = model(cond=cond, tokens=torch.cat([prefix, drafts], 1)).logits
    torch.testing.assert_close(redo, ref[:, -3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(block, full[:, -4:], atol=1e-5, rtol=0)
    assert (redo - block[:, 1:]).abs().max() > 1e-3  # the rewound positions really changed


def read_only_step(model: GPT, cache: KVCache, h: torch.Tensor, start: int) -> torch.Tensor:
    """One forward over a ReadOnlyKVCache of `cache`'s tensors, then the caller's write of the returned rows (what
    the exported graph and the runtime do)."""
    ro = ReadOnlyKVCache(list(cache.k), list(cache.v), cache.key_valid)
    pos = torch.arange(start, start + h.shape[1])
    logits = model.forward_embeddings(h, input_pos=pos, cache=ro).logits
    assert len(ro.new_k) == len(ro.new_v) == model.config.n_layer
    cache.k[:, :, :, pos] = torch.stack(ro.new_k)
    cache.v[:, :, :, pos] = torch.stack(ro.new_v)
    return logits


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_read_only_cache_matches_the_in_place_cache(t2i_config, kv_heads):
    """Prefill with a padded prefix, blocks, one-token steps and a rewind over stale rows: the read-only two-block
    attention gives the in-place cache's logits, and its returned rows are what the in-place cache wrote."""
    model = randomise(GPT(dataclasses.replace(t2i_config, n_kv_head=kv_heads)))
    P, V = model.config.cls_token_num, model.config.vocab_size
    cond = model.cfg_condition(make_cond(model, 1))
    mask = torch.ones(2, P, dtype=torch.bool)
    mask[:, :2] = False
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    other = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(6))
    schedule = [(tokens[:, :4], P), (tokens[:, 4:5], P + 4), (tokens[:, 5:9], P + 5), (other, P + 6),
                (tokens[:, 8:9], P + 9)]  # the 4th rewinds over written rows
    with torch.no_grad():
        ref_cache, ro_cache = model.new_cache(2), model.new_cache(2)
        ro_cache.key_valid[:, :P] = mask  # the read-only cache is not written: its key_valid is set by the caller
        prefix = model.embed_condition(cond)
        ref = [model(cond=cond, cache=ref_cache, cond_mask=mask).logits]
        got = [read_only_step(model, ro_cache, prefix, 0)]
        for block, start in schedule:
            ref.append(model(tokens=block, input_pos=torch.arange(start, start + block.shape[1]),
                             cache=ref_cache).logits)
            got.append(read_only_step(model, ro_cache, model.tok_embeddings(block), start))
            torch.testing.assert_close(ro_cache.k, ref_cache.k, atol=1e-5, rtol=0)
            torch.testing.assert_close(ro_cache.v, ref_cache.v, atol=1e-5, rtol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (ref[3][:, 1:] - ref[4]).abs().max() > 1e-3  # the rewound positions really changed
    with pytest.raises(ValueError, match="rows needs a KVCache"):
        model.forward_embeddings(prefix, input_pos=torch.zeros(2, P, dtype=torch.long), rows=torch.arange(2),
                                 cache=ReadOnlyKVCache(list(ro_cache.k), list(ro_cache.v), ro_cache.key_valid))


def test_padded_prefix_is_masked(t2i_config):
    model = randomise(GPT(t2i_config))
    cond = make_cond(model, 1)
    mask = torch.tensor([[False, False, True, True]])
    tokens = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    garbage = cond.clone()
    garbage[:, :2] = 100.0  # padded positions must not matter
    with torch.no_grad():
        a = model(cond=cond, tokens=tokens, cond_mask=mask).logits
        b = model(cond=garbage, tokens=tokens, cond_mask=mask).logits
        c = model(cond=garbage, tokens=tokens).logits
        cache = model.new_cache(1)
        P = model.config.cls_token_num
        model(cond=garbage, cache=cache, cond_mask=mask)
        d = model(tokens=tokens, input_pos=torch.arange(P, P + 6), cache=cache).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, 2:], b[:, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(d, a[:, P:], atol=1e-5, rtol=0)
    assert (b - c).abs().max() > 1e-3


def test_rope_prefix_rows_are_zero_like_llamagen(t2i_config):
    model = GPT(t2i_config)
    P = t2i_config.cls_token_num
    assert model.freqs_cis.shape == (P + t2i_config.block_size, t2i_config.head_dim // 2, 2)
    assert torch.count_nonzero(model.freqs_cis[:P]) == 0
    assert torch.allclose(model.freqs_cis[P, :, 0], torch.ones(t2i_config.head_dim // 2))  # grid (0, 0): cos=1
    assert "freqs_cis" not in model.state_dict()


def test_named_configs_match_llamagen_registry():
    expected = {"GPT-B": (12, 12, 768, 2048), "GPT-L": (24, 16, 1024, 2816), "GPT-XL": (36, 20, 1280, 3584),
                "GPT-XXL": (48, 24, 1536, 4096), "GPT-XXXL": (48, 40, 2560, 6912), "GPT-1B": (22, 32, 2048, 5632),
                "GPT-3B": (24, 32, 3200, 8704), "GPT-7B": (32, 32, 4096, 11008)}
    assert set(GPT_CONFIG_NAMES) == set(expected)
    for name, (layers, heads, dim, ffn) in expected.items():
        cfg = gpt_config(name)
        assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.ffn_hidden) == (layers, heads, dim, ffn)
    with torch.device("meta"):
        b = GPT(gpt_config("GPT-B"))
    n = sum(p.numel() for p in b.parameters())
    assert 100e6 < n < 125e6  # LlamaGen's comment: 111M
    with pytest.raises(KeyError, match="GPT-B"):
        gpt_config("GPT-Q")


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="perfect square"):
        GPTConfig(dim=64, n_head=4, n_layer=1, block_size=10)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(dim=65, n_head=4, n_layer=1)
    cfg = GPTConfig(dim=64, n_head=4, n_layer=1, block_size=16)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_input_errors(t2i_config):
    model = GPT(t2i_config)
    with pytest.raises(ValueError, match="cond, tokens"):
        model()
    with pytest.raises(ValueError, match="input_pos"):
        model(tokens=torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1))
    with pytest.raises(ValueError, match="batch"):
        model(tokens=torch.zeros(2, 1, dtype=torch.long), input_pos=torch.tensor([4]), cache=model.new_cache(1))


def test_per_row_positions_batch_sequences_of_different_lengths(t2i_config):
    """Three sequences at different positions and lengths in one forward over a shared cache (rows + (B, L)
    positions, padding written to a scratch column) give the logits of three separate cached decodes."""
    model = randomise(GPT(t2i_config))
    P, V, T = model.config.cls_token_num, model.config.vocab_size, model.config.block_size
    g = torch.Generator().manual_seed(4)
    conds = make_cond(model, 3)
    seqs = [torch.randint(0, V, (1, n), generator=g) for n in (3, 7, 5)]
    nxt = [torch.randint(0, V, (1, n), generator=g) for n in (2, 4, 1)]
    scratch = P + T
    with torch.no_grad():
        refs = []
        for c, s, x in zip(conds, seqs, nxt):
            cache = model.new_cache(1)
            model(cond=c[None], cache=cache)
            model(tokens=s, input_pos=torch.arange(P, P + s.shape[1]), cache=cache)
            refs.append(model(tokens=x, input_pos=torch.arange(P + s.shape[1], P + s.shape[1] + x.shape[1]),
                              cache=cache).logits)
        pool = KVCache.empty(model.config, 5, P + T + 1)  # 5 rows, rows 1, 3, 4 used; +1 scratch column
        rows = torch.tensor([3, 1, 4])
        model.forward_embeddings(model.embed_condition(conds), input_pos=torch.arange(P).expand(3, P),
                                 cache=pool, rows=rows)

        def batch(parts, starts):
            L = max(p.shape[1] for p in parts)
            h = torch.zeros(3, L, model.config.dim)
            pos = torch.full((3, L), scratch)
            for b, (p, s) in enumerate(zip(parts, starts)):
                h[b, : p.shape[1]] = model.tok_embeddings(p[0])
                pos[b, : p.shape[1]] = torch.arange(P + s, P + s + p.shape[1])
            return model.forward_embeddings(h, input_pos=pos, cache=pool, rows=rows).logits

        batch(seqs, [0, 0, 0])
        out = batch(nxt, [s.shape[1] for s in seqs])
    for b, ref in enumerate(refs):
        torch.testing.assert_close(out[b: b + 1, : ref.shape[1]], ref, atol=1e-5, rtol=0)
    assert (out[0, :2] - out[1, :2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="input_pos"):
        model.forward_embeddings(torch.zeros(3, 2, model.config.dim), input_pos=torch.arange(2), cache=pool,
                                 rows=rows)


# ---- the condition prefix: RoPE rule and per-word caption features -------------------------------------------
@pytest.mark.parametrize("prefix_rope", ["zero", "identity", "grid"])
def test_prefix_keys_are_zeroed_only_under_llamagen_rule(t2i_config, prefix_rope):
    """LlamaGen's "zero" rows zero the prefix keys (every image token scores every prefix token 0, whatever the
    caption says); "identity" and "grid" keep the content keys. Image positions rotate identically in all."""
    model = randomise(GPT(dataclasses.replace(t2i_config, prefix_rope=prefix_rope)))
    P, T = model.config.cls_token_num, model.config.block_size
    cond = make_cond(model, 2)
    tokens = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2)
    with torch.no_grad():
        decode_with_cache(model, cond, tokens, cache)
    prefix_keys = cache.k[:, :, :, :P]
    if prefix_rope == "zero":
        assert prefix_keys.abs().max() == 0
    else:
        assert prefix_keys.abs().min(dim=-1).values.max() > 0  # every prefix key carries content
        assert not torch.allclose(prefix_keys[:, 0], prefix_keys[:, 1])  # and differs with the caption
    zero = GPT(dataclasses.replace(t2i_config, prefix_rope="zero")).freqs_cis
    torch.testing.assert_close(model.freqs_cis[P:], zero[P:])


def test_grid_prefix_sits_at_the_cell_centres():
    """prefix_rope="grid" with 10 prefix rows on a 9 x 9 token grid: the 3 x 3 cell centres fall on tokens 1, 4, 7,
    so slot j's rotation is exactly that of the image token at its cell's centre (reading order), and the tenth
    slot's that of the image centre: an image token's score for a slot depends on their offset."""
    table = precompute_rope_2d(9, 16, 10000.0, 10, "grid")
    image = table[10:].view(9, 9, 8, 2)
    for j in range(9):
        torch.testing.assert_close(table[j], image[1 + 3 * (j // 3), 1 + 3 * (j % 3)], rtol=0, atol=1e-6)
    torch.testing.assert_close(table[9], image[4, 4], rtol=0, atol=1e-6)
    torch.testing.assert_close(table[10:], precompute_rope_2d(9, 16, 10000.0, 10, "identity")[10:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix"):
        precompute_rope_2d(9, 16, 10000.0, 10, "cells")


def test_prefix_rope_is_validated_and_round_trips(t2i_config):
    with pytest.raises(ValueError, match="prefix_rope"):
        dataclasses.replace(t2i_config, prefix_rope="rotate")
    cfg = dataclasses.replace(t2i_config, prefix_rope="identity")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in t2i_config.to_dict().items() if k != "prefix_rope"}
    assert GPTConfig.from_dict(old).prefix_rope == "zero"  # configs written before the option stay LlamaGen's


@pytest.mark.parametrize("n_slots,slot_layers,slot_identity,rope",
                         [(None, 0, False, False), (3, 0, False, False), (3, 2, True, True), (None, 0, False, True)])
def test_caption_encoder_outputs(n_slots, slot_layers, slot_identity, rope):
    from ciar.models.text import CaptionEncoder, CaptionEncoderConfig
    cfg = CaptionEncoderConfig(vocab_size=20, max_tokens=6, dim=16, n_layer=1, n_head=2, out_dim=8, n_slots=n_slots,
                               slot_layers=slot_layers, slot_identity=slot_identity, rope=rope)
    enc = randomise(CaptionEncoder(cfg)).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [3, 4, 6, 0, 0, 0]])
    mask = ids != 0
    out = enc(ids, mask)
    assert out.shape == (2, cfg.n_out, 8) and cfg.n_out == (6 if n_slots is None else 3)
    assert not torch.allclose(out[0], out[1])  # one word differs
    # padding is never a key: what sits there does not reach the words' features (nor the pooled slots)
    noisy = ids.clone()
    noisy[:, 3:] = 7
    keep = slice(None) if n_slots else slice(0, 3)
    torch.testing.assert_close(enc(noisy, mask)[:, keep], out[:, keep])
    assert CaptionEncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_caption_rope_scores_depend_only_on_relative_position():
    """The encoder's 1D RoPE: one query and one key vector placed at every position score q_i . k_j as a function
    of i - j alone (a Toeplitz matrix), which is what lets a word attend to its neighbours wherever they stand."""
    from ciar.models.gpt import apply_rotary_emb
    from ciar.models.text import rope_1d
    g = torch.Generator().manual_seed(0)
    n, d = 7, 8
    q = apply_rotary_emb(torch.randn(d, generator=g).expand(1, n, 1, d), rope_1d(n, d))[0, :, 0]
    k = apply_rotary_emb(torch.randn(d, generator=g).expand(1, n, 1, d), rope_1d(n, d))[0, :, 0]
    scores = q @ k.T
    for off in range(-n + 1, n):
        diag = torch.diagonal(scores, off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[:1], torch.diagonal(scores, 1)[:1])


def test_slot_identity_tells_equal_slots_apart():
    """With one word every slot reads the same value; only the slot code makes the read-outs differ."""
    from ciar.models.text import CaptionEncoder, CaptionEncoderConfig
    base = dict(vocab_size=20, max_tokens=4, dim=16, n_layer=1, n_head=2, out_dim=8, n_slots=3)
    ids, mask = torch.tensor([[5, 0, 0, 0]]), torch.tensor([[True, False, False, False]])
    plain = randomise(CaptionEncoder(CaptionEncoderConfig(**base))).eval()(ids, mask)
    torch.testing.assert_close(plain[:, 0], plain[:, 1])
    coded = randomise(CaptionEncoder(CaptionEncoderConfig(**base, slot_identity=True))).eval()(ids, mask)
    assert not torch.allclose(coded[:, 0], coded[:, 1])
    with pytest.raises(ValueError, match="slot_identity needs slots"):
        CaptionEncoderConfig(**{**base, "n_slots": None}, slot_identity=True)
    with pytest.raises(ValueError, match="slot_layers needs slots"):
        CaptionEncoderConfig(**{**base, "n_slots": None}, slot_layers=1)
