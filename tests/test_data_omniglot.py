"""Omniglot: the real data's splits and Lake's runs, the shipped default, episodes, download and errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.omniglot as omniglot
from datamodules import ConfigError, DataError, OmniglotDataModule, TaskBatch
from datamodules.sampler import episode_generator


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Decoded stores go to a temp folder of this module, never beside the real data (which may be read-only)."""
    old = os.environ.get("LIT_META_CACHE")
    os.environ["LIT_META_CACHE"] = str(tmp_path_factory.mktemp("lit_meta_cache"))
    yield
    if old is None:
        os.environ.pop("LIT_META_CACHE", None)
    else:
        os.environ["LIT_META_CACHE"] = old


@functools.lru_cache(maxsize=None)
def vinyals_datamodule(root: Path) -> OmniglotDataModule:
    """The full Vinyals-split Omniglot, decoded once per pytest run."""
    dm = OmniglotDataModule(root)
    dm.setup()
    return dm


@pytest.fixture
def vinyals(omniglot_root) -> OmniglotDataModule:
    return vinyals_datamodule(omniglot_root)


def first_batch(loader) -> TaskBatch:
    return next(iter(loader))


# --------------------------------------------------------------------------------------------- real data splits
def test_vinyals_split_counts(vinyals):
    for split, characters in (("train", 1028), ("val", 172), ("test", 423)):
        store = vinyals.store(split)
        assert store.num_classes == 4 * characters, split
        assert set(store.counts.tolist()) == {20}
        assert store.image_shape == (1, 28, 28)


