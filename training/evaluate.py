"""`ciar eval`: prompt adherence, Frechet distance and precision / recall / F1 of generated images against
ground-truth renders of the same held-out prompts, and the gate AUROC of the Inter-Head's U score."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ciar.models import SamplingConfig, entropy, interfuse, model_probs
from ciar.models.builtin import BuiltinModels
from ciar.models.generate import generate
from ciar.models.device import DeviceOutput
from ciar.models.interval import Interval, neighbour_ids

from .data import images_to_tensor, tensor_to_images
from .features import extract_features, load_feature_net
from .metrics import auroc, frechet_distance, precision_recall
from .scene_parser import adherence, adherence_batch, parse_image
from .scenes import Scene, heldout_prompts, parse_caption, render

MODES = ("cloud", "device", "vq")  # vq: real renders encoded and decoded (the ceiling of any generator)


def encode_prompts(models: BuiltinModels, prompts: list[str]) -> torch.Tensor:
    return models.encode_prompts(prompts)


@torch.inference_mode()
def generate_images(models: BuiltinModels, prompts: list[str], mode: str, seed: int,
                    sampling: SamplingConfig | None = None, batch: int = 25, progress=None) -> np.ndarray:
    """uint8 (n, 64, 64, 3) from the cloud or the device model alone (one generator seeded per batch), or, for
    mode "vq", the VQ reconstructions of the prompts' real renders."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "vq":
        return reconstruct_images(models, real_renders(prompts), batch, progress)
    model = models.cloud if mode == "cloud" else models.device
    sampling = sampling or models.sampling
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        tokens = generate(model, encode_prompts(models, chunk), sampling, gen)
        out.append(decode_tokens(models, tokens))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out)


@torch.inference_mode()
def decode_tokens(models: BuiltinModels, tokens: torch.Tensor) -> np.ndarray:
    grid = models.cloud.config.grid_size
    return tensor_to_images(models.vq.decode_code(tokens.view(-1, grid, grid)))


@torch.inference_mode()
def reconstruct_images(models: BuiltinModels, images: np.ndarray, batch: int = 25, progress=None) -> np.ndarray:
    out, vq = [], models.vq.eval()
    for start in range(0, len(images), batch):
        quant, _ = vq.encode(images_to_tensor(images[start:start + batch]))
        out.append(tensor_to_images(vq.decode(quant)))
        if progress is not None:
            progress(len(out[-1]))
    return np.concatenate(out)


def attribute_accuracy(wanted: list[Scene], parsed: list[Scene]) -> dict[str, float]:
    """Where adherence is lost, from the prompted scenes and the scenes parsed from the images: the background's
    accuracy over images, each prompted shape's cell over shapes (a parsed shape sits in it), its colour / kind /
    size over the shapes found in their cell, and the unprompted shapes per image."""
    hits = {"background": 0, "cell": 0, "colour": 0, "kind": 0, "size": 0}
    shapes = extra = 0
    for want, got in zip(wanted, parsed, strict=True):
        hits["background"] += want.background == got.background
        in_cell = {s.cell: s for s in got.shapes}
        for w in want.shapes:
            shapes += 1
            g = in_cell.get(w.cell)
            if g is not None:
                hits["cell"] += 1
                hits["colour"] += g.colour == w.colour
                hits["kind"] += g.kind == w.kind
                hits["size"] += g.size == w.size
        extra += len(in_cell.keys() - {s.cell for s in want.shapes})
    n_img, found = max(len(wanted), 1), max(hits["cell"], 1)
    return {"background": hits["background"] / n_img, "cell": hits["cell"] / max(shapes, 1),
            "colour_in_cell": hits["colour"] / found, "kind_in_cell": hits["kind"] / found,
            "size_in_cell": hits["size"] / found, "extra_shapes_per_image": extra / n_img}


def real_renders(prompts: list[str]) -> np.ndarray:
    return np.stack([render(parse_caption(p)) for p in prompts])


@dataclass
class QualityReport:
    mode: str
    prompts: int
    adherence: float
    fd: float
    fd_floor: float
    precision: float
    recall: float
    f1: float
    real_adherence: float
    attributes: dict[str, float]  # attribute_accuracy of the images


