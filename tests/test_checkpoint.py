"""Checkpoint loading: official wrappers and key layout, weights-only safety, strict errors, HF layout, safetensors.

Official weights cannot be downloaded here, so files are synthetic state dicts with the official key names, built
from our own GPT with tiny configs; the official GPT-XL t2i shapes are checked on the meta device.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ciar.models import GPT, DeviceModel, GPTConfig, gpt_config
from ciar.models.checkpoint import (
    CheckpointMismatchError,
    UntrustedCheckpointError,
    detect_layout,
    extract_state_dict,
    hf_to_official,
    infer_gpt_config,
    load_checkpoint_file,
    load_gpt,
    load_safetensors,
    load_state_dict_strict,
    official_to_hf,
    save_safetensors,
)
from conftest import randomise

# What a tiny config cannot be inferred from: no registry entry has dim 64, FFN rounding, token grid.
TINY_OVERRIDES = dict(n_head=4, multiple_of=32, block_size=16)


class RunInfo:
    """A custom class a training script might pickle: not on the weights-only allow-list."""

    def __init__(self, note: str) -> None:
        self.note = note


def make_cond(cfg: GPTConfig, batch: int = 2, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg.model_type == "c2i":
        return torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=g)


def logits(model: GPT) -> Tensor:
    """Teacher-forced logits in eval mode (dropout off) for a fixed condition and token sequence."""
    model.eval()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.image_logits(make_cond(cfg), tokens).logits


@pytest.fixture(params=["c2i", "t2i"])
def source(request) -> GPT:
    """A tiny GPT with every weight (and the null caption) randomised."""
    torch.manual_seed(0)
    return randomise(GPT(request.getfixturevalue(f"{request.param}_config")))


def prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def optimizer_state(model: GPT) -> dict:
    """A real AdamW state after one step, as official training checkpoints carry."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt.state_dict()


WRAPPERS: dict[str, Callable[[GPT], dict]] = {
    "raw_fsdp": lambda m: m.state_dict(),
    "model_training": lambda m: {"model": m.state_dict(), "optimizer": optimizer_state(m), "steps": 5000,
                                 "args": argparse.Namespace(gpt_model="GPT-B", image_size=64, downsample_size=16)},
    "module_deepspeed": lambda m: {"module": m.state_dict(), "global_steps": 7},
    "state_dict": lambda m: {"state_dict": m.state_dict()},
    "nested": lambda m: {"state_dict": {"module": m.state_dict()}},
    "compiled_ddp_prefixes": lambda m: {"model": prefixed(m.state_dict(), "module._orig_mod.")},
    "orig_mod_prefix": lambda m: {"model": prefixed(m.state_dict(), "_orig_mod.")},
    "freqs_cis": lambda m: {"model": {**m.state_dict(), "freqs_cis": m.freqs_cis.clone()}},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_every_wrapper_loads_strictly_with_same_logits(source, wrapper, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(WRAPPERS[wrapper](source), path)
    loaded = load_gpt(path, **TINY_OVERRIDES)
    assert loaded.config == source.config
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(source))


def test_prefer_ema_picks_ema_weights(source, tmp_path):
    other = randomise(GPT(source.config), seed=7)
    path = tmp_path / "ema.pt"
    torch.save({"model": other.state_dict(), "ema": source.state_dict(), "steps": 1}, path)
    assert torch.equal(logits(load_gpt(path, prefer_ema=True, **TINY_OVERRIDES)), logits(source))
    assert torch.equal(logits(load_gpt(path, **TINY_OVERRIDES)), logits(other))
    with pytest.warns(UserWarning, match="no 'ema'"):
        extract_state_dict({"model": other.state_dict()}, prefer_ema=True)


def test_training_args_namespace_loads_weights_only_and_sets_block_size(source, tmp_path):
    args = argparse.Namespace(gpt_model="GPT-B", image_size=64, downsample_size=16, lr=1e-4, ema=True)
    path = tmp_path / "train.pt"
    torch.save({"model": source.state_dict(), "steps": 3, "args": args}, path)
    assert load_checkpoint_file(path)["args"] == args
    loaded = load_gpt(path, n_head=4, multiple_of=32)  # block_size (64 // 16) ** 2 comes from args
    assert loaded.config == source.config


def test_custom_class_needs_trusted(source, tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"model": source.state_dict(), "info": RunInfo("run 3")}, path)
    with pytest.raises(UntrustedCheckpointError, match="trusted=True") as err:
        load_checkpoint_file(path)
    assert "RunInfo" in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(UntrustedCheckpointError):
        load_gpt(path, **TINY_OVERRIDES)
    assert load_checkpoint_file(path, trusted=True)["info"].note == "run 3"
    assert torch.equal(logits(load_gpt(path, trusted=True, **TINY_OVERRIDES)), logits(source))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "c2i_B_256.pt"
    with pytest.raises(FileNotFoundError, match="c2i_B_256.pt"):
        load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match="c2i_B_256.pt"):
        load_safetensors(path)


