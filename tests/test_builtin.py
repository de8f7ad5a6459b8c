"""The shipped built-in model and device bundle: they load, generate, and the bundle matches the weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ciar.models.builtin import BUILTIN_DIR, load_builtin
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import default_bundle
from ciar.training.evaluate import generate_images

PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


@pytest.fixture(scope="module")
def shipped():
    return load_builtin()


def test_shipped_weights_load_and_generate_one_image_per_mode(shipped):
    assert shipped.directory == BUILTIN_DIR
    for mode in ("cloud", "device"):
        a = generate_images(shipped, [PROMPT], mode, seed=3)
        b = generate_images(shipped, [PROMPT], mode, seed=3)
        assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)  # same seed, same image
        assert a.std() > 5  # not a blank canvas


def test_shipped_bundle_is_the_shipped_device_model(shipped):
    bundle = load_bundle(default_bundle())
    assert bundle.format == "onnx" and bundle.quantize == "int8"
    emb = np.load(bundle.file("token_embeddings"))
    torch.testing.assert_close(torch.from_numpy(emb), shipped.device.tok_embeddings.weight.detach())
    assert bundle.manifest["model"]["device_config"] == shipped.device.config.to_dict()
    q = bundle.manifest["gate"]["u_quantiles"]
    assert len(q) == 101 and all(a <= b for a, b in zip(q, q[1:]))
