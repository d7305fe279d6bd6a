"""torchvision and hf families: weights sources and errors (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotransfer.backbones.torchvision_family import TorchvisionFamily
from autotransfer.exceptions import BackboneError


def test_torchvision_offline_pretrained_is_one_line_suggesting_a_file(monkeypatch) -> None:
    import torchvision.models

    def offline(*args, **kwargs):
        if kwargs.get("weights") is not None:
            raise OSError("<urlopen error [Errno -2] Name or service not known>")
        return real(*args, **kwargs)

    real = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(BackboneError) as err:
        TorchvisionFamily().build("resnet18", weights="pretrained", num_classes=3, image_size=32)
    message = str(err.value)
    assert "\n" not in message
    assert "torchvision:resnet18@/path/to/weights.pth" in message and "resnet18-" in message


def test_torchvision_local_file_loads_and_head_is_replaced(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    family = TorchvisionFamily()
    source = family.build("resnet18", weights="none", num_classes=7, image_size=32)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = family.build("resnet18", weights=str(path), num_classes=3, image_size=32)
    assert torch.equal(loaded.model.conv1.weight, source.model.conv1.weight)
    assert loaded.model.fc.out_features == 3
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    assert loaded.extra["crop_size"] == [224]


def test_torchvision_errors_teach() -> None:
    family = TorchvisionFamily()
    with pytest.raises(BackboneError, match="no classification model 'resnet19'.*resnet18"):
        family.build("resnet19", weights="none", num_classes=3, image_size=32)
    with pytest.raises(BackboneError, match="divisible by its patch size 16"):
        family.build("vit_b_16", weights="none", num_classes=3, image_size=40)
    with pytest.raises(BackboneError, match="not found"):
        family.build("resnet18", weights="/nonexistent/w.pth", num_classes=3, image_size=32)


def test_torchvision_vit_blocks_and_features() -> None:
    """vit_b_16 at 32 px (4 patches): stem = conv_proj + class token + position
    embedding, one block per encoder layer, the final ln; features are the CLS token."""
    from autotransfer.testing.backbone_family import (
        BackboneCase,
        check_blocks_cover_trunk_exactly_once,
        check_features_classify_match_model,
    )

    case = BackboneCase(TorchvisionFamily, "vit_b_16", image_size=32)
    b = case.build()
    assert {"class_token", "encoder.pos_embedding", "conv_proj.weight"} <= set(b.blocks[0])
    assert len(b.blocks) == 1 + 12 + 1 and b.blocks[-1] == ["encoder.ln.weight", "encoder.ln.bias"]
    assert b.head == ["heads.head.weight", "heads.head.bias"]
    check_blocks_cover_trunk_exactly_once(case)
    check_features_classify_match_model(case)


def test_hf_weights_sources(tmp_path: Path, hf_model_dirs: dict[str, Path]) -> None:
    from safetensors.torch import save_file

    from autotransfer.backbones.hf_family import HFFamily

    vit = hf_model_dirs["vit"]
    family = HFFamily()
    local = family.build(str(vit), weights="pretrained", num_classes=3, image_size=32)
    again = family.build("someone/vit-tiny", weights=str(vit), num_classes=3, image_size=32)
    fresh = family.build(str(vit), weights="none", num_classes=3, image_size=32)
    emb = "embeddings.patch_embeddings.projection.weight"
    base = local.model.backbone.state_dict()
    assert torch.equal(again.model.backbone.state_dict()[emb], base[emb])
    assert not torch.equal(fresh.model.backbone.state_dict()[emb], base[emb])
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "w.safetensors"))
    from_file = family.build(str(vit), weights=str(tmp_path / "w.safetensors"), num_classes=3,
                             image_size=32)
    assert torch.equal(from_file.model.backbone.state_dict()[emb], base[emb])
    assert local.preprocessing.mean == (0.5, 0.5, 0.5)
    assert len(local.blocks) == 4  # embeddings, 2 encoder layers, final layernorm
    with pytest.raises(BackboneError, match="not found"):
        family.build(str(tmp_path / "missing"), weights="pretrained", num_classes=3, image_size=32)
