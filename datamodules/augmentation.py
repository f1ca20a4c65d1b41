"""Per-image augmentation of training images: random crop, horizontal flip and colour jitter.

These are the augmentations of the ResNet-12 recipes (Lee et al. 2019's MetaOptNet, Tian et al. 2020's RFS:
``RandomCrop(84, padding=8)``, ``ColorJitter(0.4, 0.4, 0.4)``, ``RandomHorizontalFlip()``), plus torchvision's
``RandomResizedCrop``. They split in two halves so that they stay exact under resume and cheap on the device:

* :meth:`Augmentation.draw` runs where the batch is gathered, on the host: each image's parameters (crop box, flip,
  jitter factors and their order) come from a counter-based generator that the training loader keys by the batch's
  place in the stream (see :mod:`datamodules.sampler`), so a resumed run draws the same ones;
* :meth:`Augmentation.apply` runs on the device after the ``uint8`` images became floats in ``[0, 1]``
  (``on_after_batch_transfer``): a batched gather or ``grid_sample`` for the crop, and tensor arithmetic for flip and
  jitter, each image with its own parameters. The operations compute what torchvision's ``resized_crop`` (bilinear),
  ``crop`` with zero padding, ``horizontal_flip``, ``adjust_brightness``, ``adjust_contrast`` and
  ``adjust_saturation`` compute for one image at a time.

Only training batches carry parameters; validation, test and prediction batches are never augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.errors import ConfigError
from datamodules.task_batch import ExampleBatch, TaskBatch

#: The keys of the ``augment`` option.
OPTIONS = ("crop", "flip", "color_jitter")
JITTERS = ("brightness", "contrast", "saturation")
#: torchvision's ``rgb_to_grayscale`` weights (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)
#: Tries of the random resized crop before it falls back to a centre crop (torchvision's number).
CROP_TRIES = 10
#: Uniform numbers drawn per image: scale and ratio per try, top and left, flip, three factors, their order.
_UNIFORMS = 2 * CROP_TRIES + 2 + 1 + len(JITTERS) + len(JITTERS)


@dataclass
class AugmentationParams:
    """The parameters of ``n`` images (any leading shape ``[...]``).

    Attributes:
        box: ``long [..., 4]``: ``(top, left, height, width)`` of the crop in the image's pixels; with ``padding``
            the box may reach ``padding`` pixels outside the image, which reads as zeros.
        flip: ``bool [...]``: mirror left-right.
        factors: ``float [..., 3]``: brightness, contrast and saturation factors (1: unchanged).
        order: ``long [..., 3]``: the jitters in the order they are applied (indices into ``factors``).
    """

    box: Tensor
    flip: Tensor
    factors: Tensor
    order: Tensor

    def to(self, device: torch.device | str) -> "AugmentationParams":
        """The parameters on ``device`` (their dtypes never change: boxes and orders are indices)."""
        return AugmentationParams(*(getattr(self, f.name).to(device) for f in fields(self)))

    def flatten(self) -> "AugmentationParams":
        """The parameters with the leading dimensions merged into one."""
        return AugmentationParams(
            self.box.reshape(-1, 4), self.flip.reshape(-1), self.factors.reshape(-1, 3), self.order.reshape(-1, 3)
        )

    @staticmethod
    def stack(parts: list["AugmentationParams"]) -> "AugmentationParams":
        return AugmentationParams(*(torch.stack([getattr(p, f.name) for p in parts]) for f in fields(AugmentationParams)))


def _pair(value: Any, name: str, high: float | None) -> tuple[float, float]:
    """``(a, b)`` with ``0 < a <= b`` (``<= high``), else a one-line error naming ``name``."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augment: {name} must be a pair [low, high] of numbers, got {value!r}") from None
    if not (0 < a <= b and (high is None or b <= high)):
        bound = f"0 < low <= high <= {high:g}" if high is not None else "0 < low <= high"
        raise ConfigError(f"augment: {name} must satisfy {bound}, got {value!r}")
    return a, b


