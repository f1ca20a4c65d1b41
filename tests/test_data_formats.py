"""mini-ImageNet (3 layouts), CIFAR-FS / FC100 and image folders, on small data written in each real format."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import CIFARFSDataModule, ConfigError, DataError, FC100DataModule, ImageFolderDataModule, MiniImageNetDataModule
from datamodules.cifar import SPLITS_DIR
from datamodules.sampler import episode_generator

SIZE = 12


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_META_CACHE", str(tmp_path / "cache"))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def images_of(classes: dict[str, int], size: int = SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """Random RGB images ``uint8 [n, size, size, 3]`` per class name."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for name, n in classes.items()}


MINI_SPLITS = {
    "train": {f"n0{i:07d}": 7 for i in range(6)},
    "val": {f"n1{i:07d}": 6 for i in range(5)},
    "test": {f"n2{i:07d}": 6 for i in range(5)},
}


def write_mini_imagenet(root: Path, layout: str) -> dict[str, dict[str, np.ndarray]]:
    """Write a small mini-ImageNet in ``layout`` (``pickle``, ``csv`` or ``folders``); return its images."""
    root.mkdir(parents=True, exist_ok=True)
    data = {split: images_of(classes, seed=i) for i, (split, classes) in enumerate(MINI_SPLITS.items())}
    for split, classes in data.items():
        if layout == "pickle":
            # Interleave the classes, as the real cache files do not keep each class contiguous.
            order = [(name, i) for i in range(7) for name in classes if i < len(classes[name])]
            image_data = np.stack([classes[name][i] for name, i in order])
            class_dict = {name: [k for k, (n, _) in enumerate(order) if n == name] for name in classes}
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as file:
                pickle.dump({"image_data": image_data, "class_dict": class_dict}, file)
        elif layout == "csv":
            (root / "images").mkdir(exist_ok=True)
            with open(root / f"{split}.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["filename", "label"])
                for name, images in classes.items():
                    for i, image in enumerate(images):
                        filename = f"{name}{i:08d}.png"
                        Image.fromarray(image).save(root / "images" / filename)
                        writer.writerow([filename, name])
        else:
            for name, images in classes.items():
                (root / split / name).mkdir(parents=True)
                for i, image in enumerate(images):
                    Image.fromarray(image).save(root / split / name / f"{name}_{i:05d}.png")
    return data


@pytest.mark.parametrize("layout", ["pickle", "csv", "folders"])
def test_mini_imagenet_layouts(tmp_path, layout):
    data = write_mini_imagenet(tmp_path / "mini", layout)
    dm = MiniImageNetDataModule(tmp_path / "mini", image_size=SIZE, meta_batch_size=3, queries=3)
    for split, classes in data.items():
        store = dm.store(split)
        assert store.names == sorted(classes)
        assert store.class_sizes() == {name: len(images) for name, images in classes.items()}
        for c, name in enumerate(store.names):
            assert torch.equal(store.class_images(c), torch.from_numpy(classes[name]).permute(0, 3, 1, 2))
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (3, 5, 3, SIZE, SIZE) and batch.query_x.shape == (3, 15, 3, SIZE, SIZE)


def test_mini_imagenet_resizes(tmp_path):
    write_mini_imagenet(tmp_path / "mini", "pickle")
    dm = MiniImageNetDataModule(tmp_path / "mini", image_size=8, shots=1, queries=2)
    assert dm.store("val").image_shape == (3, 8, 8)


def test_mini_imagenet_csv_naming_missing_files(tmp_path):
    write_mini_imagenet(tmp_path / "mini", "csv")
    os.remove(tmp_path / "mini" / "images" / "n1000000200000003.png")
    with pytest.raises(DataError) as error:
        MiniImageNetDataModule(tmp_path / "mini").store("val")
    message = one_line(error)
    assert "val.csv names 1 files missing" in message and "n1000000200000003.png" in message


def test_mini_imagenet_missing_root_and_split(tmp_path):
    with pytest.raises(DataError, match="does not exist.*mini-imagenet-cache-<split>.pkl"):
        MiniImageNetDataModule(tmp_path / "nowhere").setup()
    write_mini_imagenet(tmp_path / "mini", "folders")
    (tmp_path / "mini" / "test").rename(tmp_path / "mini" / "testing")
    with pytest.raises(DataError, match="no test split"):
        MiniImageNetDataModule(tmp_path / "mini").store("test")


def test_mini_imagenet_corrupt_pickle(tmp_path):
    write_mini_imagenet(tmp_path / "mini", "pickle")
    (tmp_path / "mini" / "mini-imagenet-cache-train.pkl").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(DataError, match="cannot read .*mini-imagenet-cache-train.pkl"):
        MiniImageNetDataModule(tmp_path / "mini").store("train")


# ------------------------------------------------------------------------------------------------------ CIFAR
def cifar_names() -> tuple[list[str], list[str], dict[str, str]]:
    """CIFAR-100's fine and coarse names (alphabetical, as in its meta file) and fine -> coarse, from the splits."""
    pairs = [pair for split in ("train", "val", "test") for pair in json.loads((SPLITS_DIR / "cifar-fs" / f"{split}.json").read_text())]
    coarse_of = {fine: coarse for coarse, fine in pairs}
    return sorted(coarse_of), sorted(set(coarse_of.values())), coarse_of


def write_cifar100(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> np.ndarray:
    """``root/cifar-100-python/{train,test,meta}`` in torchvision's format; returns data ``[100, n, 3072]``."""
    fine_names, coarse_names, coarse_of = cifar_names()
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_class = rng.integers(0, 256, (100, train_per_class + test_per_class, 3072), dtype=np.uint8)
    for name, part in (("train", slice(0, train_per_class)), ("test", slice(train_per_class, None))):
        chunk = per_class[:, part]
        order = rng.permutation(chunk.shape[0] * chunk.shape[1])  # the real files mix classes
        labels = np.repeat(np.arange(100), chunk.shape[1])[order]
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(order))],
            "fine_labels": labels.tolist(),
            "coarse_labels": [coarse_names.index(coarse_of[fine_names[label]]) for label in labels],
            "data": chunk.reshape(-1, 3072)[order],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file)
    with open(folder / "meta", "wb") as file:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, file)
    return per_class


