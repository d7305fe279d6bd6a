"""The shipped conformance suite (autotransfer.testing.backbone_family) run on the
built-in families: timm's test models, small torchvision models, tiny random-init
Hugging Face configs (ViT, ConvNeXt, and BERT, DistilBERT and RoBERTa text
encoders with a tokenizer the tests write). torchvision's vit_b_16 (86 M
parameters) is checked once in test_backbone_families.py; the toy plugin runs the
suite in test_plugins.py. The exportability check (TorchScript and ONNX) runs on
one model of each kind (EXPORTED); the others are exported in test_export.py,
test_mixed_families.py and test_text_export.py, and tracing the larger ones here
would cost about a minute."""

from __future__ import annotations

import pytest

from autotransfer.backbones.timm_family import TimmFamily
from autotransfer.backbones.torchvision_family import TorchvisionFamily
from autotransfer.testing.backbone_family import *  # noqa: F403  (the suite's tests)
from autotransfer.testing.backbone_family import BackboneCase

CASES = [
    ("timm", "test_efficientnet"),
    ("timm", "test_resnet"),
    ("timm", "test_vit"),
    ("torchvision", "resnet18"),
    ("torchvision", "mobilenet_v3_small"),
    ("hf", "vit"),
    ("hf", "convnext"),
    ("hf", "bert"),  # a text encoder: inputs are sentences its own tokenizer encodes
    ("hf", "distilbert"),  # layers under `transformer`, no pooler
    ("hf", "roberta"),  # position ids offset by the padding index
]


EXPORTED = {("timm", "test_resnet"), ("hf", "vit"), ("hf", "bert")}


@pytest.fixture(params=CASES, ids=[f"{f}:{m}" for f, m in CASES], scope="module")
def backbone_case(request: pytest.FixtureRequest) -> BackboneCase:
    family, model = request.param
    export = (family, model) in EXPORTED
    if family == "timm":
        return BackboneCase(TimmFamily, model, image_size=32, export=export)
    if family == "torchvision":
        return BackboneCase(TorchvisionFamily, model, image_size=32, export=export)
    from autotransfer.backbones.hf_family import HFFamily

    if model in ("bert", "distilbert", "roberta"):
        from _text_helpers import save_tiny_bert

        root = request.getfixturevalue("tmp_path_factory").mktemp(model)
        path = save_tiny_bert(root, model_type=model)
        return BackboneCase(HFFamily, str(path), weights="pretrained", export=export)
    path = request.getfixturevalue("hf_model_dirs")[model]
    # The directory is the model and its weights: hf:<dir> loads it offline.
    return BackboneCase(HFFamily, str(path), weights="pretrained", image_size=32,
                        export=export)
