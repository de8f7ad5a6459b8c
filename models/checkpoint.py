"""Loading official LlamaGen checkpoints (and HF-style conversions of them); saving our own weights.

Official files (`c2i_*.pt`, `t2i_XL_stage1_256.pt`, `t2i_XL_stage2_512.pt`, `vq_ds16_*.pt`) are `torch.save`d
pickles: a raw state dict (FSDP consolidated) or a training dict `{"model": sd, "optimizer": ..., "steps": int,
"args": argparse.Namespace, ["ema": sd]}` (DeepSpeed: `"module"`, others: `"state_dict"`; VQ files add
`"discriminator"` and `"optimizer_disc"`). They are read with `weights_only=True` and an explicit allow-list
(`SAFE_GLOBALS`), so loading a file cannot run code unless the caller says the file is trusted.

Our `GPT` uses the official parameter names, so an official state dict loads strictly after unwrapping. The
HF-Llama-style layout of LANTERN's `jadohu/LlamaGen-T2I` conversion is a renaming plus a q/k/v split of `wqkv`
(`official_to_hf`, `hf_to_official`).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import GPT_CONFIG_NAMES, GPTConfig, gpt_config
from .device import DeviceModel, with_identity_neighbour_scale
from .gpt import GPT

if TYPE_CHECKING:
    from .vq import VQConfig

PathLike = str | os.PathLike
ModuleT = TypeVar("ModuleT", bound=nn.Module)
Layout = Literal["official", "hf"]

# Everything official LlamaGen training checkpoints pickle besides tensors, containers and builtins (which
# weights_only allows by default): the `args` namespace. Optimizer states are plain dicts of tensors and numbers.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_WRAPPER_KEYS = ("model", "module", "state_dict")
_WRAPPER_PREFIXES = frozenset({"module", "_orig_mod"})

_OFFICIAL_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_QKV = re.compile(r"self_attn\.([qkv]_proj)\.weight")
_QKV = ("q_proj", "k_proj", "v_proj")
# (official, HF) key prefixes inside a transformer layer, and outside the layers.
_LAYER_RENAMES = (
    ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
)
_TOP_RENAMES = (
    ("tok_embeddings.", "model.embed_tokens."),
    ("norm.", "model.norm."),
    ("output.", "lm_head."),
    ("cls_embedding.", "model.cls_embedding."),
)
_HF_PREFIXES = ("model.", "lm_head.")
_OFFICIAL_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.", "cls_embedding.")


class UntrustedCheckpointError(ValueError):
    """The checkpoint pickles a global outside the weights-only allow-list."""


class CheckpointMismatchError(ValueError):
    """A state dict does not match a model: every missing, unexpected and wrong-shaped key is listed."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if mismatched:
            parts.append("shape mismatch: " + ", ".join(
                f"{key} checkpoint {ckpt} vs model {own}" for key, ckpt, own in mismatched))
        super().__init__("checkpoint does not match the model: " + "; ".join(parts))


# ---- reading files ----------------------------------------------------------------------------------------
def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def load_checkpoint_file(path: PathLike, *, trusted: bool = False,
                         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The object stored in a `.pt`/`.pth`/`.bin` (torch.save) or `.safetensors` file.

    Pickles are loaded with `weights_only=True`, allowing only `SAFE_GLOBALS` beyond torch's defaults; a file that
    needs anything else raises `UntrustedCheckpointError`. `trusted=True` unpickles with `weights_only=False`,
    which can execute arbitrary code: use it only for files from a trusted source.
    """
    path = _existing_file(path)
    if path.suffix == ".safetensors":
        obj: Any = load_file(str(path), device=str(map_location))
    elif trusted:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    else:
        obj = _load_weights_only(path, map_location)
    if not isinstance(obj, dict):
        raise TypeError(f"{path} holds a {type(obj).__name__}, expected a dict (a state dict or a training "
                        "checkpoint)")
    return obj


def _load_weights_only(path: Path, map_location: str | torch.device) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _UNSAFE_GLOBAL.search(str(err))
        if unsafe is None:
            raise
        allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
        raise UntrustedCheckpointError(
            f"{path} pickles {unsafe.group(1)}, which weights-only loading does not allow (tensors, builtins and "
            f"{allowed} are allowed). Pass trusted=True only for files from a trusted source: unpickling "
            "can run arbitrary code.") from err


# ---- unwrapping -------------------------------------------------------------------------------------------
def extract_state_dict(obj: Any, prefer_ema: bool = False) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint object, with wrapper prefixes stripped and `freqs_cis` dropped.

    Accepts a raw dict of tensors or any nesting of `model` / `module` / `state_dict` / `ema` wrappers (other
    entries such as `optimizer`, `discriminator`, `args` are ignored). With `prefer_ema` the `ema` weights are
    taken when present (with a warning when absent, as LlamaGen's trainer falls back to `model`); otherwise
    `ema` is used only when nothing else holds weights.
    """
    found = _find_tensor_dict(obj, ("ema", *_WRAPPER_KEYS) if prefer_ema else (*_WRAPPER_KEYS, "ema"), ())
    if found is None:
        seen = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"no state dict of tensors found (looked for a raw tensor dict or one under "
                         f"{', '.join((*_WRAPPER_KEYS, 'ema'))}); top-level keys: {seen}")
    where, sd = found
    if prefer_ema and "ema" not in where:
        warnings.warn(f"prefer_ema: the checkpoint has no 'ema' weights; using {'/'.join(where) or 'the raw dict'}",
                      stacklevel=2)
    return _clean_keys(sd)