@dataclass(frozen=True)
class Augmentation:
    """Random crop, horizontal flip and colour jitter with each image's own parameters.

    Built from a datamodule's ``augment`` option (see :meth:`from_spec`), e.g. the RFS / MetaOptNet recipe::

        augment:
          crop: {padding: 8}        # an image-sized crop of the image zero-padded by 8 pixels on each side
          flip: true                # mirrored left-right with probability 1/2
          color_jitter: 0.4         # brightness, contrast and saturation factors uniform in [0.6, 1.4]

    or torchvision's random resized crop, ``crop: {scale: [0.08, 1.0], ratio: [0.75, 1.3333]}``: a box of a random
    fraction ``scale`` of the image's area and aspect ratio ``ratio`` (log-uniform), resized back to the image's size
    bilinearly. ``color_jitter`` is one strength for the three jitters or a mapping of some of them, e.g.
    ``{brightness: 0.4, contrast: 0.4}``; strength ``s`` draws a factor uniform in ``[max(0, 1 - s), 1 + s]``, and
    the jitters apply in a random order per image, as torchvision's ``ColorJitter`` does. Hue jitter is not offered.
    Saturation needs colour: on 1-channel images (Omniglot) it is refused, brightness and contrast are not.

    Args:
        padding: random crop from the zero-padded image (``crop: {padding: p}``); ``None`` for none.
        scale: random resized crop: the range of the box's area as a fraction of the image's.
        ratio: random resized crop: the range of the box's aspect ratio (width / height).
        flip: random horizontal flip.
        brightness, contrast, saturation: jitter strengths (0: off).
    """

    padding: int | None = None
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "Augmentation | None":
        """The augmentation an ``augment`` option describes, or ``None`` for no augmentation.

        Raises:
            ConfigError: one line naming the option that is wrong and what it accepts.
        """
        if spec is None or spec is False:
            return None
        if not isinstance(spec, Mapping):
            raise ConfigError(f"augment must be a mapping such as {{crop: {{padding: 8}}, flip: true, color_jitter: 0.4}} or null, got {spec!r}")
        unknown = [key for key in spec if key not in OPTIONS]
        if unknown:
            raise ConfigError(f"augment: unknown option {unknown[0]!r}; the options are {', '.join(OPTIONS)}")
        options: dict[str, Any] = {}
        crop = spec.get("crop")
        if crop is not None:
            if not isinstance(crop, Mapping) or not crop or set(crop) - {"padding", "scale", "ratio"}:
                raise ConfigError(f"augment: crop must be {{padding: p}} or {{scale: [low, high], ratio: [low, high]}}, got {crop!r}")
            if "padding" in crop:
                if set(crop) != {"padding"}:
                    raise ConfigError("augment: crop takes padding (random crop) or scale and ratio (random resized crop), not both")
                padding = crop["padding"]
                if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
                    raise ConfigError(f"augment: crop padding must be a non-negative integer, got {padding!r}")
                options["padding"] = padding
            else:
                options["scale"] = _pair(crop.get("scale", (0.08, 1.0)), "crop scale", 1.0)
                if "ratio" in crop:
                    options["ratio"] = _pair(crop["ratio"], "crop ratio", None)
        flip = spec.get("flip", False)
        if not isinstance(flip, bool):
            raise ConfigError(f"augment: flip must be true or false, got {flip!r}")
        options["flip"] = flip
        jitter = spec.get("color_jitter")
        if jitter is not None:
            if isinstance(jitter, Mapping):
                wrong = [key for key in jitter if key not in JITTERS]
                if wrong:
                    raise ConfigError(f"augment: color_jitter has no {wrong[0]!r}; it takes {', '.join(JITTERS)} (hue is not offered)")
                strengths = dict(jitter)
            else:
                strengths = dict.fromkeys(JITTERS, jitter)
            for name, value in strengths.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    raise ConfigError(f"augment: color_jitter {name} must be a non-negative number, got {value!r}")
                options[name] = float(value)
        return cls(**options)

    # ------------------------------------------------------------------------------------------------- checks
    @property
    def jitters(self) -> tuple[float, float, float]:
        return (self.brightness, self.contrast, self.saturation)

    def check_images(self, channels: int, height: int, width: int, owner: str) -> None:
        """Raise a one-line :class:`ConfigError` where these images cannot take this augmentation."""
        if any(self.jitters) and channels not in (1, 3):
            raise ConfigError(f"{owner}: augment color_jitter needs 1- or 3-channel images, these have {channels}; drop color_jitter")
        if self.saturation and channels == 1:
            raise ConfigError(
                f"{owner}: augment color_jitter changes saturation, which 1-channel images do not have; jitter "
                f"brightness and contrast only, e.g. color_jitter: {{brightness: {self.saturation:g}, contrast: {self.saturation:g}}}"
            )
        if self.padding is not None and self.padding > min(height, width):
            raise ConfigError(f"{owner}: augment crop padding {self.padding} exceeds the {height}x{width} image; lower it")

    # ------------------------------------------------------------------------------------------------ drawing
    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> AugmentationParams:
        """The parameters of ``count`` images of ``height x width`` pixels, from ``generator`` alone.

        Every image takes a fixed number of uniform numbers from the generator, whichever options are on, so its
        parameters depend only on the generator and its place in the batch.
        """
        u = torch.rand(count, _UNIFORMS, generator=generator, dtype=torch.float64)
        scale_u, ratio_u = u[:, :CROP_TRIES], u[:, CROP_TRIES : 2 * CROP_TRIES]
        top_u, left_u = u[:, 2 * CROP_TRIES], u[:, 2 * CROP_TRIES + 1]
        flip_u = u[:, 2 * CROP_TRIES + 2]
        factor_u = u[:, 2 * CROP_TRIES + 3 : 2 * CROP_TRIES + 6]
        order_u = u[:, 2 * CROP_TRIES + 6 :]

        if self.padding is not None:
            span = 2 * self.padding + 1
            top = (top_u * span).long().clamp_(max=span - 1) - self.padding
            left = (left_u * span).long().clamp_(max=span - 1) - self.padding
            box = torch.stack([top, left, torch.full_like(top, height), torch.full_like(top, width)], dim=1)
        elif self.scale is not None:
            box = self._resized_crop_boxes(scale_u, ratio_u, top_u, left_u, height, width)
        else:
            box = torch.tensor([0, 0, height, width]).expand(count, 4).clone()

        flip = (flip_u < 0.5) if self.flip else torch.zeros(count, dtype=torch.bool)
        strengths = torch.tensor(self.jitters, dtype=torch.float64)
        low = (1 - strengths).clamp(min=0)
        factors = (low + factor_u * (1 + strengths - low)).float()
        order = order_u.argsort(dim=1)
        return AugmentationParams(box, flip, factors, order)

    def _resized_crop_boxes(
        self, scale_u: Tensor, ratio_u: Tensor, top_u: Tensor, left_u: Tensor, height: int, width: int
    ) -> Tensor:
        # torchvision's RandomResizedCrop.get_params, for every image at once: the first of CROP_TRIES boxes that
        # fits, else the centre crop of the nearest allowed aspect ratio.
        area = height * width
        lo, hi = self.scale
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        target = area * (lo + scale_u * (hi - lo))
        aspect = torch.exp(log_lo + ratio_u * (log_hi - log_lo))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.long().argmax(dim=1, keepdim=True)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(height * self.ratio[1])), height
        else:
            fw, fh = width, height
        found = fits.any(dim=1)
        w, h = torch.where(found, w, fw), torch.where(found, h, fh)
        top = torch.where(found, (top_u * (height - h + 1)).long().clamp(max=height - h), (height - h) // 2)
        left = torch.where(found, (left_u * (width - w + 1)).long().clamp(max=width - w), (width - w) // 2)
        return torch.stack([top, left, h, w], dim=1)

    def draw_tasks(self, batch: TaskBatch, generators: list[torch.Generator]) -> "AugmentedBatch":
        """``batch`` with parameters for each task's support then query images, task ``t``'s from ``generators[t]``."""
        n_support, n_query = batch.support_x.shape[1], batch.query_x.shape[1]
        height, width = batch.support_x.shape[-2:]
        drawn = [self.draw(n_support + n_query, height, width, g) for g in generators]
        support = AugmentationParams.stack([_rows(p, 0, n_support) for p in drawn])
        query = AugmentationParams.stack([_rows(p, n_support, n_support + n_query) for p in drawn])
        return AugmentedBatch(batch, self, {"support_x": support, "query_x": query})

    def draw_examples(self, batch: ExampleBatch, generator: torch.Generator) -> "AugmentedBatch":
        """``batch`` with parameters for each of its images, from ``generator``."""
        height, width = batch.x.shape[-2:]
        return AugmentedBatch(batch, self, {"x": self.draw(batch.x.shape[0], height, width, generator)})

    # ----------------------------------------------------------------------------------------------- applying
    def apply(self, images: Tensor, params: AugmentationParams) -> Tensor:
        """Augment float images ``[..., C, H, W]`` in ``[0, 1]``, each with its own parameters (leading shapes equal)."""
        shape = images.shape
        x = images.reshape(-1, *shape[-3:])
        p = params.to(x.device).flatten()
        if self.padding is not None:
            x = padded_crop(x, p.box[:, 0], p.box[:, 1], self.padding)
        elif self.scale is not None:
            x = resized_crop(x, p.box)
        if self.flip:
            x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if any(self.jitters):
            x = self._jitter(x, p.factors.to(x.dtype), p.order)
        return x.reshape(shape)

    def _jitter(self, x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
        ops = [(i, op) for i, (op, strength) in enumerate(zip((brightness, contrast, saturation), self.jitters)) if strength]
        for position in range(len(JITTERS)):
            step = order[:, position]
            out = x
            for i, op in ops:
                chosen = (step == i).view(-1, 1, 1, 1)
                out = torch.where(chosen, op(x, factors[:, i].view(-1, 1, 1, 1)), out)
            x = out
        return x


def _rows(params: AugmentationParams, start: int, stop: int) -> AugmentationParams:
    return AugmentationParams(*(getattr(params, f.name)[start:stop] for f in fields(AugmentationParams)))


# ------------------------------------------------------------------------------------------------ operations
def padded_crop(x: Tensor, top: Tensor, left: Tensor, padding: int) -> Tensor:
    """``[n, C, H, W]``: image ``i``'s window at ``(top[i], left[i])`` of its zero-padded self (an exact gather)."""
    n, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (top + padding).view(n, 1, 1) + torch.arange(height, device=x.device).view(1, height, 1)
    cols = (left + padding).view(n, 1, 1) + torch.arange(width, device=x.device).view(1, 1, width)
    # Advanced indices around the channel slice put the indexed dimensions first: [n, H, W, C].
    return padded[torch.arange(n, device=x.device).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)


def resized_crop(x: Tensor, box: Tensor) -> Tensor:
    """``[n, C, H, W]``: image ``i``'s box ``(top, left, height, width)`` resized bilinearly to ``H x W``.

    The sampling grid is that of ``F.interpolate(crop, (H, W), mode="bilinear", align_corners=False)`` on the cropped
    image, clamped to the box so that no pixel outside it contributes.
    """
    n, _, height, width = x.shape
    box = box.to(torch.float64)
    top, left, h, w = (box[:, k].view(n, 1) for k in range(4))
    out_y = torch.arange(height, device=x.device, dtype=torch.float64).view(1, height)
    out_x = torch.arange(width, device=x.device, dtype=torch.float64).view(1, width)
    src_y = top + torch.minimum(((out_y + 0.5) * h / height - 0.5).clamp(min=0), h - 1)
    src_x = left + torch.minimum(((out_x + 0.5) * w / width - 0.5).clamp(min=0), w - 1)
    grid_y = (2 * src_y + 1) / height - 1
    grid_x = (2 * src_x + 1) / width - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x.view(n, 1, width), grid_y.view(n, height, 1)), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: Tensor) -> Tensor:
    """``[n, 1, H, W]`` luma of RGB images (the image itself for one channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor).clamp(0, 1)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


class AugmentedBatch:
    """A training batch and the augmentation parameters of its images, on their way to the device.

    The training loader yields it; the datamodule's ``on_after_batch_transfer`` turns it into the augmented
    :class:`TaskBatch` or :class:`ExampleBatch` the algorithm sees. It is deliberately not a dataclass: Lightning then
    moves it with :meth:`to` and leaves its parameters out of the precision conversion it applies to batches.

    Args:
        batch: the batch, images still as gathered (``uint8`` or float).
        augmentation: what to apply.
        params: parameters per image field of ``batch`` (``support_x``/``query_x``, or ``x``), shaped like its
            leading dimensions.
    """

    def __init__(self, batch: TaskBatch | ExampleBatch, augmentation: Augmentation, params: dict[str, AugmentationParams]) -> None:
        self.batch = batch
        self.augmentation = augmentation
        self.params = params

    def to(self, *args: Any, **kwargs: Any) -> "AugmentedBatch":
        batch = self.batch.to(*args, **kwargs)
        device = next(iter(vars(batch).values())).device
        return AugmentedBatch(batch, self.augmentation, {k: p.to(device) for k, p in self.params.items()})

    def applied(self, batch: TaskBatch | ExampleBatch) -> TaskBatch | ExampleBatch:
        """``batch`` (this batch's images as floats in ``[0, 1]``) with every image augmented."""
        return replace(batch, **{name: self.augmentation.apply(getattr(batch, name), p) for name, p in self.params.items()})