def test_no_state_dict_lists_top_level_keys():
    with pytest.raises(ValueError, match=r"top-level keys: \['optimizer', 'steps'\]"):
        extract_state_dict({"optimizer": {"state": {}}, "steps": 3})


def test_mismatch_names_every_bad_key_and_both_shapes(t2i_config):
    sd = GPT(t2i_config).state_dict()
    del sd["layers.1.attention.wqkv.weight"], sd["cls_embedding.uncond_embedding"]
    sd["output.weight"] = torch.zeros(5, t2i_config.dim)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(GPT(t2i_config), sd)
    msg = str(err.value)
    assert "missing: cls_embedding.uncond_embedding, layers.1.attention.wqkv.weight;" in msg  # buffers count
    assert "unexpected: extra.weight" in msg
    assert "shape mismatch: output.weight checkpoint (5, 64) vs model (48, 64)" in msg
    assert "freqs_cis" not in msg
    assert err.value.mismatched == [("output.weight", (5, 64), (48, 64))]


def test_official_hf_round_trip_is_exact(source):
    cfg = source.config
    sd = source.state_dict()
    hf = official_to_hf(sd, cfg)
    assert detect_layout(sd) == "official" and detect_layout(hf) == "hf"
    kv_rows = cfg.kv_heads * cfg.head_dim
    assert hf["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.dim, cfg.dim)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (kv_rows, cfg.dim)
    assert hf["model.layers.1.self_attn.v_proj.weight"].shape == (kv_rows, cfg.dim)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"} <= set(hf)
    assert all(k.startswith("model.cls_embedding.") for k in hf if "cls_embedding" in k)
    back = hf_to_official(hf, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = official_to_hf(back, cfg)
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)


def test_gqa_shapes_are_taken_from_the_config(c2i_config):
    assert c2i_config.kv_heads < c2i_config.n_head
    sd = GPT(c2i_config).state_dict()
    with pytest.raises(ValueError, match="rows"):
        official_to_hf(sd, c2i_config.replace(n_kv_head=None))
    hf = official_to_hf(sd, c2i_config)
    with pytest.raises(ValueError, match="rows"):
        hf_to_official(hf, c2i_config.replace(n_kv_head=None))
    del hf["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="layer 1 lacks v_proj"):
        hf_to_official(hf, c2i_config)


def test_hf_layout_file_gives_identical_logits(source, tmp_path):
    cfg = source.config
    official_path, hf_path = tmp_path / "official.pt", tmp_path / "hf.safetensors"
    torch.save({"model": source.state_dict()}, official_path)
    save_safetensors(official_to_hf(source.state_dict(), cfg), hf_path)  # q/k/v views of wqkv share storage
    from_official = load_gpt(official_path, config=cfg)
    from_hf = load_gpt(hf_path, config=cfg)
    assert torch.equal(logits(from_hf), logits(from_official))
    assert load_gpt(hf_path, **TINY_OVERRIDES).config == cfg
    strict = load_state_dict_strict(GPT(cfg), official_to_hf(source.state_dict(), cfg))
    assert torch.equal(logits(strict), logits(from_official))


def test_mixed_layout_is_refused(c2i_config):
    sd = GPT(c2i_config).state_dict()
    sd["lm_head.weight"] = sd.pop("output.weight")
    with pytest.raises(ValueError, match="mixes"):
        detect_layout(sd)


def test_infer_gpt_config_recovers_tiny_configs(source):
    cfg = source.config
    sd = source.state_dict()
    assert infer_gpt_config(sd, **TINY_OVERRIDES) == cfg
    with pytest.raises(ValueError, match="n_head"):
        infer_gpt_config(sd, multiple_of=32, block_size=16)
    with pytest.raises(ValueError, match="ffn_hidden"):
        infer_gpt_config(sd, n_head=4, block_size=16)  # default multiple_of=256 gives a wider FFN


def test_device_model_round_trip(c2i_config, tmp_path):
    torch.manual_seed(0)
    device = randomise(DeviceModel(c2i_config.replace(n_layer=1)))
    path = tmp_path / "device.pt"
    torch.save({"model": device.state_dict()}, path)
    loaded = load_gpt(path, device_model=True, **TINY_OVERRIDES)
    assert isinstance(loaded, DeviceModel) and loaded.config == device.config
    cond, tokens = make_cond(device.config), torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        a, b = (m.forward_interval(cond=cond, tokens=tokens) for m in (device, loaded))
    assert torch.equal(a.centre, b.centre) and torch.equal(a.radius, b.radius)
    hf = official_to_hf(device.state_dict(), device.config)
    assert "inter_head.radius.weight" in hf and hf_to_official(hf).keys() == device.state_dict().keys()
    with pytest.raises(CheckpointMismatchError, match="unexpected: inter_head.neighbour.0.bias, .*inter_head.radius.weight"):
        load_gpt(path, **TINY_OVERRIDES)


# GPT-XL t2i as released (t2i_XL_stage1_256.pt): hard-coded official names and shapes.
OFFICIAL_XL_T2I_SHAPES = {
    "tok_embeddings.weight": (16384, 1280),
    "cls_embedding.cap_proj.fc1.weight": (1280, 2048),
    "cls_embedding.cap_proj.fc2.weight": (1280, 1280),
    "cls_embedding.uncond_embedding": (120, 2048),
    "layers.0.attention.wqkv.weight": (3840, 1280),
    "layers.0.attention.wo.weight": (1280, 1280),
    "layers.0.feed_forward.w1.weight": (3584, 1280),
    "layers.35.feed_forward.w2.weight": (1280, 3584),
    "layers.35.ffn_norm.weight": (1280,),
    "norm.weight": (1280,),
    "output.weight": (16384, 1280),
}


def test_official_gpt_xl_t2i_key_names_and_shapes():
    cfg = gpt_config("GPT-XL", model_type="t2i", cls_token_num=120, caption_dim=2048)
    with torch.device("meta"):
        model = GPT(cfg)
    sd = model.state_dict()
    assert {k: tuple(sd[k].shape) for k in OFFICIAL_XL_T2I_SHAPES} == OFFICIAL_XL_T2I_SHAPES
    assert "layers.36.attention.wo.weight" not in sd and "freqs_cis" not in sd
    assert infer_gpt_config(sd) == cfg  # n_head from the registry; block_size 256 is the stage-1 default
    hf = official_to_hf(sd, cfg)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (1280, 1280)
    assert hf["model.cls_embedding.uncond_embedding"].shape == (120, 2048)


def test_safetensors_round_trip_with_metadata(source, tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "transposed": base.T, "row": base[1]}
    path = tmp_path / "w.safetensors"
    meta = {"config": '{"dim": 64}', "step": "12"}
    save_safetensors(sd, path, meta)
    loaded, loaded_meta = load_safetensors(path)
    assert loaded_meta == meta
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    model_path = tmp_path / "model.safetensors"
    save_safetensors(source, model_path)
    weights, empty = load_safetensors(model_path)
    assert empty == {}
    assert torch.equal(logits(load_state_dict_strict(GPT(source.config), weights)), logits(source))
    with pytest.raises(TypeError, match="str"):
        save_safetensors(sd, path, {"step": 12})  # type: ignore[dict-item]


def test_load_checkpoint_file_reads_safetensors(source, tmp_path):
    path = tmp_path / "raw.safetensors"
    save_safetensors(source, path)
    sd = load_checkpoint_file(path)
    assert sd.keys() == source.state_dict().keys()
