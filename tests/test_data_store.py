"""The class-indexed store: episodes gathered from it, rotations, and the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from datamodules.sampler import episode_generator
from datamodules.store import ClassStore, cache_dir, load_or_build, user_cache_dir
from datamodules.task_batch import TaskBatch


def tagged_store(counts: list[int], size: int = 4) -> ClassStore:
    """A store whose image ``i`` of class ``c`` has pixel (0, 0) = c and pixel (0, 1) = i: gathers can be read back."""
    images = torch.zeros(sum(counts), 1, size, size, dtype=torch.uint8)
    row = 0
    for c, count in enumerate(counts):
        for i in range(count):
            images[row, 0, 0, 0], images[row, 0, 0, 1] = c, i
            row += 1
    return ClassStore(images, counts, [f"class{c}" for c in range(len(counts))])


def generators(n: int, *keys: int) -> list[torch.Generator]:
    return [episode_generator(*keys, i) for i in range(n)]


def check_episodes(batch: TaskBatch, store: ClassStore, ways: int, shots: int, queries: int) -> None:
    """Labels 0..N-1 ordered by class, one class per label, distinct classes, shots+queries distinct images each."""
    tasks = batch.num_tasks
    assert batch.support_x.shape == (tasks, ways * shots, *store.image_shape)
    assert batch.query_x.shape == (tasks, ways * queries, *store.image_shape)
    assert batch.support_x.dtype == torch.uint8
    assert torch.equal(batch.support_y, torch.arange(ways).repeat_interleave(shots).expand(tasks, -1))
    assert torch.equal(batch.query_y, torch.arange(ways).repeat_interleave(queries).expand(tasks, -1))
    for t in range(tasks):
        classes = []
        for label in range(ways):
            images = torch.cat([batch.support_x[t][batch.support_y[t] == label], batch.query_x[t][batch.query_y[t] == label]])
            cls = images[:, 0, 0, 0].unique()
            assert len(cls) == 1, "a label mixes classes"
            classes.append(int(cls))
            picks = images[:, 0, 0, 1].tolist()
            assert len(set(picks)) == shots + queries, "an image is repeated within a class"
            assert max(picks) < int(store.counts[classes[-1]])
        assert len(set(classes)) == ways, "a class appears under two labels"


def test_episodes_have_the_contracted_shape_and_labels():
    store = tagged_store([20] * 12)
    batch = store.sample(generators(16, 1), ways=5, shots=2, queries=3)
    check_episodes(batch, store, 5, 2, 3)


def test_whole_classes_and_many_ways():
    store = tagged_store([6] * 8)
    check_episodes(store.sample(generators(4, 2), ways=8, shots=1, queries=5), store, 8, 1, 5)


def test_unequal_class_sizes_stay_inside_each_class():
    store = tagged_store([3, 4, 5, 7, 12, 30, 3, 9])
    check_episodes(store.sample(generators(64, 3), ways=4, shots=1, queries=2), store, 4, 1, 2)


def test_impossible_episodes_are_refused():
    store = tagged_store([3, 5, 5])
    with pytest.raises(ValueError, match="need 4 classes"):
        store.sample(generators(1, 0), 4, 1, 1)
    with pytest.raises(ValueError, match="at least 3"):
        store.sample(generators(1, 0), 2, 2, 2)


def test_batched_sampling_equals_one_task_at_a_time():
    store = tagged_store([20] * 30)
    batch = store.sample(generators(8, 4), 5, 1, 4)
    alone = TaskBatch.cat([store.sample([g], 5, 1, 4) for g in generators(8, 4)])
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(batch, field), getattr(alone, field))


def test_sampling_uses_only_the_given_generator():
    store = tagged_store([20] * 30)
    torch.manual_seed(1)
    first = store.sample(generators(4, 5), 5, 1, 1)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    second = store.sample(generators(4, 5), 5, 1, 1)
    assert torch.equal(first.support_x, second.support_x) and torch.equal(first.query_x, second.query_x)
    torch.manual_seed(1)
    store.sample(generators(4, 5), 5, 1, 1)
    assert torch.equal(torch.get_rng_state(), state), "sampling touched the global RNG"


def test_classes_and_labels_are_shuffled():
    store = tagged_store([2] * 10)
    batch = store.sample(generators(400, 6), 3, 1, 1)
    first_class = batch.support_x[:, 0, 0, 0, 0]
    assert len(first_class.unique()) == 10, "label 0 should land on every class"
    counts = torch.bincount(batch.support_x[:, :, 0, 0, 0].flatten().long(), minlength=10)
    assert counts.min() > 0.6 * counts.float().mean(), counts


def test_rotated_classes_are_rot90_of_the_originals():
    store = ClassStore(torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8), [2, 4], ["a", "b"])
    rotated = store.rotated(4)
    assert rotated.num_classes == 8
    assert rotated.names[:3] == ["a/rot0", "b/rot0", "a/rot90"]
    for k in range(4):
        for c in range(2):
            expected = torch.rot90(store.class_images(c), k, dims=(-2, -1))
            assert torch.equal(rotated.class_images(k * 2 + c), expected)


def test_select_shares_images_and_saves_only_its_classes(tmp_path):
    store = tagged_store([3, 4, 5])
    part = store.select(["class2", "class0"])
    assert part.images.data_ptr() == store.images.data_ptr()
    assert part.class_sizes() == {"class2": 5, "class0": 3}
    part.save(tmp_path / "part.pt")
    loaded = ClassStore.load(tmp_path / "part.pt")
    assert len(loaded.images) == 8 and torch.equal(loaded.class_images(0), store.class_images(2))


# ---------------------------------------------------------------------------------------------------- caching
def test_cache_dir_precedence(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LIT_META_CACHE", str(tmp_path / "env"))
    assert cache_dir(data, explicit=tmp_path / "mine") == tmp_path / "mine"
    assert cache_dir(data) == tmp_path / "env", "an explicit LIT_META_CACHE wins over the data folder"
    monkeypatch.delenv("LIT_META_CACHE")
    assert cache_dir(data) == data / ".lit_meta_cache", "beside the data when it is writable"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(not_a_folder) == user_cache_dir() == tmp_path / "xdg" / "lit_meta"
    assert cache_dir(None) == user_cache_dir(), "shipped data is never written to"
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        assert cache_dir(read_only) == user_cache_dir(), "a folder marked read-only is left alone, even by root"
        assert not (read_only / ".lit_meta_cache").exists()
    finally:
        read_only.chmod(0o755)


def test_cache_is_built_once_and_invalidated_by_the_source(tmp_path):
    calls = []

    def build() -> ClassStore:
        calls.append(1)
        return tagged_store([2, 3])

    first = load_or_build("toy-train", 4, {"invert": True}, ["source-v1"], build, tmp_path)
    again = load_or_build("toy-train", 4, {"invert": True}, ["source-v1"], build, tmp_path)
    assert len(calls) == 1 and torch.equal(first.images, again.images) and again.names == first.names
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert name.startswith("toy-train-4x4-")
    load_or_build("toy-train", 4, {"invert": False}, ["source-v1"], build, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2, "other options are another cache"
    load_or_build("toy-train", 4, {"invert": True}, ["source-v2"], build, tmp_path)
    assert len(calls) == 3, "a changed source is decoded again"
    assert len(list(tmp_path.iterdir())) == 2, "the stale cache of the old source is removed"


def test_no_half_written_cache(tmp_path, monkeypatch):
    def failing_build() -> ClassStore:
        raise RuntimeError("decoding failed")

    with pytest.raises(RuntimeError):
        load_or_build("toy-train", 4, {}, ["v1"], failing_build, tmp_path)
    assert list(tmp_path.iterdir()) == []

    def interrupted_save(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        tagged_store([2]).save(tmp_path / "store.pt")
    assert list(tmp_path.iterdir()) == [], "an interrupted write leaves neither the file nor its temp file"


def test_unreadable_cache_is_rebuilt(tmp_path):
    load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2]), tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        store = load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2]), tmp_path)
    assert store.num_classes == 1
    assert ClassStore.load(path).num_classes == 1, "the damaged file was replaced"


def test_cache_files_get_the_usual_permissions(tmp_path):
    tagged_store([2]).save(tmp_path / "store.pt")
    mode = os.stat(tmp_path / "store.pt").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_store_on_gpu_gathers_there():
    store = tagged_store([20] * 12).to("cuda")
    batch = store.sample(generators(4, 7), 5, 1, 3)
    assert batch.support_x.is_cuda and batch.support_y.is_cuda
    cpu = tagged_store([20] * 12).sample(generators(4, 7), 5, 1, 3)
    assert torch.equal(batch.support_x.cpu(), cpu.support_x)


def test_user_cache_dir_default(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_cache_dir() == Path.home() / ".cache" / "lit_meta"


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "not-a-store", "old-format", "inconsistent"],
)
def test_every_damaged_cache_is_rebuilt_with_a_one_line_warning(tmp_path, damage):
    load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2, 3]), tmp_path)
    (path,) = tmp_path.iterdir()
    good = path.read_bytes()
    if damage == "truncated":  # an interrupted copy, a full disk
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not-a-store":
        torch.save(torch.zeros(3), path)
    elif damage == "old-format":
        torch.save({"version": 0, "images": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "counts": [1], "names": ["a"]}, path)
    else:  # counts that do not add up to the images
        torch.save({"version": 1, "images": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "counts": [5], "names": ["a"]}, path)
    with pytest.warns(UserWarning) as caught:
        store = load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2, 3]), tmp_path)
    (warning,) = [str(w.message) for w in caught]
    assert "\n" not in warning and str(path) in warning and "unreadable cache" in warning
    assert store.num_classes == 2 and ClassStore.load(path).num_classes == 2, "the damaged file was replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no temp file left"


def test_a_folder_in_the_way_of_a_cache_is_named_in_one_line(tmp_path):
    load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2]), tmp_path)
    (path,) = tmp_path.iterdir()
    path.unlink()
    path.mkdir()  # cannot be read, and cannot be replaced by a file
    with pytest.warns(UserWarning) as caught:
        store = load_or_build("toy-train", 4, {}, ["v1"], lambda: tagged_store([2]), tmp_path)
    (warning,) = [str(w.message) for w in caught]
    assert "\n" not in warning and f"could not write the cache {path}" in warning and "delete it" in warning
    assert store.num_classes == 1, "the run goes on with the store in memory"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file left"