def test_cifar_fs_and_fc100(tmp_path):
    data = write_cifar100(tmp_path)
    fine_names = cifar_names()[0]
    fs = CIFARFSDataModule(tmp_path, shots=1, queries=2, meta_batch_size=2)
    assert [fs.num_classes(s) for s in ("train", "val", "test")] == [64, 16, 20]
    store = fs.store("train")
    assert set(store.counts.tolist()) == {6}, "train and test images pooled"
    c = fine_names.index(store.names[0].split("/")[1])
    rows = [bytes(x) for x in store.class_images(0).reshape(6, 3072).numpy()]
    assert set(rows[:4]) == {bytes(x) for x in data[c, :4]}, "the class's train images, then"
    assert set(rows[4:]) == {bytes(x) for x in data[c, 4:]}, "its test images, as CHW planes"
    assert store.names[0] == "aquatic_mammals/dolphin"
    fc = FC100DataModule(tmp_path, shots=1, queries=2)
    assert [fc.num_classes(s) for s in ("train", "val", "test")] == [60, 20, 20]
    supers = [{n.split("/")[0] for n in fc.store(s).names} for s in ("train", "val", "test")]
    assert [len(s) for s in supers] == [12, 4, 4] and not (supers[0] & supers[2])
    batch = next(iter(fs.train_dataloader()))
    assert batch.support_x.shape == (2, 5, 3, 32, 32) and batch.query_x.shape == (2, 10, 3, 32, 32)


def test_cifar_custom_split_and_errors(tmp_path):
    write_cifar100(tmp_path / "data", train_per_class=2, test_per_class=1)
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, pairs in {"train": [["fish", "ray"], ["fish", "trout"]], "val": [["trees", "oak_tree"]], "test": [["people", "baby"]]}.items():
        (splits / f"{split}.json").write_text(json.dumps(pairs))
    dm = CIFARFSDataModule(tmp_path / "data" / "cifar-100-python", splits=splits, ways=1, shots=1, queries=2, train_ways=2)
    assert dm.store("train").names == ["fish/ray", "fish/trout"]
    with pytest.raises(ConfigError, match="class 'fish/ray' of the train split has 3 examples.*shots \\+ queries = 4"):
        CIFARFSDataModule(tmp_path / "data", splits=splits, shots=2, queries=2, ways=2).train_dataloader()
    (splits / "test.json").write_text(json.dumps([["people", "martian"]]))
    with pytest.raises(ConfigError, match="not in CIFAR-100 \\(e.g. people/martian\\)"):
        dm.store("test")
    with pytest.raises(DataError, match="no cifar-100-python.*download=True"):
        FC100DataModule(tmp_path / "elsewhere").setup()


