"""The built-in text-to-image model: shipped weights, saved and loaded as safetensors + `builtin.json`.

Trained by `ciar train builtin` (ciar.training.builtin) on the project's own procedurally generated scenes;
`load_builtin()` with no argument loads the copy that ships in this package (`models/builtin/`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import load_safetensors, save_safetensors
from .config import GPTConfig
from .device import DeviceModel, with_identity_neighbour_scale
from .gpt import GPT
from .phi import IntervalProjection, PhiConfig
from .sampling import SamplingConfig
from .text import CaptionEncoder, CaptionEncoderConfig, encode_caption
from .vq import VQConfig, VQModel

BUILTIN_DIR = Path(__file__).parent / "builtin"
FORMAT_VERSION = 1
BUILTIN_FILES = ("vq", "text", "cloud", "device", "phi")


@dataclass
class BuiltinModels:
    vq: VQModel
    text: CaptionEncoder
    cloud: GPT
    device: DeviceModel
    phi: IntervalProjection
    sampling: SamplingConfig
    caption_vocab: list[str]
    max_caption_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None  # where these weights were loaded from

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in BUILTIN_FILES}

    def codebook(self) -> torch.Tensor:
        """(V, D) float32: the VQ codebook vectors the image decoder looks codes up in (what the latent gate reads)."""
        return self.vq.quantize.codebook().detach().float()

    def cloud_to(self, device: str | torch.device) -> "BuiltinModels":
        """Put the cloud side -- the cloud GPT and phi, which conditions it -- on `device` (e.g. "cuda"); the
        caption encoder, the device model and the VQ decoder stay on the CPU, where the caption is encoded and the
        image decoded. Raises ValueError, saying what to do, for a device this machine does not have."""
        try:
            where = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"{device!r} is not a torch device (cpu, cuda, cuda:1, ...): {e}") from None
        if where.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{device!r}: no CUDA device here (torch.cuda.is_available() is False); use cpu, or a "
                             "CUDA build of torch on a machine with an NVIDIA GPU")
        if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
            raise ValueError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        self.cloud.to(where)
        self.phi.to(where)
        return self

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Captions -> the condition (n, n_out, caption_dim) from the caption encoder."""
        word_ids = {w: i for i, w in enumerate(self.caption_vocab)}
        pairs = [encode_caption(p, word_ids, self.max_caption_tokens) for p in prompts]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
        mask = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return self.text(ids, mask)


def save_builtin(models: BuiltinModels, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "configs": {"vq": models.vq.config.to_dict(), "text": models.text.config.to_dict(),
                    "cloud": models.cloud.config.to_dict(), "device": models.device.config.to_dict(),
                    "phi": models.phi.config.to_dict()},
        "sampling": dataclasses.asdict(models.sampling),
        "caption_vocab": models.caption_vocab,
        "max_caption_tokens": models.max_caption_tokens,
        "meta": models.meta,
    }
    for name, module in models.modules().items():
        save_safetensors(module, directory / f"{name}.safetensors", {"ciar_part": name})
    (directory / "builtin.json").write_text(json.dumps(manifest, indent=1))


def load_builtin(directory: Path | str | None = None) -> BuiltinModels:
    """Load the built-in models (the shipped copy by default), strictly, in eval mode."""
    directory = Path(directory) if directory is not None else BUILTIN_DIR
    manifest_path = directory / "builtin.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no built-in model at {directory} (missing builtin.json); "
                                "train one with `ciar train builtin --out DIR`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')} is not "
                         f"{FORMAT_VERSION}; retrain or update ciar")
    cfg = manifest["configs"]
    modules: dict[str, nn.Module] = {
        "vq": VQModel(VQConfig.from_dict(cfg["vq"])),
        "text": CaptionEncoder(CaptionEncoderConfig.from_dict(cfg["text"])),
        "cloud": GPT(GPTConfig.from_dict(cfg["cloud"])),
        "device": DeviceModel(GPTConfig.from_dict(cfg["device"])),
        "phi": IntervalProjection(PhiConfig.from_dict(cfg["phi"])),
    }
    for name, module in modules.items():
        state, _ = load_safetensors(directory / f"{name}.safetensors")
        if name == "device":
            state = with_identity_neighbour_scale(module, state)
        module.load_state_dict(state, strict=True)
        module.eval()
    return BuiltinModels(**modules, sampling=SamplingConfig(**manifest["sampling"]),
                         caption_vocab=manifest["caption_vocab"], max_caption_tokens=manifest["max_caption_tokens"],
                         meta=manifest.get("meta", {}), directory=directory)
