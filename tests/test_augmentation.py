"""Per-image augmentation of training batches: torchvision's results image by image, per-image parameters, never at
evaluation, exact under resume, and one-line errors for bad options.

The references are torchvision's ``transforms.v2.functional`` operations applied one image at a time with the drawn
parameters; the datamodule is a store of random images made here.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from conftest import cpu_trainer, random_images
from datamodules import Augmentation, AugmentedBatch, ClassImageDataModule, ConfigError, TaskBatch
from lit_meta import Conv4, DropBlock, ProtoNet, ResNet12
from lit_meta.checkpoints import CHECKPOINT_KEY

#: The RFS / MetaOptNet recipe, with the padding scaled to the small test images.
RECIPE = {"crop": {"padding": 2}, "flip": True, "color_jitter": 0.4}
RESIZED = {"crop": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333]}, "flip": True, "color_jitter": 0.4}


def ready(**kwargs) -> ClassImageDataModule:
    dm = random_images(**kwargs)
    dm.setup("fit")
    return dm


def prepared(dm: ClassImageDataModule, batch):
    return dm.on_after_batch_transfer(batch, 0)


def images_of(batch) -> list[torch.Tensor]:
    return [batch.support_x, batch.query_x] if isinstance(batch, TaskBatch) else [batch.x]


def reference(image: torch.Tensor, augmentation: Augmentation, box, flip, factors, order) -> torch.Tensor:
    """One image through torchvision's functional operations with the given parameters."""
    top, left, height, width = (int(v) for v in box)
    size = list(image.shape[-2:])
    if augmentation.padding is not None:
        pad = augmentation.padding
        out = TF.crop(TF.pad(image, [pad] * 4), top + pad, left + pad, *size)
    elif augmentation.scale is not None:
        out = TF.resized_crop(image, top, left, height, width, size)
    else:
        out = image
    if flip:
        out = TF.horizontal_flip(out)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in order.tolist():
        if augmentation.jitters[k]:
            out = adjust[k](out, float(factors[k]))
    return out


# ---------------------------------------------------------------------------------------- the operations
@pytest.mark.parametrize("spec", [RECIPE, RESIZED, {"crop": {"scale": [0.5, 1.0], "ratio": [0.2, 0.3]}}], ids=["padded-crop", "resized-crop", "resized-crop-fallback"])
def test_every_image_is_what_torchvision_makes_of_it_with_its_parameters(spec):
    augmentation = Augmentation.from_spec(spec)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(40, 3, 12, 16, generator=g)
    params = augmentation.draw(40, 12, 16, g)
    out = augmentation.apply(images, params)
    for i in range(40):
        expected = reference(images[i], augmentation, params.box[i], params.flip[i], params.factors[i], params.order[i])
        assert torch.allclose(out[i], expected, atol=1e-5), i
    if spec is RECIPE:  # the parameters cover their ranges: boxes within the padding, factors within 1 -+ 0.4
        assert params.box[:, :2].abs().max() <= 2 and len(set(map(tuple, params.box[:, :2].tolist()))) > 5
        assert 0.6 <= float(params.factors.min()) and float(params.factors.max()) <= 1.4
        assert 0 < int(params.flip.sum()) < 40
    if "ratio" in spec["crop"] and spec["crop"]["ratio"] == [0.2, 0.3]:  # no box fits: torchvision's centre crop
        fallback = RandomResizedCrop.get_params(images[0], [0.5, 1.0], [0.2, 0.3])
        assert params.box.tolist() == [list(fallback)] * 40


def test_every_image_gets_its_own_parameters():
    dm = ready(augment=RECIPE)
    batch = dm.train_dataloader().batch(0)
    assert isinstance(batch, AugmentedBatch)
    params = [batch.params["support_x"].flatten(), batch.params["query_x"].flatten()]
    factors = torch.cat([p.factors for p in params])
    assert len(factors) == 2 * (3 + 6)  # every image of every task, support and query
    assert len(set(map(tuple, factors.tolist()))) == len(factors)
    # The same image in every slot comes out differently in every slot.
    same = TaskBatch(
        torch.full((2, 3, 3, 12, 12), 0.5).add_(torch.linspace(0, 0.3, 12)),
        batch.batch.support_y,
        torch.full((2, 6, 3, 12, 12), 0.5).add_(torch.linspace(0, 0.3, 12)),
        batch.batch.query_y,
    )
    out = batch.applied(same)
    flat = torch.cat([out.support_x.flatten(0, 1), out.query_x.flatten(0, 1)]).flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == len(flat)