# ------------------------------------------------------------------------------------------------ image folder
def write_folder(root: Path, classes: dict[str, int], suffix: str = ".png", seed: int = 0) -> dict[str, np.ndarray]:
    data = images_of(classes, seed=seed)
    for name, images in data.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:03d}{suffix}")
    return data


def test_image_folder_with_split_fractions(tmp_path):
    data = write_folder(tmp_path / "pets", {f"breed{i:02d}": 5 + i % 4 for i in range(20)})
    dm = ImageFolderDataModule(tmp_path / "pets", image_size=SIZE, shots=1, queries=3, meta_batch_size=4)
    splits = [set(dm.store(s).names) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [13, 3, 4]
    assert set().union(*splits) == set(data) and sum(len(s) for s in splits) == 20
    again = ImageFolderDataModule(tmp_path / "pets", image_size=SIZE)
    assert set(again.store("test").names) == splits[2], "the class split is fixed by split_seed"
    other = ImageFolderDataModule(tmp_path / "pets", image_size=SIZE, split_seed=1)
    assert set(other.store("test").names) != splits[2]
    store = dm.store("train")
    c = store.names.index(sorted(splits[0])[0])
    assert torch.equal(store.class_images(c), torch.from_numpy(data[store.names[c]]).permute(0, 3, 1, 2))
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 5, 3, SIZE, SIZE)
    for t in range(4):  # classes of unequal sizes: still 4 distinct images per label
        for label in range(5):
            images = torch.cat([batch.support_x[t, batch.support_y[t] == label], batch.query_x[t, batch.query_y[t] == label]])
            assert len({bytes(x.flatten().tolist()) for x in images}) == 4


def test_image_folder_with_split_folders_and_grayscale(tmp_path):
    for i, split in enumerate(("train", "val", "test")):
        write_folder(tmp_path / "mine" / split, {f"{split}{c}": 4 for c in range(3)}, suffix=".jpg", seed=i)
    dm = ImageFolderDataModule(tmp_path / "mine", image_size=8, channels=1, ways=3, shots=1, queries=3)
    assert dm.has_split_folders()
    assert dm.store("val").names == ["val0", "val1", "val2"] and dm.store("val").image_shape == (1, 8, 8)
    batch = dm.sample_tasks("test", [episode_generator(0, i) for i in range(2)])
    assert batch.support_x.shape == (2, 3, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="root .*nowhere does not exist"):
        ImageFolderDataModule(tmp_path / "nowhere").setup()
    with pytest.raises(ConfigError, match="split_fractions"):
        ImageFolderDataModule(tmp_path, split_fractions=(0.5, 0.1, 0.1))
    write_folder(tmp_path / "few", {f"c{i}": 5 for i in range(6)})
    with pytest.raises(ConfigError, match="5-way tasks need 5 classes but the val split has 1; lower ways"):
        ImageFolderDataModule(tmp_path / "few").val_dataloader()
    write_folder(tmp_path / "small", {"big": 9, "tiny": 2, "mid": 6}, seed=1)
    with pytest.raises(ConfigError) as error:
        ImageFolderDataModule(tmp_path / "small", split_fractions=(1, 0, 0), ways=2, shots=1, queries=2).train_dataloader()
    assert "class 'tiny'" in one_line(error) and "2 examples" in one_line(error)
    cached = sorted((tmp_path / "cache").iterdir())
    (tmp_path / "small" / "mid" / "002.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as error:
        ImageFolderDataModule(tmp_path / "small", split_fractions=(1, 0, 0)).setup("fit")
    assert f"{tmp_path / 'small' / 'mid' / '002.png'}" in one_line(error)
    assert sorted((tmp_path / "cache").iterdir()) == cached, "nothing half-written cached"