def _find_tensor_dict(obj: Any, order: tuple[str, ...],
                      where: tuple[str, ...]) -> tuple[tuple[str, ...], Mapping[str, Tensor]] | None:
    if not isinstance(obj, Mapping) or not obj:
        return None
    if all(isinstance(v, Tensor) for v in obj.values()):
        return where, obj
    for key in order:
        found = _find_tensor_dict(obj.get(key), order, (*where, key))
        if found is not None:
            return found
    return None


def _clean_key(key: str) -> str:
    """Drop leading `module.` / `_orig_mod.` components (DDP, torch.compile) and `_orig_mod` anywhere (compiled
    submodules)."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def _clean_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        clean = _clean_key(key)
        if clean.rsplit(".", 1)[-1] == "freqs_cis":
            continue
        if clean in out:
            raise ValueError(f"two checkpoint keys become {clean!r} once wrapper prefixes are stripped")
        out[clean] = value
    return out


# ---- official <-> HF layout -------------------------------------------------------------------------------
def detect_layout(sd: Mapping[str, Tensor]) -> Layout:
    """The key layout: "hf" if the keys use the HF-Llama names (`model.*`, `lm_head.*`), else "official" (a dict
    of neither kind, e.g. a VQ state dict, counts as official: no conversion applies). Mixed dicts raise
    ValueError."""
    hf = next((k for k in sd if k.startswith(_HF_PREFIXES)), None)
    official = next((k for k in sd if k.startswith(_OFFICIAL_PREFIXES)), None)
    if hf is not None and official is not None:
        raise ValueError(f"state dict mixes the HF layout ({hf}) and the official layout ({official})")
    return "hf" if hf is not None else "official"


def _rename(key: str, renames: tuple[tuple[str, str], ...], to_hf: bool) -> str:
    for official, hf in renames:
        src, dst = (official, hf) if to_hf else (hf, official)
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _check_rows(key: str, value: Tensor, rows: int, cfg: GPTConfig) -> None:
    if value.shape[0] != rows:
        raise ValueError(f"{key} has {value.shape[0]} rows but the config expects {rows} (dim {cfg.dim}, "
                         f"{cfg.n_head} heads, {cfg.kv_heads} kv heads, head_dim {cfg.head_dim})")


def official_to_hf(sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Official LlamaGen keys -> the HF-Llama-style keys of LANTERN's `jadohu/LlamaGen-T2I` conversion.

    `layers.{i}.attention.wqkv.weight` is split (q, k, v order) into `model.layers.{i}.self_attn.{q,k,v}_proj`;
    with GQA the k and v parts have `cfg.kv_heads * cfg.head_dim` rows. q/k rows are not permuted: LlamaGen's
    interleaved 2D RoPE is kept. Unknown keys (e.g. `inter_head.*`) pass through unchanged. The split parts are
    views of `wqkv`. Note: LANTERN's HF config says `rms_norm_eps=1e-6`; LlamaGen trained with 1e-5, which we keep.
    """
    q_rows, kv_rows = cfg.dim, cfg.kv_heads * cfg.head_dim
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        layer = _OFFICIAL_LAYER.fullmatch(key)
        if layer is None:
            out[_rename(key, _TOP_RENAMES, to_hf=True)] = value
            continue
        i, rest = layer.groups()
        if rest == "attention.wqkv.weight":
            _check_rows(key, value, q_rows + 2 * kv_rows, cfg)
            for name, part in zip(_QKV, value.split([q_rows, kv_rows, kv_rows])):
                out[f"model.layers.{i}.self_attn.{name}.weight"] = part
        else:
            out[f"model.layers.{i}.{_rename(rest, _LAYER_RENAMES, to_hf=True)}"] = value
    return out