def test_grayscale_images_take_brightness_and_contrast_but_not_saturation():
    with pytest.raises(ConfigError, match=r"^RandomImages: augment color_jitter changes saturation, which 1-channel images do not have; jitter brightness and contrast only, e\.g\. color_jitter: \{brightness: 0\.4, contrast: 0\.4\}$"):
        ready(channels=1, augment={"color_jitter": 0.4})
    dm = ready(channels=1, augment={"crop": {"padding": 2}, "color_jitter": {"brightness": 0.4, "contrast": 0.4}})
    raw = dm.train_dataloader().batch(0)
    out = prepared(dm, raw)
    plain = dm.prepare_batch(raw.batch)
    params = raw.params["support_x"].flatten()
    for i, image in enumerate(plain.support_x.flatten(0, 1)):
        expected = reference(image, dm.augmentation, params.box[i], params.flip[i], params.factors[i], params.order[i])
        assert torch.allclose(out.support_x.flatten(0, 1)[i], expected, atol=1e-6)
    assert not torch.equal(out.support_x, plain.support_x)
    assert torch.all(params.factors[:, 2] == 1)  # no saturation factor is drawn


# ----------------------------------------------------------------------------------------- where it runs
def test_evaluation_batches_are_never_augmented():
    plain, augmented = ready(), ready(augment=RECIPE)
    for split in ("val", "test"):
        a, b = plain.episode_loader(split), augmented.episode_loader(split)
        for x, y in zip(a, b):
            assert isinstance(y, TaskBatch)
            x, y = prepared(plain, x), prepared(augmented, y)
            assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
    # Guard: the same datamodules' training batches differ, in support and query, and only by the augmentation.
    x, y = plain.train_dataloader().batch(0), augmented.train_dataloader().batch(0)
    assert torch.equal(x.support_x, y.batch.support_x) and torch.equal(x.query_y, y.batch.query_y)
    x, y = prepared(plain, x), prepared(augmented, y)
    assert not torch.equal(x.support_x, y.support_x) and not torch.equal(x.query_x, y.query_x)


