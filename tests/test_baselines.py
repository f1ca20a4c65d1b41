"""Transfer-learning baselines: non-episodic batches, Pretrain's evaluators, MetaBaseline and init_from.

The evaluators are compared with computations written here independently (numpy for SimpleShot, scipy's L-BFGS-B
on the same objective for the logistic regression); the pre-training run uses the real Omniglot when it is there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_trainer
from datamodules import BatchLoader, ClassImageDataModule, ClassStore, ConfigError, ExampleBatch, OmniglotDataModule
from lit_meta import Conv4, MetaBaseline, Pretrain, ProtoNet
from lit_meta.algorithms.pretrain import finetune_head, fit_logistic_regression


# ------------------------------------------------------------------------------------------------ data
class TinyImages(ClassImageDataModule):
    """Classes of unequal sizes whose every pixel holds ``10 * class + image`` (so an image names its class)."""

    COUNTS = {"train": [3, 5, 4, 6, 2, 7, 5], "val": [6] * 5, "test": [6] * 5}

    def __init__(self, **kwargs):
        super().__init__(root=None, image_size=4, **kwargs)

    def load_split(self, split):
        counts = self.COUNTS[split]
        values = [10 * c + i for c, n in enumerate(counts) for i in range(n)]
        images = torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
        store = ClassStore(images, counts, [f"{split}{c}" for c in range(len(counts))])
        # A selected store (classes not in storage order) exercises the mapping from examples to rows.
        return store.select(list(range(len(counts)))[::-1])


def decode(batch: ExampleBatch) -> tuple[list[int], list[int]]:
    """The (class, image) pairs the pixel values say, and the labels given."""
    values = batch.x[:, 0, 0, 0].tolist()
    return [(v // 10, v % 10) for v in values], batch.y.tolist()


def test_batches_cover_every_training_image_once_per_epoch_with_true_labels():
    dm = TinyImages(train_mode="batches", batch_size=4, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    total = sum(TinyImages.COUNTS["train"])
    assert isinstance(loader, BatchLoader) and len(loader) == -(-total // 4)
    epochs = []
    for _ in range(2):
        seen = []
        for batch in loader:
            pairs, labels = decode(batch)
            # The store was selected in reverse, so class c of the source is label (classes - 1 - c).
            assert labels == [len(TinyImages.COUNTS["train"]) - 1 - c for c, _ in pairs]
            seen += pairs
        assert sorted(seen) == sorted((c, i) for c, n in enumerate(TinyImages.COUNTS["train"]) for i in range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new permutation every epoch


def test_batches_shard_over_ranks_and_resume_exactly_mid_epoch():
    total = 30
    take = lambda index: ExampleBatch(index.view(-1, 1), index)  # noqa: E731
    shards = [BatchLoader(take, num_examples=total, batch_size=4, seed=0, rank=r, world_size=4) for r in range(4)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    covered = torch.cat([b.y for s in shards for b in s])
    assert set(covered.tolist()) == set(range(total)) and len(covered) == 32  # padded by 2 to a multiple of 4

    dm = TinyImages(train_mode="batches", batch_size=3, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    whole = [[b.y.tolist() for b in loader] for _ in range(2)]

    interrupted = TinyImages(train_mode="batches", batch_size=3, seed=1)
    interrupted.setup("fit")
    stream = iter(interrupted.train_dataloader())
    first = [next(stream).y.tolist() for _ in range(4)]
    state = interrupted.state_dict()

    resumed = TinyImages(train_mode="batches", batch_size=3, seed=1)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = [b.y.tolist() for b in loader]
    assert first + rest == whole[0]
    assert [b.y.tolist() for b in loader] == whole[1]


def test_pretrain_resumes_mid_epoch_exactly(tmp_path):
    import lightning.pytorch as pl

    def run(steps, ckpt_path=None):
        pl.seed_everything(0)
        model = tiny_pretrain(label_smoothing=0.1)
        trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, TinyImages(train_mode="batches", batch_size=4, seed=5), ckpt_path=ckpt_path)
        return model, trainer

    whole, _ = run(11)  # an epoch is 8 batches of 4 (32 images): this crosses into the second epoch
    _, first = run(5)
    first.save_checkpoint(tmp_path / "step5.ckpt")
    resumed, _ = run(11, ckpt_path=tmp_path / "step5.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_batches_are_floats_on_the_device_and_episodes_stay_for_evaluation():
    dm = TinyImages(train_mode="batches", batch_size=5, ways=3, shots=1, queries=2, val_episodes=4)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.x.dtype == torch.float32 and float(batch.x.max()) <= 1.0
    episodes = next(iter(dm.val_dataloader()))
    assert episodes.support_x.shape[:2] == (4, 3)


# ------------------------------------------------------------------------------------------- evaluators
def tiny_pretrain(**kwargs) -> Pretrain:
    return Pretrain(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1, embedding="mean"), num_classes=7, **kwargs)


def numpy_simpleshot(support, labels, query, ways, transform, mean):
    s, q = support.numpy().astype(np.float64), query.numpy().astype(np.float64)
    if transform == "cl2":
        s, q = s - mean.numpy(), q - mean.numpy()
    if transform in ("l2", "cl2"):
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    centroids = np.stack([s[labels.numpy() == c].mean(0) for c in range(ways)])
    return -((q[:, None, :] - centroids[None]) ** 2).sum(-1)


@pytest.mark.parametrize("transform", ["none", "l2", "cl2"])
def test_simpleshot_matches_numpy(transform):
    gen = torch.Generator().manual_seed(1)
    ways, shots, dim = 5, 3, 8
    support = torch.randn(ways * shots, dim, generator=gen) + 2.0
    labels = torch.arange(ways).repeat_interleave(shots)
    query = torch.randn(20, dim, generator=gen) + 2.0
    model = tiny_pretrain(evaluator="nearest_centroid", feature_transform=transform)
    mean = torch.randn(8, generator=gen) + 2.0
    model.base_mean.copy_(mean)
    model.base_mean_step.fill_(0)
    logits = model.evaluate_features(support, labels, query, ways)
    expected = numpy_simpleshot(support, labels, query, ways, transform, mean)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1).numpy() == expected.argmax(-1)).all()


def test_cl2_without_a_base_mean_is_a_one_line_error():
    model = tiny_pretrain(evaluator="nearest_centroid", feature_transform="cl2")
    with pytest.raises(ConfigError, match="compute_base_mean") as err:
        model.evaluate_features(torch.randn(5, 8), torch.arange(5), torch.randn(3, 8), 5)
    assert "\n" not in str(err.value)


def test_base_mean_is_the_mean_embedding_of_the_training_images():
    dm = TinyImages(train_mode="batches")
    dm.setup("fit")
    model = tiny_pretrain(base_mean_batch_size=4)
    model.backbone.features[0][1].num_batches_tracked.fill_(3)  # running statistics recorded
    mean = model.compute_base_mean(dm)
    everything = dm.prepare_batch(dm.examples("train", torch.arange(dm.num_examples("train"))))
    from lit_meta.normalization import running_statistics

    with torch.no_grad(), running_statistics():
        expected = model.backbone(everything.x).flatten(1).mean(0)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)


def scipy_logistic_regression(x: np.ndarray, y: np.ndarray, ways: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's multinomial objective (unpenalised intercept), solved by scipy's L-BFGS-B to high precision."""
    from scipy.optimize import minimize

    n, d = x.shape
    onehot = np.eye(ways)[y]

    def f(theta):
        w, b = theta[: ways * d].reshape(ways, d), theta[ways * d :]
        z = x @ w.T + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = 0.5 * (w**2).sum() - c * (onehot * logp).sum()
        g = c * (np.exp(logp) - onehot)
        return loss, np.concatenate([(g.T @ x + w).ravel(), g.sum(0)])

    result = minimize(f, np.zeros(ways * (d + 1)), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    return result.x[: ways * d].reshape(ways, d), result.x[ways * d :]


@pytest.mark.parametrize("c", [1.0, 0.1])
def test_logistic_regression_matches_scipy(c):
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(2)
    ways, shots, dim = 5, 2, 12
    support = F.normalize(torch.randn(ways * shots, dim, generator=gen) + torch.randn(ways, dim, generator=gen).repeat_interleave(shots, 0), dim=1)
    labels = torch.arange(ways).repeat_interleave(shots)
    query = F.normalize(torch.randn(30, dim, generator=gen), dim=1)
    weight, bias = fit_logistic_regression(support, labels, ways, c=c)
    w, b = scipy_logistic_regression(support.double().numpy(), labels.numpy(), ways, c)
    ours = torch.softmax(query.double() @ weight.T + bias, -1).numpy()
    theirs = torch.softmax(torch.from_numpy(query.double().numpy() @ w.T + b), -1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(weight.numpy(), w, atol=1e-5)
    # Through the evaluator (features L2-normalised first, as RFS): the same predictions.
    model = tiny_pretrain(evaluator="logistic_regression", logistic_c=c)
    logits = model.evaluate_features(support * 3.0, labels, query * 0.5, ways)
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_finetune_head_trains_the_new_head(classifier):
    gen = torch.Generator().manual_seed(3)
    ways, shots = 5, 2
    support = torch.randn(ways * shots, 16, generator=gen)
    labels = torch.arange(ways).repeat_interleave(shots)
    head, losses = finetune_head(support, labels, ways, classifier, generator=torch.Generator().manual_seed(0))
    _, untrained = finetune_head(support, labels, ways, classifier, epochs=0, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 101 and losses[0] == untrained[0]
    assert losses[-1] < 0.6 * losses[0]  # a cosine head with its fixed scale of 2 cannot get very confident
    fresh, _ = finetune_head(support, labels, ways, classifier, epochs=0, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(p, q) for p, q in zip(head.parameters(), fresh.parameters()))
    with torch.no_grad():
        assert (head(support).argmax(-1) == labels).float().mean() == 1.0


# --------------------------------------------------------------------------------------- init_from
def checkpoint_of(model, path):
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def test_init_from_loads_exactly_the_backbone(tmp_path):
    source = tiny_pretrain()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    source.backbone.features[0][1].running_mean.normal_()
    path = checkpoint_of(source, tmp_path / "pre.ckpt")
    model = MetaBaseline(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1, embedding="mean"), init_from=path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.on_fit_start()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.backbone.state_dict()[key]), key
    assert torch.equal(model.temperature.log_value, before["temperature.log_value"])  # nothing else is touched
    assert model.tau == pytest.approx(10.0)


def test_init_from_refuses_a_mismatched_or_missing_checkpoint(tmp_path):
    path = checkpoint_of(tiny_pretrain(), tmp_path / "pre.ckpt")
    wider = ProtoNet(Conv4(in_channels=1, hidden=16, out_features=None, image_size=4, blocks=1), init_from=path)
    with pytest.raises(ConfigError, match="does not match") as err:
        wider.on_fit_start()
    assert "\n" not in str(err.value)
    deeper = ProtoNet(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=2), init_from=path)
    with pytest.raises(ConfigError, match="lacks features.1") as err:
        deeper.on_fit_start()
    missing = ProtoNet(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1), init_from=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match="init_from: checkpoint .* does not exist") as err:
        missing.on_fit_start()
    assert "\n" not in str(err.value)