@dataclass
class QualitySample:
    """What one image set's quality is computed from, per prompt: kept to resample prompts (paired bootstrap)."""
    features: np.ndarray  # (n, d) the generated images' features
    real: np.ndarray  # (n, d) the features of the real renders of the same prompts
    adherence: np.ndarray  # (n,) each image's adherence to its caption


def quality(images: np.ndarray, prompts: list[str], mode: str, feature_net=None) -> QualityReport:
    """Metrics of `images` generated for `prompts`. The floor is the FD between the real renders of these prompts
    and of as many other held-out prompts: the FD two real sets of this size already have."""
    return quality_and_sample(images, prompts, mode, feature_net)[0]


def quality_and_sample(images: np.ndarray, prompts: list[str], mode: str,
                       feature_net=None) -> tuple[QualityReport, QualitySample]:
    """`quality`, and the per-prompt sample it was computed from."""
    n = len(prompts)
    if len(images) != n:
        raise ValueError(f"{n} prompts but {len(images)} images")
    net = feature_net or load_feature_net()
    taken = set(prompts)
    others = [p for p in heldout_prompts(max(1000, 3 * n)) if p not in taken][:n]
    real, real_other = real_renders(prompts), real_renders(others)
    f_gen, f_real, f_other = (extract_features(net, x) for x in (images, real, real_other))
    p, r, f1 = precision_recall(f_real, f_gen)
    wanted = [parse_caption(prompt) for prompt in prompts]
    parsed = [parse_image(img) for img in images]  # once, for adherence and the attribute breakdown
    scores = np.array([adherence(w, g) for w, g in zip(wanted, parsed)])
    report = QualityReport(mode=mode, prompts=n, adherence=float(np.mean(scores)),
                           fd=frechet_distance(f_real, f_gen), fd_floor=frechet_distance(f_real, f_other),
                           precision=p, recall=r, f1=f1,
                           real_adherence=float(adherence_batch(prompts, real).mean()),
                           attributes=attribute_accuracy(wanted, parsed))
    return report, QualitySample(f_gen, f_real, scores)


def paired_quality_bootstrap(samples: dict[str, QualitySample], reference: str, n: int,
                             seed: int) -> dict[str, object]:
    """FD and adherence of `reference` minus each other set's, over `n` resamples of the prompts: each resample
    draws the prompts once, for both sets and for the real renders they are compared with (seeded)."""
    if reference not in samples:
        raise ValueError(f"no images of {reference!r} to compare; have {sorted(samples)}")
    ref = samples[reference]
    k = len(ref.adherence)
    if any(len(s.adherence) != k for s in samples.values()):
        raise ValueError("paired resampling needs every set on the same prompts")
    rng = np.random.default_rng(seed)
    diffs = {name: {"fd": [], "adherence": []} for name in samples if name != reference}
    for _ in tqdm(range(n), desc="bootstrap", file=sys.stderr, leave=False):
        rows = rng.integers(0, k, k)
        real = ref.real[rows]
        fd_ref, adh_ref = frechet_distance(real, ref.features[rows]), ref.adherence[rows].mean()
        for name, d in diffs.items():
            s = samples[name]
            d["fd"].append(fd_ref - frechet_distance(real, s.features[rows]))
            d["adherence"].append(adh_ref - s.adherence[rows].mean())
    return {"resamples": n, "unit": "prompt", "reference": reference,
            "minus": {name: {m: _interval(v) for m, v in d.items()} for name, d in diffs.items()}}


def _interval(values: list[float]) -> dict[str, object]:
    """Mean and 95% percentile interval of bootstrap differences."""
    return {"mean": float(np.mean(values)), "ci95": [float(np.percentile(values, 2.5)),
                                                     float(np.percentile(values, 97.5))]}


@dataclass
class GateBatch:
    """One batch of cloud-generated sequences with both models' view of every image position."""
    tokens: torch.Tensor  # (B, T) the cloud's tokens
    p_cloud: torch.Tensor  # (B, T, V) the cloud's processed distribution
    q: torch.Tensor  # (B, T, V) the device's processed distribution
    interval: Interval  # the device's box in processed-logit space (u: (B, T))
    device: DeviceOutput  # raw device outputs at the image positions, doubled CFG batch [cond; uncond]

    @property
    def disagree(self) -> torch.Tensor:
        """(B, T) bool: the device's argmax differs from the cloud's (what a gate should predict)."""
        return self.q.argmax(-1) != self.p_cloud.argmax(-1)