def hf_to_official(sd: Mapping[str, Tensor], cfg: GPTConfig | None = None) -> dict[str, Tensor]:
    """The inverse of `official_to_hf`: q/k/v projections are concatenated into `wqkv` (their row counts are
    checked against `cfg` when given). See `official_to_hf` for the rms_norm_eps note."""
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        layer = _HF_LAYER.fullmatch(key)
        if layer is None:
            out[_rename(key, _TOP_RENAMES, to_hf=False)] = value
            continue
        i, rest = layer.groups()
        proj = _HF_QKV.fullmatch(rest)
        if proj is None:
            out[f"layers.{i}.{_rename(rest, _LAYER_RENAMES, to_hf=False)}"] = value
            continue
        if cfg is not None:
            _check_rows(key, value, cfg.dim if proj.group(1) == "q_proj" else cfg.kv_heads * cfg.head_dim, cfg)
        parts = pending.setdefault(i, {})
        parts[proj.group(1)] = value
        if len(parts) == len(_QKV):
            out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([parts[name] for name in _QKV])
            del pending[i]
    if pending:
        raise ValueError("incomplete q/k/v projections: " + "; ".join(
            f"layer {i} lacks {', '.join(n for n in _QKV if n not in parts)}" for i, parts in pending.items()))
    return out


# ---- strict loading ---------------------------------------------------------------------------------------
def _natural_key(key: str) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def load_state_dict_strict(model: ModuleT, sd: Mapping[str, Tensor]) -> ModuleT:
    """Load `sd` into `model` strictly (HF-layout dicts are converted first) and return the model.

    Persistent buffers (e.g. `cls_embedding.uncond_embedding`) are keys like parameters; non-persistent ones
    (`freqs_cis`) are not. Any mismatch raises `CheckpointMismatchError` naming every bad key.
    """
    if detect_layout(sd) == "hf":
        cfg = getattr(model, "config", None)
        sd = hf_to_official(sd, cfg if isinstance(cfg, GPTConfig) else None)
    own = model.state_dict()
    missing = sorted(own.keys() - sd.keys(), key=_natural_key)
    unexpected = sorted(sd.keys() - own.keys(), key=_natural_key)
    shared = sorted(own.keys() & sd.keys(), key=_natural_key)
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in shared if sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    model.load_state_dict(sd, strict=True)
    return model


# ---- config inference -------------------------------------------------------------------------------------
def _require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{key} is missing from the state dict")
    return sd[key]


def _n_layer(sd: Mapping[str, Tensor]) -> int:
    indices = {int(m.group(1)) for m in map(_OFFICIAL_LAYER.fullmatch, sd) if m is not None}
    if not indices:
        raise ValueError("no layers.* keys: not an official-layout GPT state dict")
    return max(indices) + 1


