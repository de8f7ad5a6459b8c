"""`ciar train builtin`: every stage of the built-in text-to-image model, from scratch, resumable.

Stages and their configs (`training/configs/<stage>.json`): features (the evaluator's feature network) -> vq ->
text (the caption encoder, pre-trained to read the layout, then frozen) -> cloud (GPT) -> device (Inter-DRO) ->
gate (the Inter-Head's neighbour scale, on the rank term) -> phi. Checkpoints and loss logs go to the run directory; the final weights are written as safetensors plus
`builtin.json` (every config, the sampling defaults) into `<run>/weights`, the layout that
`ciar.models.builtin.load_builtin` reads and that ships in `models/builtin/`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciar.models.builtin import BuiltinModels, load_builtin, save_builtin
from ciar.models.sampling import SamplingConfig
from ciar.models.vq import VQModel

from ciar.models.checkpoint import save_safetensors

from . import stages
from .loop import trained_seconds
from .features import FEATURES_FILE, load_feature_net, train_features
from .scenes import CAPTION_VOCAB, MAX_CAPTION_TOKENS

STAGES = ("features", "vq", "text", "cloud", "device", "gate", "phi")
CONFIG_DIR = Path(__file__).parent / "configs"
# --smoke: a few steps of every stage on tiny batches (checks the pipeline end to end in seconds)
SMOKE = {"steps": 2, "batch": 2, "ckpt_every": 1, "warmup": 1}


def load_stage_configs(config_dir: Path = CONFIG_DIR, smoke: bool = False) -> dict[str, dict[str, Any]]:
    configs = {}
    for stage in STAGES:
        path = config_dir / f"{stage}.json"
        if not path.exists():
            raise FileNotFoundError(f"missing stage config {path}")
        configs[stage] = json.loads(path.read_text())
        if smoke:
            configs[stage].update(SMOKE)
            if "sequences" in configs[stage]:
                configs[stage]["sequences"] = 2
    return configs


CLOUD_SIDE = ("features", "vq", "text", "cloud")  # the stages `cloud_from` takes from trained weights


def train_builtin(out: Path, smoke: bool = False, config_dir: Path = CONFIG_DIR,
                  threads: int | None = None, device_layers: int | None = None,
                  cloud_from: Path | None = None) -> Path:
    """Train (or resume) every stage into `out`; returns the weights directory. `device_layers` overrides the
    device model's depth (device.json's `n_layer`; METHOD.md's device is one layer). `cloud_from`, a weights
    directory (e.g. the shipped `models/builtin`), supplies the features, VQ, caption encoder and cloud as they
    are, with their configs and stage times; only the device, gate and phi stages train."""
    if threads:
        torch.set_num_threads(threads)
    if device_layers is not None and device_layers < 1:
        raise ValueError(f"device_layers must be >= 1, got {device_layers}")
    out.mkdir(parents=True, exist_ok=True)
    cfgs = load_stage_configs(config_dir, smoke)
    if device_layers is not None:
        cfgs["device"]["n_layer"] = device_layers
    reused = _load_cloud_side(cloud_from) if cloud_from is not None else None
    if reused is not None:
        cfgs.update({stage: reused.meta["stage_configs"][stage] for stage in CLOUD_SIDE})
    (out / "configs.json").write_text(json.dumps(cfgs, indent=2))
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        s = time.perf_counter()
        result = fn()
        # the checkpoint's training time, so that resuming a finished run (e.g. to --install) keeps the real one
        trained = trained_seconds(out, name)
        timings[name] = round(time.perf_counter() - s if trained is None else trained, 1)
        return result

    if reused is None:
        features = timed("features", lambda: train_features(cfgs["features"], out))
        vq = timed("vq", lambda: stages.train_vq(cfgs["vq"], out))
        text = timed("text", lambda: stages.train_text(cfgs["text"], out))
        cloud = timed("cloud", lambda: stages.train_cloud(cfgs["cloud"], vq, text, out))
    else:
        features, vq, cloud = reused.features, reused.vq, reused.models
        timings.update({stage: reused.meta["stage_seconds"][stage] for stage in CLOUD_SIDE})
    device = timed("device", lambda: stages.train_device(cfgs["device"], vq, cloud, out))
    device = timed("gate", lambda: stages.train_gate(cfgs["gate"], cloud, device, out))
    phi = timed("phi", lambda: stages.train_phi(cfgs["phi"], vq, cloud, device, out))

    sampling = SamplingConfig(cfg_scale=cfgs["device"]["cfg_scale"], temperature=1.0)
    models = BuiltinModels(vq=vq, text=cloud.text, cloud=cloud.cloud, device=device, phi=phi, sampling=sampling,
                           caption_vocab=list(CAPTION_VOCAB), max_caption_tokens=MAX_CAPTION_TOKENS,
                           meta={"stage_seconds": timings, "total_seconds": round(sum(timings.values()), 1),
                                 "smoke": smoke, "stage_configs": cfgs,
                                 **({"cloud_from": str(cloud_from)} if cloud_from is not None else {})})
    weights = out / "weights"
    save_builtin(models, weights)
    save_safetensors(features, weights / FEATURES_FILE, {"ciar_part": "features"})
    return weights


class CloudFromError(ValueError):
    """`cloud_from` names weights that do not record how their cloud-side stages were trained."""


@dataclass
class _CloudSide:
    features: nn.Module
    vq: VQModel
    models: stages.CloudModels
    meta: dict[str, Any]


def _load_cloud_side(directory: Path) -> _CloudSide:
    """The cloud-side stages of a trained model, frozen, with the configs and stage times it was trained with."""
    built = load_builtin(directory)
    recorded = [built.meta.get(key, {}) for key in ("stage_configs", "stage_seconds")]
    missing = [s for s in CLOUD_SIDE if not all(s in r for r in recorded)]
    if missing:
        raise CloudFromError(f"{directory}/builtin.json records no stage config or time for {', '.join(missing)}; "
                             "--cloud-from needs weights written by `ciar train builtin`")
    return _CloudSide(load_feature_net(directory), built.vq, stages.CloudModels(built.text, built.cloud), built.meta)
