"""The evaluator's fixed feature space: a small CNN trained once on ground-truth renders to recognise scene
attributes; its penultimate layer (128-d) is where Frechet distance and precision / recall are measured.

Trained by the `features` stage of `ciar train builtin` and shipped with the built-in weights, so every FD in
this project is measured in the same space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import images_to_tensor
from .loop import cosine_schedule, run_loop
from .scenes import BACKGROUNDS, CELLS, COLOURS, KINDS, SIZES, Scene, SceneStream

FEATURE_DIM = 128
FEATURES_FILE = "features.safetensors"  # stored beside the built-in weights (ciar.models.builtin)
# per cell: empty or (kind, colour, size) of the shape there; plus the background
_CELL_CLASSES = 1 + len(KINDS) * len(COLOURS) * len(SIZES)


def scene_labels(scene: Scene) -> np.ndarray:
    """(9 cell classes..., background) as integers."""
    labels = np.zeros(len(CELLS) + 1, dtype=np.int64)
    for s in scene.shapes:
        k, c, z = KINDS.index(s.kind), COLOURS.index(s.colour), SIZES.index(s.size)
        labels[CELLS.index(s.cell)] = 1 + (k * len(COLOURS) + c) * len(SIZES) + z
    labels[-1] = BACKGROUNDS.index(scene.background)
    return labels


class SceneFeatureNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*layers)  # 64 -> 4
        self.embed = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        self.cells = nn.Linear(FEATURE_DIM, len(CELLS) * _CELL_CLASSES)
        self.background = nn.Linear(FEATURE_DIM, len(BACKGROUNDS))

    def features(self, x: Tensor) -> Tensor:
        """x (B, 3, 64, 64) in [-1, 1] -> (B, FEATURE_DIM)."""
        return F.silu(self.embed(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.cells(f).view(-1, len(CELLS), _CELL_CLASSES), self.background(f)


def train_features(cfg: dict[str, Any], out: Path) -> SceneFeatureNet:
    torch.manual_seed(cfg["seed"])
    net = SceneFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"])
    sched = cosine_schedule(opt, cfg["steps"], cfg.get("warmup", 20))

    def step(i: int) -> dict[str, float]:
        images, _, scenes = SceneStream(seed=(cfg["seed"], i)).batch(cfg["batch"])
        labels = torch.from_numpy(np.stack([scene_labels(s) for s in scenes]))
        cells, bg = net(images_to_tensor(images))
        loss = F.cross_entropy(cells.flatten(0, 1), labels[:, :-1].flatten()) + F.cross_entropy(bg, labels[:, -1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (cells.argmax(-1) == labels[:, :-1]).float().mean()
        return {"loss": loss.item(), "cell_acc": acc.item()}

    run_loop("features", {"features": net}, opt, step, cfg["steps"], out, cfg.get("ckpt_every", 200), scheduler=sched)
    return net


@torch.inference_mode()
def extract_features(net: SceneFeatureNet, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 (n, 64, 64, 3) -> float (n, FEATURE_DIM)."""
    net.eval()
    return np.concatenate([net.features(images_to_tensor(images[i:i + batch])).numpy()
                           for i in range(0, len(images), batch)])


def load_feature_net(directory: Path | None = None) -> SceneFeatureNet:
    """The feature network stored with the built-in weights in `directory` (default: the shipped ones)."""
    from ciar.models.builtin import BUILTIN_DIR
    from ciar.models.checkpoint import load_safetensors

    path = Path(directory or BUILTIN_DIR) / FEATURES_FILE
    if not path.exists():
        raise FileNotFoundError(f"no evaluator feature network at {path}; train it with `ciar train builtin`")
    net = SceneFeatureNet()
    net.load_state_dict(load_safetensors(path)[0], strict=True)
    return net.eval()
