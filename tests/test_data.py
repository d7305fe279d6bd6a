"""Image folders: decoding once, stratified seeded splits, data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autotransfer.data.datasets import load_dataset, min_per_class, stratified_split
from autotransfer.exceptions import DataError
from autotransfer.spec.model import DataSpec, SplitSpec


def test_image_folder_is_decoded_at_image_size(tiny_images: Path) -> None:
    data = load_dataset(DataSpec(path=str(tiny_images), image_size=32))
    assert data.classes == ["blue", "green", "red"]  # sorted folder names
    assert data.images.shape == (36, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [12, 12, 12]
    red = data.images[data.labels == 2].float().mean(dim=(0, 2, 3))
    assert red[0] > red[1] + 100 and red[0] > red[2] + 100  # RGB order kept


def test_stratified_split_is_per_class_disjoint_and_seeded(tiny_images: Path) -> None:
    data = load_dataset(DataSpec(path=str(tiny_images), image_size=32))
    split = SplitSpec(train=0.5, val=0.25, test=0.25)
    s = stratified_split(data, split, seed=0)
    for part, n in ((s.train, 6), (s.val, 3), (s.test, 3)):
        assert torch.bincount(part.labels, minlength=3).tolist() == [n, n, n]
    parts = (s.train, s.val, s.test)
    rows = [tuple(img.flatten()[:64].tolist()) for p in parts for img in p.images]
    assert len(set(rows)) == len(rows), "an image is in two splits"
    again = stratified_split(data, split, seed=0)
    assert torch.equal(again.train.images, s.train.images)
    other = stratified_split(data, split, seed=1)
    assert not torch.equal(other.train.images, s.train.images)


def test_too_few_images_per_class(image_folder) -> None:
    root = image_folder(per_class=4)
    data = load_dataset(DataSpec(path=str(root), image_size=16))
    split = SplitSpec(train=0.2, val=0.2, test=0.6)
    assert min_per_class(split) == 5
    with pytest.raises(DataError, match=r"class 'blue' has 4 image\(s\).*at least 5"):
        stratified_split(data, split, seed=0)


def test_a_few_unreadable_images_are_skipped(image_folder, caplog) -> None:
    root = image_folder(per_class=12)
    (root / "red" / "999.png").write_bytes(b"not a png")  # 1 of 37: under the 10 % limit
    data = load_dataset(DataSpec(path=str(root), image_size=16))
    assert len(data) == 36
    assert "999.png" in caplog.text


def test_mostly_unreadable_images_are_an_error(image_folder) -> None:
    root = image_folder(per_class=3)
    for i in range(5):
        (root / "red" / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset(DataSpec(path=str(root), image_size=16))


def test_builtin_digits(tmp_path: Path) -> None:
    data = load_dataset(DataSpec(path="sklearn:digits", image_size=16))
    assert data.images.shape == (1797, 3, 16, 16) and len(data.classes) == 10
    with pytest.raises(DataError, match="unknown data set 'sklearn:nope'"):
        load_dataset(DataSpec(path="sklearn:nope", image_size=16))
    assert np.isin(data.labels.unique().numpy(), np.arange(10)).all()


def test_general_default_split_keeps_most_labels_for_training() -> None:
    split = SplitSpec()
    assert (split.train, split.val, split.test) == (0.6, 0.2, 0.2)


def test_given_val_and_test_sets_are_used_and_the_rest_is_split(image_folder) -> None:
    from autotransfer.data.datasets import load_splits, split_fractions

    main = image_folder("main", per_class=10)
    val = image_folder("val", per_class=3, seed=1)
    test = image_folder("test", per_class=2, seed=2)
    split = SplitSpec()  # 60/20/20
    assert split_fractions(split, ("val",)) == pytest.approx({"train": 0.75, "test": 0.25})
    assert split_fractions(split, ("val", "test")) == pytest.approx({"train": 1.0})
    spec = DataSpec(path=str(main), val=str(val), image_size=16)
    s = load_splits(spec)
    assert torch.bincount(s.val.labels).tolist() == [3, 3, 3]  # the given set, whole
    assert torch.bincount(s.train.labels).tolist() == [8, 8, 8]  # 75 % of 10
    assert torch.bincount(s.test.labels).tolist() == [2, 2, 2]
    assert torch.equal(s.val.images, load_dataset(DataSpec(path=str(val), image_size=16)).images)
    both = load_splits(spec.model_copy(update={"test": str(test)}))
    assert len(both.train) == 30 and len(both.val) == 9 and len(both.test) == 6
    # Without given sets the split is the same as before (60/20/20 of each class).
    plain = load_splits(DataSpec(path=str(main), image_size=16))
    assert (len(plain.train), len(plain.val), len(plain.test)) == (18, 6, 6)


def test_given_set_with_other_classes_is_refused(image_folder) -> None:
    from autotransfer.data.datasets import load_splits

    main = image_folder("main", per_class=10)
    fewer = image_folder("fewer", per_class=3, classes={"red": (200, 40, 40),
                                                        "blue": (40, 40, 200)})
    more = image_folder("more", per_class=3, classes={
        "red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
        "grey": (90, 90, 90)})
    with pytest.raises(DataError, match=r"data.val '.*fewer' has no examples of 'green'; "
                                        r"its classes must be those of data.path"):
        load_splits(DataSpec(path=str(main), val=str(fewer), image_size=16))
    with pytest.raises(DataError, match=r"data.test '.*more' has classes not in data.path: "
                                        r"'grey'"):
        load_splits(DataSpec(path=str(main), test=str(more), image_size=16))


def test_given_set_classes_in_another_order_are_renumbered(tmp_path: Path) -> None:
    from autotransfer.data.datasets import Splits, TextSet, _matched

    main = TextSet(["a", "b", "c"], torch.tensor([0, 1, 2]), ["x", "y", "z"])
    other = TextSet(["c", "a", "b"], torch.tensor([0, 1, 2]), ["z", "x", "y"])
    matched = _matched(other, main, "val", "v.csv", "m.csv")
    assert matched.classes == ["x", "y", "z"] and matched.labels.tolist() == [2, 0, 1]
    assert isinstance(Splits(main, matched, main).val, TextSet)
