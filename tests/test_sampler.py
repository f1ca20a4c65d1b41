"""Counter-based episodes: reproducible, rank-aware, fixed for evaluation, resumable."""

import torch

from datamodules import EpisodeLoader, SinusoidDataModule, episode_seed


def loader(split="train", rank=0, world_size=1, **kwargs):
    dm = SinusoidDataModule(meta_batch_size=3, train_batches=4, val_episodes=10, eval_meta_batch_size=3, **kwargs)
    dm._rank = lambda: (rank, world_size)
    return dm.episode_loader(split)


def as_list(batches):
    return [b.support_x for b in batches]


def test_seed_depends_on_every_key():
    seeds = {episode_seed(0, 1, 0, 0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert episode_seed(0, 1, 0, 0, 5) != episode_seed(0, 1, 1, 0, 5) != episode_seed(0, 1, 0, 1, 5)
    assert episode_seed(3, 1, 2) == episode_seed(3, 1, 2)


def test_training_stream_is_reproducible_and_seed_dependent():
    a, b, c = as_list(loader()), as_list(loader()), as_list(loader(seed=1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_ranks_draw_different_tasks():
    rank0, rank1 = as_list(loader(rank=0, world_size=2)), as_list(loader(rank=1, world_size=2))
    assert not any(torch.equal(x, y) for x, y in zip(rank0, rank1))


def test_evaluation_episodes_are_fixed_and_sharded_without_overlap():
    single = torch.cat(as_list(loader("val")))
    assert torch.equal(single, torch.cat(as_list(loader("val"))))  # same episodes at every evaluation
    val = loader("val")
    assert torch.equal(torch.cat(as_list(val)), torch.cat(as_list(val)))  # and on every pass
    shards = [torch.cat(as_list(loader("val", rank=r, world_size=3))) for r in range(3)]
    union = torch.cat(shards)
    assert union.shape == single.shape  # no episode dropped or duplicated
    key = lambda t: sorted(round(float(v), 6) for v in t.flatten(1).sum(1))  # noqa: E731
    assert key(union) == key(single)


def test_state_dict_resumes_mid_epoch():
    original = loader()
    it = iter(original)
    next(it), next(it)
    state = original.state_dict()
    rest = [b.support_x for b in it]
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, as_list(resumed)))
    assert len(rest) == 2
    # the following epoch is the same too
    assert all(torch.equal(x, y) for x, y in zip(as_list(original), as_list(resumed)))


def test_state_dict_at_epoch_end_starts_next_epoch():
    original = loader()
    first_epoch = as_list(original)
    state = original.state_dict()
    second_epoch = as_list(original)
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(second_epoch, as_list(resumed)))
    assert not torch.equal(first_epoch[0], second_epoch[0])


def test_loader_is_sized():
    assert len(loader()) == 4
    assert len(loader("val")) == 4  # ceil(10 / 3)
    assert isinstance(loader(), EpisodeLoader)


def test_a_distributed_evaluation_with_a_process_left_without_episodes_is_refused_at_setup():
    import pytest

    from datamodules import ConfigError, OmniglotDataModule

    def setup(dm, stage, world_size):
        dm._rank = lambda: (0, world_size)  # what the Trainer reports on every rank of a DDP run
        dm.setup(stage)

    dm = SinusoidDataModule(val_episodes=3, test_episodes=8)
    # Episodes are dealt out round-robin: 3 validation episodes for 4 processes leave one with none.
    with pytest.raises(ConfigError, match="3 val episodes for 4 processes: 1 of them would get none .* raise val_episodes to at least 4"):
        setup(dm, "fit", 4)
    with pytest.raises(ConfigError, match="3 val episodes for 4 processes"):
        setup(dm, "validate", 4)
    setup(dm, "test", 4)  # the test split has enough
    setup(dm, "fit", 3)  # one episode each
    setup(dm, "predict", 16)
    with pytest.raises(ConfigError, match="8 test episodes for 9 processes: 1 of them .* raise test_episodes"):
        setup(dm, "test", 9)
    # Every process gets at least one: the loaders agree with the check.
    def shard(rank, world_size):
        dm = SinusoidDataModule(val_episodes=3, eval_meta_batch_size=2)
        dm._rank = lambda: (rank, world_size)
        return dm.episode_loader("val").episodes

    assert all(shard(rank, world_size) for world_size in (1, 2, 3) for rank in range(world_size))
    assert shard(3, 4) == []

    # Lake's 20 runs are the Omniglot default's test set, whatever test_episodes says (checked before any file is read).
    omniglot = OmniglotDataModule(test_episodes=600)
    omniglot._rank = lambda: (0, 32)
    with pytest.raises(ConfigError, match="20 test episodes for 32 processes: .* Lake's runs are a fixed 20: test on at most 20 devices, or use test_set='split' with test_episodes >= 32"):
        omniglot.setup("test")