def test_a_resumed_fit_takes_its_weights_from_its_own_checkpoint(tmp_path):
    def model(init_from=None):
        return ProtoNet(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1), init_from=init_from)

    first = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    first.fit(model(), TinyImages(ways=3, queries=1, train_batches=4))
    path = tmp_path / "step2.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    resumed = model(init_from=str(tmp_path / "gone.ckpt"))  # would fail if it were read

    class Capture(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    capture = Capture()
    cpu_trainer(max_steps=3, limit_val_batches=0, callbacks=[capture]).fit(
        resumed, TinyImages(ways=3, queries=1, train_batches=4), ckpt_path=path
    )
    assert all(torch.equal(capture.state[k], v) for k, v in saved.items())


# ----------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tiny_pretrain(classifier="mlp"), "classifier must be one of"),
        (lambda: tiny_pretrain(evaluator="knn"), "evaluator must be one of"),
        (lambda: tiny_pretrain(feature_transform="zca"), "feature_transform must be one of"),
        (lambda: tiny_pretrain(label_smoothing=1.5), "label_smoothing"),
        (lambda: tiny_pretrain(logistic_c=0.0), "logistic_c"),
        (lambda: tiny_pretrain(finetune_epochs=0), "finetune_epochs"),
        (lambda: tiny_pretrain(cosine_scale=-1.0, classifier="cosine"), "cosine_scale"),
        (lambda: MetaBaseline(Conv4(out_features=None), distance="euclidean"), "distance must be 'cosine'"),
        (lambda: ProtoNet(Conv4(out_features=None), init_from=3), "init_from must be"),
        (lambda: TinyImages(train_mode="stream"), "train_mode must be one of"),
        (lambda: TinyImages(train_mode="batches", batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_options_are_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_training_data_must_match_the_algorithm():
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(ConfigError, match="set the datamodule's train_mode: batches"):
        trainer.fit(tiny_pretrain(), TinyImages(ways=3, queries=2))
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    model = ProtoNet(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1))
    with pytest.raises(ConfigError, match="set the datamodule's train_mode: episodes"):
        trainer.fit(model, TinyImages(train_mode="batches", ways=3, queries=2))
    with pytest.raises(ConfigError, match="num_classes is 9 but the training split has 7"):
        cpu_trainer(max_steps=1).fit(
            Pretrain(Conv4(in_channels=1, hidden=8, out_features=None, image_size=4, blocks=1), num_classes=9),
            TinyImages(train_mode="batches"),
        )


# ----------------------------------------------------------------------------------------- real data
def test_omniglot_batches_cover_all_4112_training_classes(omniglot_root):
    dm = OmniglotDataModule(root=omniglot_root, train_mode="batches", batch_size=64)
    dm.setup("fit")
    # The Vinyals training split with the rotations as classes of their own: 1,028 x 4 classes, 82,240 images.
    order = dm.train_dataloader().order()
    assert dm.num_classes("train") == 4112 and len(order) == 82240 and len(set(order.tolist())) == 82240
    assert set(dm.examples("train", order).y.tolist()) == set(range(4112))


def test_pretrain_on_omniglot_learns_a_few_shot_embedding(omniglot_root, tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    # A small background set (one archive of the Lake split) so that a short run passes over it several times.
    dm = OmniglotDataModule(
        root=omniglot_root, split="lake", background="small1", test_set="split", train_mode="batches",
        batch_size=64, ways=5, shots=1, queries=5, val_episodes=100, eval_meta_batch_size=50,
    )
    backbone = Conv4(in_channels=1, hidden=32, out_features=None, pool="max", fused_norm=True)
    model = Pretrain(backbone, evaluator="nearest_centroid", feature_transform="cl2", val_base_mean_images=2000)
    before = cpu_trainer(limit_val_batches=2).validate(model, dm)[0]["val/acc"]
    trainer = cpu_trainer(max_steps=200, limit_val_batches=2, check_val_every_n_epoch=1000, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    after = trainer.validate(model, dm)[0]["val/acc"]
    assert int(model.base_mean_step) == 200 and model.hparams["num_classes"] == dm.num_classes("train")
    assert after > 0.7 and after > before + 0.15, (before, after)

    # Meta-Baseline starts from the pre-trained backbone of a lit_meta checkpoint and trains on episodes.
    path = tmp_path / "pretrained.ckpt"
    trainer.save_checkpoint(path)
    episodic = OmniglotDataModule(root=omniglot_root, split="lake", background="small1", test_set="split", ways=5, queries=5, meta_batch_size=2)
    meta = MetaBaseline(Conv4(in_channels=1, hidden=32, out_features=None, pool="max", fused_norm=True), init_from=str(path))
    captured = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            captured.update({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})

    cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[Capture()]).fit(meta, episodic)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(captured[key], value), key


# --------------------------------------------------------------------------------------------------- configs
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
CONFIGS = {
    "omniglot_pretrain_simpleshot_5w1s": (Pretrain, 5, "nearest_centroid", "cl2"),
    "omniglot_pretrain_simpleshot_20w1s": (Pretrain, 20, "nearest_centroid", "cl2"),
    "omniglot_pretrain_logreg_5w1s": (Pretrain, 5, "logistic_regression", "l2"),
    "omniglot_baselinepp_5w1s": (Pretrain, 5, "finetune_head", "none"),
    "omniglot_metabaseline_5w1s": (MetaBaseline, 5, None, None),
    "omniglot_metabaseline_20w1s": (MetaBaseline, 20, None, None),
    "miniimagenet_rfs_resnet12": (Pretrain, 5, "logistic_regression", "l2"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_builds_and_names_its_protocol(name):
    from lit_meta.cli import MetaCLI

    path = REPO / "configs" / f"{name}.yaml"
    text = path.read_text()
    assert "Published" in text and "Deviations:" in text
    cls, ways, evaluator, transform = CONFIGS[name]
    cli = MetaCLI(args=["--config", str(path), "--trainer.logger", "false"], run=False)
    model, data = cli.model, cli.datamodule
    assert type(model) is cls and data.ways == ways and model.normalization == "running"
    if cls is Pretrain:
        assert data.train_mode == "batches" and (model.evaluator, model.feature_transform) == (evaluator, transform)
    else:
        assert data.train_mode == "episodes" and model.init_from and model.tau == pytest.approx(10.0)