def test_vinyals_without_rotations(omniglot_root):
    dm = OmniglotDataModule(omniglot_root, rotations=False)
    assert [dm.num_classes(s) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert sum(len(dm.store(s).images) for s in ("train", "val", "test")) == 1623 * 20


def test_lake_split_counts(omniglot_root):
    dm = OmniglotDataModule(omniglot_root, split="lake")
    val_alphabets = dm.validation_alphabets()
    assert len(val_alphabets) == 5
    train, val, test = (dm.store(s) for s in ("train", "val", "test"))
    assert train.num_classes + val.num_classes == 964 and test.num_classes == 659
    assert {n.split("/")[0] for n in val.names} == set(val_alphabets)
    assert not {n.split("/")[0] for n in train.names} & set(val_alphabets)


def test_rotations_are_rotated_images(vinyals):
    store = vinyals.store("train")
    position = {name: i for i, name in enumerate(store.names)}
    name = store.names[0].removesuffix("/rot0")
    original = store.class_images(position[f"{name}/rot0"])
    for k in (1, 2, 3):
        assert torch.equal(store.class_images(position[f"{name}/rot{90 * k}"]), torch.rot90(original, k, dims=(-2, -1)))


def test_images_are_inverted_strokes_bright(vinyals):
    images = vinyals.store("train").images[:200].float()
    assert images.mean() < 60, "background should be dark"
    assert images.max() == 255


def runs_archive(root: Path) -> Path:
    """Lake's runs as the datamodule reads them: from ``root`` when they are there, else the copy in the package."""
    return root / "all_runs.zip" if (root / "all_runs.zip").is_file() else omniglot.SHIPPED / "all_runs.zip"


def run_image(root: Path, member: str) -> torch.Tensor:
    with zipfile.ZipFile(runs_archive(root)) as archive:
        image = Image.open(io.BytesIO(archive.read(member))).convert("L")
    return 255 - torch.from_numpy(np.asarray(image).copy())


def test_lake_runs_match_class_labels(omniglot_root):
    dm = OmniglotDataModule(omniglot_root, split="lake", test_set="lake_runs", image_size=105, ways=20, shots=1, queries=5, eval_meta_batch_size=8)
    loader = dm.test_dataloader()
    batch = TaskBatch.cat(list(loader))
    assert batch.num_tasks == 20 and len(loader) == 3
    assert batch.support_x.shape == (20, 20, 1, 105, 105) and batch.query_x.shape == (20, 20, 1, 105, 105)
    assert torch.equal(batch.support_y, torch.arange(20).expand(20, -1))
    assert torch.equal(batch.query_y, torch.arange(20).expand(20, -1))
    with zipfile.ZipFile(runs_archive(omniglot_root)) as archive:
        labels = {run: archive.read(f"run{run:02d}/class_labels.txt").decode().split() for run in (1, 7, 20)}
    for run, words in labels.items():
        for test_item, training in zip(words[::2], words[1::2]):
            label = int(training[-6:-4]) - 1  # run01/training/class08.png -> 7
            assert torch.equal(batch.support_x[run - 1, label, 0], run_image(omniglot_root, training))
            assert torch.equal(batch.query_x[run - 1, label, 0], run_image(omniglot_root, test_item))
    again = TaskBatch.cat(list(dm.test_dataloader()))
    assert torch.equal(again.query_x, batch.query_x), "the runs are fixed"


def test_vinyals_with_lake_runs_warns_about_overlap(tmp_path):
    with pytest.warns(UserWarning, match="Lake's runs"):  # at construction: no data needed
        OmniglotDataModule(tmp_path, test_set="lake_runs")


# ------------------------------------------------------------------------------------------- shipped default
def test_default_trains_on_shipped_small_sets_and_tests_on_lake_runs():
    dm = OmniglotDataModule()
    assert dm.split == "lake" and dm.background == "small1+small2" and dm.test_set == "lake_runs"
    train, val = dm.store("train"), dm.store("val")
    alphabets = {n.split("/")[0] for n in train.names} | {n.split("/")[0] for n in val.names}
    assert alphabets == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert dm.validation_alphabets() == ["Korean"]
    assert train.num_classes + val.num_classes == 242
    batch = first_batch(dm.train_dataloader())
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.query_x.shape == (32, 75, 1, 28, 28)
    with pytest.warns(UserWarning, match="ways=20"):
        test = TaskBatch.cat(list(dm.test_dataloader()))
    assert test.num_tasks == 20 and test.support_x.shape[1] == 20 and test.query_x.shape[1] == 20
    floats = dm.on_after_batch_transfer(batch, 0)
    assert floats.support_x.dtype == torch.float32 and float(floats.support_x.max()) == 1.0


def test_small1_background_alone():
    dm = OmniglotDataModule(background="small1", val_alphabets=["Latin"])
    assert {n.split("/")[0] for n in dm.store("train").names} == {"Balinese", "Early_Aramaic", "Greek", "Korean"}
    assert {n.split("/")[0] for n in dm.store("val").names} == {"Latin"}


# ---------------------------------------------------------------------------------------------------- episodes
def test_same_seed_epoch_index_gives_same_episodes():
    a = OmniglotDataModule(seed=3, meta_batch_size=4, train_batches=3)
    b = OmniglotDataModule(seed=3, meta_batch_size=4, train_batches=3)
    batches_a, batches_b = list(a.train_dataloader()), list(b.train_dataloader())
    for x, y in zip(batches_a, batches_b):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
    assert not torch.equal(batches_a[0].support_x, batches_a[1].support_x), "indices differ"
    loader = a.train_dataloader()
    epoch0 = list(loader)
    epoch1 = list(loader)
    assert not torch.equal(epoch0[0].support_x, epoch1[0].support_x), "epochs differ"
    c = OmniglotDataModule(seed=4, meta_batch_size=4, train_batches=3)
    assert not torch.equal(first_batch(c.train_dataloader()).support_x, batches_a[0].support_x), "seeds differ"


def test_task_is_a_function_of_its_generator_only():
    dm = OmniglotDataModule()
    one = dm.sample_task("train", episode_generator(0, 1, 0, 0, 5))
    batch = dm.sample_tasks("train", [episode_generator(0, 1, 0, 0, i) for i in range(8)])
    assert all(torch.equal(x, batch_x[5]) for x, batch_x in zip(one, (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def test_validation_episodes_are_fixed():
    dm = OmniglotDataModule(val_episodes=10, eval_meta_batch_size=4)
    loader = dm.val_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == 3
    assert all(torch.equal(x.query_x, y.query_x) for x, y in zip(first, second))
    assert torch.equal(TaskBatch.cat(list(OmniglotDataModule(val_episodes=10).val_dataloader())).query_x, TaskBatch.cat(first).query_x)


def test_auto_device_without_trainer_is_cpu():
    assert OmniglotDataModule(device="auto").store("val").device == torch.device("cpu")


def test_device_option_keeps_store_and_batches_there():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dm = OmniglotDataModule(device=device, meta_batch_size=2)
    batch = first_batch(dm.train_dataloader())
    assert batch.support_x.device.type == device and batch.support_y.device.type == device
    cpu = first_batch(OmniglotDataModule(meta_batch_size=2).train_dataloader())
    assert torch.equal(batch.support_x.cpu(), cpu.support_x)


# ---------------------------------------------------------------------------------------------------- download
def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.random((size, size)) > 0.2).save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_zip(path: Path, top: str, alphabets: dict[str, int], drawings: int = 20) -> Path:
    """A zip in the official layout: ``top/<Alphabet>/characterNN/<id>_<drawer>.png``."""
    with zipfile.ZipFile(path, "w") as archive:
        for a, (alphabet, characters) in enumerate(alphabets.items()):
            for c in range(1, characters + 1):
                for d in range(1, drawings + 1):
                    archive.writestr(f"{top}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png", png(a * 10_000 + c * 100 + d))
    return path


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_fetches_the_official_zips(server, tmp_path, monkeypatch):
    served, url = server
    background = omniglot_zip(served / "images_background.zip", "images_background", {"Alpha": 6, "Beta": 5, "Gamma": 4})
    evaluation = omniglot_zip(served / "images_evaluation.zip", "images_evaluation", {"Delta": 6})
    monkeypatch.setattr(
        omniglot,
        "DOWNLOADS",
        {
            "images_background": (f"{url}/images_background.zip", md5(background)),
            "images_evaluation": (f"{url}/images_evaluation.zip", md5(evaluation)),
        },
    )
    root = tmp_path / "data"
    dm = OmniglotDataModule(root, split="lake", val_alphabets=["Gamma"], download=True)
    dm.prepare_data()
    assert md5(root / "images_background.zip") == md5(background)
    assert [dm.num_classes(s) for s in ("train", "val", "test")] == [11, 4, 6]
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    batch = first_batch(dm.train_dataloader())
    assert batch.support_x.shape == (32, 5, 1, 28, 28)


def test_download_with_wrong_md5_leaves_nothing(server, tmp_path, monkeypatch):
    served, url = server
    omniglot_zip(served / "images_background.zip", "images_background", {"Alpha": 2}, drawings=2)
    monkeypatch.setattr(omniglot, "DOWNLOADS", {"images_background": (f"{url}/images_background.zip", "0" * 32)})
    dm = OmniglotDataModule(tmp_path / "data", split="lake", test_set="lake_runs", download=True)
    with pytest.raises(DataError, match="md5") as error:
        dm.prepare_data()
    assert "\n" not in str(error.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_from_a_missing_url_is_a_one_line_error(server, tmp_path, monkeypatch):
    _, url = server
    monkeypatch.setattr(omniglot, "DOWNLOADS", {"images_background": (f"{url}/nothing.zip", None)})
    dm = OmniglotDataModule(tmp_path / "data", split="lake", test_set="lake_runs", download=True)
    with pytest.raises(DataError, match="cannot download .*nothing.zip.*by hand"):
        dm.prepare_data()


def test_extracted_folders_read_like_zips(tmp_path):
    archive = omniglot_zip(tmp_path / "images_background.zip", "images_background", {"Alpha": 3, "Beta": 2}, drawings=4)
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(archive) as z:
        z.extractall(extracted)
    stores = [
        OmniglotDataModule(root, split="lake", test_set="lake_runs", val_alphabets=["Beta"]).store("train")
        for root in (tmp_path, extracted)
    ]
    assert stores[0].names == stores[1].names == [f"Alpha/character0{i}" for i in (1, 2, 3)]
    assert torch.equal(stores[0].images, stores[1].images)


# ------------------------------------------------------------------------------------------------------ errors
def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError) as error:
        OmniglotDataModule(tmp_path / "nowhere").setup()
    message = one_line(error)
    assert "nowhere" in message and "download=True" in message and "images_background.zip" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither images_background.zip nor images_background/.*download=True"):
        OmniglotDataModule(tmp_path / "empty").setup()


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown split 'omniglot'.*vinyals, lake"):
        OmniglotDataModule(split="omniglot")
    with pytest.raises(ConfigError, match="unknown background 'small3'"):
        OmniglotDataModule(background="small3")
    with pytest.raises(ConfigError, match="pass root="):
        OmniglotDataModule(split="vinyals")
    with pytest.raises(ConfigError, match="unknown split 'valid'.*train, val, test"):
        OmniglotDataModule().sample_task("valid", episode_generator(0))
    with pytest.raises(ConfigError, match="not background alphabets"):
        OmniglotDataModule(val_alphabets=["Klingon"]).store("val")


def test_more_ways_than_classes():
    with pytest.raises(ConfigError) as error:
        OmniglotDataModule(ways=50).val_dataloader()
    assert "50-way" in one_line(error) and "val split has 40" in one_line(error) and "lower ways" in one_line(error)


def test_fewer_images_than_shots_plus_queries_names_the_class():
    with pytest.raises(ConfigError) as error:
        OmniglotDataModule(shots=5, queries=16).train_dataloader()
    assert "class '" in one_line(error) and "20 examples" in one_line(error) and "shots + queries = 21" in one_line(error)


def test_corrupt_image_is_named(tmp_path):
    archive = omniglot_zip(tmp_path / "images_background.zip", "images_background", {"Alpha": 2, "Beta": 2}, drawings=3)
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("images_background/Alpha/character03/0003_01.png", b"\x89PNG not really")
    cache = tmp_path / "cache"
    dm = OmniglotDataModule(tmp_path, split="lake", test_set="lake_runs", val_alphabets=1, cache_dir=cache)
    with pytest.raises(DataError) as error:
        dm.setup()
    assert "images_background/Alpha/character03/0003_01.png" in one_line(error)
    assert not cache.exists() or list(cache.iterdir()) == [], "nothing cached"