@pytest.mark.parametrize("mode", ["episodes", "batches"])
def test_a_resumed_stream_augments_exactly_as_the_uninterrupted_one(mode):
    options = dict(augment=RESIZED, train_mode=mode, batch_size=7, seed=4)
    whole = ready(**options)
    loader = whole.train_dataloader()
    uninterrupted = [prepared(whole, b) for _ in range(2) for b in loader]  # two epochs

    interrupted = ready(**options)
    stream = iter(interrupted.train_dataloader())
    first = [prepared(interrupted, next(stream)) for _ in range(2)]
    state = interrupted.state_dict()

    resumed = ready(**options)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = [prepared(resumed, b) for b in loader] + [prepared(resumed, b) for b in loader]
    batches = first + rest
    assert len(batches) == len(uninterrupted)
    for a, b in zip(batches, uninterrupted):
        for x, y in zip(images_of(a), images_of(b)):
            assert torch.equal(x, y)

    # Guard: each of these batches is augmented, and the next epoch draws new parameters.
    plain = ready(train_mode=mode, batch_size=7, seed=4)
    loader = plain.train_dataloader()
    unaugmented = [prepared(plain, b) for _ in range(2) for b in loader]
    for a, b in zip(uninterrupted, unaugmented):
        assert not torch.equal(images_of(a)[0], images_of(b)[0])
    if mode == "batches":
        assert not torch.equal(uninterrupted[0].x, uninterrupted[len(uninterrupted) // 2].x)


class Record(Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch)


def test_a_training_run_sees_augmented_training_batches_and_plain_validation_batches():
    record = Record()
    model = ProtoNet(Conv4(in_channels=3, hidden=4, out_features=None, image_size=12, blocks=1, embedding="mean"))
    trainer = cpu_trainer(max_steps=3, callbacks=[record], limit_val_batches=1)
    trainer.fit(model, random_images(augment=RECIPE, seed=2))
    assert len(record.train) == 3 and len(record.val) == 1

    reference_dm = ready(augment=RECIPE, seed=2)
    loader = reference_dm.train_dataloader()
    for index, seen in enumerate(record.train):
        expected = reference_dm.prepare_batch(loader.batch(index))
        assert torch.equal(seen.support_x, expected.support_x) and torch.equal(seen.query_x, expected.query_x)
    plain = ready(seed=2)
    expected = plain.prepare_batch(next(iter(plain.val_dataloader())))
    assert torch.equal(record.val[0].support_x, expected.support_x)


def test_a_fit_with_augmentation_and_dropblock_resumes_exactly(tmp_path):
    """Augmentation parameters come from the batch's keys; DropBlock's masks from the global generator, whose state
    the checkpoint keeps; its rate from the optimizer step."""
    import lightning.pytorch as pl

    def run(steps, ckpt_path=None):
        pl.seed_everything(0)
        backbone = ResNet12(in_channels=3, widths=(4, 8), image_size=12, drop_rate=0.3, drop_block_size=3, drop_ramp_steps=4)
        model = ProtoNet(backbone)
        trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=tmp_path)
        torch.manual_seed(1234)  # whatever the global state at the start, a resumed run takes the checkpoint's
        trainer.fit(model, random_images(augment=RECIPE, seed=1), ckpt_path=ckpt_path)
        return model, trainer

    whole, _ = run(6)  # two epochs of 3 batches
    _, first = run(2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed, _ = run(6, ckpt_path=tmp_path / "step2.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    blocks = [m for m in resumed.modules() if isinstance(m, DropBlock)]
    assert len(blocks) == 2 and all(m.step == 5 and m.rate() == 0.3 for m in blocks)  # the last step was step 5

    # Guard: the masks are random and the saved generator state is what makes them match; without it the resumed
    # run draws other masks.
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    del checkpoint[CHECKPOINT_KEY]["rng"]
    torch.save(checkpoint, tmp_path / "no_rng.ckpt")
    other, _ = run(6, ckpt_path=tmp_path / "no_rng.ckpt")
    assert not all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), other.state_dict().values()))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "spec, message",
    [
        ({"crop": {"padding": 2}, "rotate": 10}, "augment: unknown option 'rotate'; the options are crop, flip, color_jitter"),
        ({"crop": {"padding": -1}}, "augment: crop padding must be a non-negative integer, got -1"),
        ({"crop": {"padding": 2, "scale": [0.5, 1]}}, "augment: crop takes padding (random crop) or scale and ratio (random resized crop), not both"),
        ({"crop": {"size": 8}}, "augment: crop must be {padding: p} or {scale: [low, high], ratio: [low, high]}, got {'size': 8}"),
        ({"crop": {"scale": [0.5, 1.5]}}, "augment: crop scale must satisfy 0 < low <= high <= 1, got [0.5, 1.5]"),
        ({"crop": {"scale": [0.5, 1], "ratio": [2, 1]}}, "augment: crop ratio must satisfy 0 < low <= high, got [2, 1]"),
        ({"flip": "yes"}, "augment: flip must be true or false, got 'yes'"),
        ({"color_jitter": {"hue": 0.1}}, "augment: color_jitter has no 'hue'; it takes brightness, contrast, saturation (hue is not offered)"),
        ({"color_jitter": -0.4}, "augment: color_jitter brightness must be a non-negative number, got -0.4"),
        ("flip", "augment must be a mapping such as {crop: {padding: 8}, flip: true, color_jitter: 0.4} or null, got 'flip'"),
    ],
)
def test_bad_augment_options_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError) as error:
        random_images(augment=spec)
    assert str(error.value) == message


def test_options_the_images_cannot_take_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"^RandomImages: augment crop padding 20 exceeds the 12x12 image; lower it$"):
        ready(augment={"crop": {"padding": 20}})
    assert random_images(augment=None).augmentation is None and random_images().augmentation is None