@torch.inference_mode()
def gate_batches(models: BuiltinModels, prompts: list[str], seed: int, batch: int = 25) -> Iterator[GateBatch]:
    """The cloud writes each batch of `prompts` (one generator per batch, seeded from `seed`); both models then
    read the same sequences, teacher-forced."""
    s, P, G = models.sampling, models.cloud.config.cls_token_num, models.cloud.config.grid_size
    for start in range(0, len(prompts), batch):
        cond = encode_prompts(models, prompts[start:start + batch])
        tokens = generate(models.cloud, cond, s, torch.Generator().manual_seed(seed * 1_000_003 + start))
        doubled, seq = models.cloud.cfg_condition(cond), tokens[:, :-1].repeat(2, 1)
        p_cloud = model_probs(models.cloud(cond=doubled, tokens=seq).logits[:, P - 1:], s)
        out = models.device.forward_interval(cond=doubled, tokens=seq)
        out = DeviceOutput(out.centre[:, P - 1:], out.radius[:, P - 1:], out.hidden[:, P - 1:])
        iv = interfuse(*models.device.processed_box(out.centre, out.radius, neighbour_ids(tokens, G), s.cfg_scale,
                                                     s.temperature))
        yield GateBatch(tokens, p_cloud, model_probs(out.centre, s), iv, out)


def gate_auroc(models: BuiltinModels, prompts: list[str], seed: int, batch: int = 25,
               bootstrap: int = 0) -> dict[str, object]:
    """How well each device-side score predicts 'device argmax != cloud argmax' on cloud-generated sequences.

    Scores: the Inter-Head's U, the entropy of the device's processed distribution, and 1 - its max probability.
    With `bootstrap` N > 0, also a paired bootstrap over prompts (whole images resampled, seeded): the mean and
    the 2.5 / 97.5 percentiles of AUROC(U) - AUROC(other) for each other score.
    """
    scores: dict[str, list[np.ndarray]] = {"interval": [], "entropy": [], "maxprob": []}
    labels = []
    for g in gate_batches(models, prompts, seed, batch):
        labels.append(g.disagree.flatten().numpy())
        scores["interval"].append(g.interval.u.flatten().numpy())
        scores["entropy"].append(entropy(g.q).flatten().numpy())
        scores["maxprob"].append((1 - g.q.max(-1).values).flatten().numpy())
    y = np.concatenate(labels)
    result = {"prompts": len(prompts), "positions": int(y.size), "disagreement_rate": float(y.mean())}
    if y.all() or not y.any():  # e.g. barely trained weights: AUROC has no negatives (or positives) to rank
        return {**result, "auroc": {k: None for k in scores},
                "note": f"device and cloud {'disagree' if y.any() else 'agree'} at every position, so AUROC is "
                        "undefined: evaluate trained weights or more prompts"}
    result["auroc"] = {k: auroc(np.concatenate(v), y) for k, v in scores.items()}
    if bootstrap:
        result["bootstrap"] = _paired_bootstrap({k: np.concatenate(v) for k, v in scores.items()}, y,
                                                len(prompts), bootstrap, seed)
    return result


def _paired_bootstrap(scores: dict[str, np.ndarray], labels: np.ndarray, images: int, n: int,
                      seed: int) -> dict[str, object]:
    """AUROC(interval) - AUROC(other) over `n` resamples of whole images (positions are in image order)."""
    T = labels.size // images
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in scores if k != "interval"}
    for _ in tqdm(range(n), desc="bootstrap", file=sys.stderr, leave=False):
        rows = (rng.integers(0, images, images)[:, None] * T + np.arange(T)).ravel()
        y = labels[rows]
        if y.all() or not y.any():
            continue
        u = auroc(scores["interval"][rows], y)
        for k in diffs:
            diffs[k].append(u - auroc(scores[k][rows], y))
    return {"resamples": n, "unit": "prompt", **{f"interval_minus_{k}": _interval(d) for k, d in diffs.items()}}