def _conditioning(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """model_type and its fields. c2i tables have a null-class row (num_classes + 1 rows, as LlamaGen trains with
    class dropout); t2i's cls_token_num is the number of rows of the learned null caption."""
    if "cls_embedding.embedding_table.weight" in sd:
        return dict(model_type="c2i", cls_token_num=1,
                    num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1)
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        return dict(model_type="t2i", caption_dim=sd["cls_embedding.cap_proj.fc1.weight"].shape[1],
                    cls_token_num=_require(sd, "cls_embedding.uncond_embedding").shape[0])
    raise ValueError("cannot tell c2i from t2i: neither cls_embedding.embedding_table.weight nor "
                     "cls_embedding.cap_proj.fc1.weight is present")


def _registry_n_head(dim: int) -> int:
    for name in GPT_CONFIG_NAMES:
        named = gpt_config(name)
        if named.dim == dim:
            return named.n_head
    raise ValueError(f"dim {dim} matches no LlamaGen config ({', '.join(GPT_CONFIG_NAMES)}); pass n_head=...")


def _kv_heads(sd: Mapping[str, Tensor], cfg: GPTConfig) -> int | None:
    """n_kv_head from the rows of wqkv (None when it equals n_head, as in every official model)."""
    rows = _require(sd, "layers.0.attention.wqkv.weight").shape[0]
    kv_rows, odd = divmod(rows - cfg.dim, 2)
    if odd or kv_rows <= 0 or kv_rows % cfg.head_dim:
        raise ValueError(f"layers.0.attention.wqkv.weight has {rows} rows, which is not dim {cfg.dim} plus two "
                         f"whole numbers of heads of head_dim {cfg.head_dim}")
    kv = kv_rows // cfg.head_dim
    return None if kv == cfg.n_head else kv


def infer_gpt_config(sd: Mapping[str, Tensor], **overrides: Any) -> GPTConfig:
    """A GPTConfig from an official-layout state dict; `overrides` win over anything inferred.

    Inferred: vocab_size, dim, n_layer, n_kv_head, model_type, num_classes (c2i), caption_dim and cls_token_num
    (t2i). n_head comes from the LlamaGen registry entry with the same dim, else must be given. Not in the
    weights, so defaulted unless overridden: block_size ((image_size // downsample) ** 2: 256 for 256px ds16,
    576 for 384px, 1024 for 512px), multiple_of and ffn_dim_multiplier (the w1 width is checked against them),
    rope_base, norm_eps, dropouts.
    """
    if detect_layout(sd) == "hf":
        raise ValueError("infer_gpt_config needs the official layout: convert with hf_to_official first")
    vocab_size, dim = _require(sd, "tok_embeddings.weight").shape
    fields: dict[str, Any] = dict(vocab_size=vocab_size, dim=dim, n_layer=_n_layer(sd), **_conditioning(sd))
    fields.update(overrides)
    if "n_head" not in fields:
        fields["n_head"] = _registry_n_head(fields["dim"])
    cfg = GPTConfig.from_dict(fields)
    if "n_kv_head" not in overrides:
        cfg = cfg.replace(n_kv_head=_kv_heads(sd, cfg))
    ffn_rows = _require(sd, "layers.0.feed_forward.w1.weight").shape[0]
    if ffn_rows != cfg.ffn_hidden:
        raise ValueError(f"layers.0.feed_forward.w1.weight has {ffn_rows} rows but the config's ffn_hidden is "
                         f"{cfg.ffn_hidden} (multiple_of={cfg.multiple_of}, ffn_dim_multiplier="
                         f"{cfg.ffn_dim_multiplier}); pass matching multiple_of / ffn_dim_multiplier")
    return cfg


def _overrides_from_args(obj: Mapping[str, Any]) -> dict[str, Any]:
    """block_size from a training checkpoint's `args` (image_size, downsample_size), when recorded."""
    args = obj.get("args")
    if isinstance(args, argparse.Namespace) and hasattr(args, "image_size") and hasattr(args, "downsample_size"):
        return {"block_size": (args.image_size // args.downsample_size) ** 2}
    return {}


# ---- loaders ----------------------------------------------------------------------------------------------
def load_gpt(path: PathLike, *, config: GPTConfig | None = None, trusted: bool = False, prefer_ema: bool = False,
             device_model: bool = False, **overrides: Any) -> GPT:
    """A GPT (a `DeviceModel` with `device_model`) loaded strictly from an official, HF-layout or own file, in
    eval mode on the CPU.

    Without `config` the config is inferred (`infer_gpt_config`, given `overrides`; block_size is taken from the
    checkpoint's training args when present, else pass it: it sets the 2D RoPE grid).
    """
    if config is not None and overrides:
        raise ValueError(f"pass either config or overrides for infer_gpt_config, not both: {sorted(overrides)}")
    obj = load_checkpoint_file(path, trusted=trusted)
    sd = extract_state_dict(obj, prefer_ema)
    if detect_layout(sd) == "hf":
        sd = hf_to_official(sd, config)
    cfg = config or infer_gpt_config(sd, **{**_overrides_from_args(obj), **overrides})
    if device_model:
        model = DeviceModel(cfg)
        return load_state_dict_strict(model, with_identity_neighbour_scale(model, sd)).eval()
    return load_state_dict_strict(GPT(cfg), sd).eval()


def load_vq(path: PathLike, config: VQConfig | str, trusted: bool = False) -> nn.Module:
    """A VQ tokenizer (`ciar.models.vq.VQModel`) loaded strictly, in eval mode.

    `config` is a VQConfig or a name in `VQ_CONFIGS` ("VQ-16", ...). Only the `model` weights are read (or `ema`
    when it is the only one); `discriminator`, `optimizer` and `optimizer_disc` entries are ignored.
    """
    from .vq import VQ_CONFIGS, VQModel

    cfg = VQ_CONFIGS[config] if isinstance(config, str) else config
    sd = extract_state_dict(load_checkpoint_file(path, trusted=trusted))
    return load_state_dict_strict(VQModel(cfg), sd).eval()


# ---- our own weights --------------------------------------------------------------------------------------
def _standalone_tensors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous tensors, cloning any that share storage with an earlier one (tied weights)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[key] = value
    return out


def save_safetensors(model_or_sd: nn.Module | Mapping[str, Tensor], path: PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a model's state dict (or a tensor dict) to a `.safetensors` file with string metadata."""
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    save_file(_standalone_tensors(sd), str(path), metadata=metadata)


def load_safetensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict on the CPU, metadata) from a `.safetensors` file."""
    path = _existing_file(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
