"""Backbones for few-shot learning.

Every backbone here is exact under ``torch.func.vmap`` with second-order gradients. Native ``nn.BatchNorm2d`` is not:
its second-order meta-gradient under vmap is silently wrong (about 1% relative error on Conv-4, where the per-task
loop and finite differences agree), so normalization is :class:`BatchStatNorm`, written with plain tensor ops.
Training normalizes with batch statistics, as the reference MAML did, and records running statistics; which
statistics evaluation uses is the algorithm's ``normalization`` protocol (:mod:`lit_meta.normalization`).

A backbone built with ``out_features`` ends in a linear layer named ``head`` (the part ANIL adapts); without it, it
returns embeddings (what metric methods use).

ResNet-12 can regularize with dropout and :class:`DropBlock`, random in training and the identity in evaluation;
under vmap every task draws its own masks. Any ``timm`` model is a backbone through
:class:`lit_meta.timm_backbone.TimmBackbone`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.errors import ConfigError
from lit_meta.normalization import Recording, current_recording, statistics_source


class Backbone(nn.Module):
    """Base class that records how a backbone was built, so a checkpoint can rebuild it.

    The record is ``{"class_path": ..., "init_args": {...}}`` (the LightningCLI format), which the algorithms store
    in their hyper-parameters instead of a pickled module: checkpoints then load with ``torch.load(weights_only=True)``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_backbone_spec" not in self.__dict__:  # the outermost class's arguments describe the object
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
                self.__dict__["_backbone_spec"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
            init(self, *args, **kw)

        cls.__init__ = recording_init


def backbone_spec(module: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a :class:`Backbone`, or ``None`` for other modules."""
    spec = module.__dict__.get("_backbone_spec")
    if spec is None:
        return None
    return {"class_path": spec["class_path"], "init_args": dict(spec["init_args"])}


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a backbone from ``{"class_path", "init_args"}``."""
    try:
        module_name, _, class_name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
    except (KeyError, ImportError, AttributeError) as err:
        raise ConfigError(f"cannot build backbone {spec!r}: {err}") from None
    return cls(**spec.get("init_args", {}))


class BatchStatNorm(nn.Module):
    """Normalization over every dimension but the channel one (dim 1), with an affine map and running statistics.

    In training it normalizes with the statistics of the batch it sees, like ``nn.BatchNorm{1,2}d``, but with exact
    higher-order gradients under ``vmap``; the statistics it computed are recorded on the side and folded into
    ``running_mean``/``running_var`` once per optimizer step (see :mod:`lit_meta.normalization`). Which statistics
    it uses at evaluation is the algorithm's ``normalization`` protocol: the batch's, the support set's, or the
    running ones.

    ``fused=True`` calls PyTorch's native batch-norm kernel in training instead (faster on CPU). Its *second-order*
    gradient under ``vmap`` is silently wrong, so it is only for methods without second-order terms (ProtoNet,
    MatchingNet, first-order MAML, Reptile); the second-order algorithms refuse it (see :func:`uses_fused_norm`).

    Args:
        num_features: channels.
        eps: added to the variance.
        fused: use the native kernel (first-order methods only).
        momentum: weight of each optimizer step's statistics in the running averages (as ``nn.BatchNorm``'s).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, fused: bool = False, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"norm momentum must be in (0, 1], got {momentum!r}")
        self.eps = eps
        self.fused = fused
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Optimizer steps folded in; -1 marks a model whose running statistics were never recorded (a checkpoint
        # written without them), which the running protocol refuses.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _affine(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        # Normalization and affine folded into one per-channel scale and shift: two passes over x instead of six.
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var.reshape(shape) + self.eps) * self.weight.view(shape)
        return x * scale + (self.bias.view(shape) - mean.reshape(shape) * scale)

    def forward(self, x: Tensor) -> Tensor:
        source = statistics_source()
        if source == "running":
            return self._affine(x, self.running_mean, self.running_var)
        rows = x if source is None else x[:source]
        scope = current_recording()
        dims = [0] + list(range(2, x.dim()))
        if self.fused and source is None:
            # The native kernel also returns the batch statistics, so recording them costs no extra pass over x.
            out, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps)
            if scope is not None:
                self._record(scope, rows, mean, invstd.detach().pow(-2) - self.eps)
            return out
        var, mean = torch.var_mean(rows, dim=dims, keepdim=True, correction=0)
        if scope is not None:
            self._record(scope, rows, mean, var)
        return self._affine(x, mean, var)

    def _record(self, scope: Recording, rows: Tensor, mean: Tensor, var: Tensor) -> None:
        n = rows.numel() // rows.shape[1]
        scope.add(self, mean.flatten(), var.flatten() * (n / max(n - 1, 1)))

    def update_running_statistics(self, mean: Tensor, var: Tensor) -> None:
        """One momentum step of the running averages toward a step's batch ``mean`` and unbiased ``var``."""
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
            self.num_batches_tracked.clamp_(min=0).add_(1)


def uses_fused_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a :class:`BatchStatNorm` with ``fused=True``."""
    return any(isinstance(m, BatchStatNorm) and m.fused for m in module.modules())


def inexact_norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The native normalization layers of ``module`` whose second-order gradients are wrong under ``vmap``.

    Measured against the per-task loop (MAML's meta-gradient, float64): ``nn.BatchNorm*`` with affine parameters
    (about 9% relative error), ``nn.InstanceNorm*`` with ``affine=True`` (1%), ``nn.LayerNorm`` with
    ``elementwise_affine=True`` (0.1%). The same layers without affine parameters, and ``nn.GroupNorm``, are exact.
    """
    found = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)) and m.affine:
            found.append((name, m))
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            found.append((name, m))
    return found


def refuse_fused_norm_for_second_order(backbone: nn.Module, second_order: bool, vectorize: bool, name: str) -> None:
    """Raise a one-line error where a normalization layer would make a vmapped second-order meta-gradient wrong.

    That is a :class:`BatchStatNorm` with ``fused=True``, or a native layer of :func:`inexact_norm_layers`, in the
    module the inner loop differentiates through, when the tasks are vmapped (``vectorize``) and the meta-gradient
    is second order.

    Raises:
        ConfigError: naming the layer and the fixes.
    """
    if not (second_order and vectorize):
        return
    if uses_fused_norm(backbone):
        raise ConfigError(
            f"{name}: the backbone's fused_norm gives wrong second-order gradients under vmap; set fused_norm: false, "
            "first_order: true, or vectorize: false"
        )
    native = inexact_norm_layers(backbone)
    if native:
        raise ConfigError(
            f"{name}: the backbone's {_describe_layers(native)} gives "
            "wrong second-order gradients under vmap; normalize with lit_meta.BatchStatNorm instead, or set "
            "vectorize: false or first_order: true"
        )


def _describe_layers(layers: list[tuple[str, nn.Module]]) -> str:
    """``"BatchNorm2d layer block.0.norm (and 3 more)"``: the first of ``layers`` for a one-line error."""
    layer, module = layers[0]
    others = f" (and {len(layers) - 1} more)" if len(layers) > 1 else ""
    return f"{type(module).__name__} layer {layer or '(the backbone itself)'}{others}"


def running_statistics_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The native normalization layers of ``module`` that update running statistics in place in training."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return [(name, m) for name, m in module.named_modules() if isinstance(m, norms) and m.track_running_stats]


def refuse_running_statistics_under_vmap(backbone: nn.Module, vectorize: bool, name: str) -> None:
    """Raise a one-line error where training would vmap a layer that updates running statistics in place.

    ``torch.func.vmap`` cannot write one task's statistics into a buffer shared by every task: native
    ``nn.BatchNorm*`` (and ``nn.InstanceNorm*`` with ``track_running_stats``) fail in training under it.
    :class:`BatchStatNorm` records the statistics as outputs instead, and the per-task loop runs the native layers.

    Raises:
        ConfigError: naming the layer and the fixes.
    """
    if not vectorize:
        return
    layers = running_statistics_layers(backbone)
    if layers:
        raise ConfigError(
            f"{name}: the backbone's {_describe_layers(layers)} updates "
            "running statistics in place in training, which vmap cannot do; normalize with lit_meta.BatchStatNorm "
            "instead (TimmBackbone: norm: batch_stat), or set vectorize: false"
        )


def conv_block(
    in_channels: int, out_channels: int, pool: str, norm_eps: float = 1e-5, fused_norm: bool = False
) -> nn.Sequential:
    """3x3 conv, batch-statistics norm, ReLU, then 2x2 max-pool (``pool="max"``) or stride 2 (``pool="stride"``).

    This is Finn et al.'s ``conv_block``: with ``max_pool`` a stride-1 "SAME" conv followed by a 2x2/2 "VALID"
    max-pool; without, a stride-2 "SAME" conv (PyTorch's ``padding=1`` gives the same output size, ``ceil(s / 2)``).
    """
    if pool not in ("max", "stride"):
        raise ConfigError(f"pool must be 'max' or 'stride', got {pool!r}")
    stride = 2 if pool == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        BatchStatNorm(out_channels, eps=norm_eps, fused=fused_norm),
        nn.ReLU(),
    ]
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def maml_init_(module: nn.Module, head_init: str) -> None:
    """Finn et al.'s initialization: Glorot-uniform conv weights, zero biases, unit/zero norm scale/shift.

    The head is Glorot-uniform (``head_init="xavier"``, their mini-ImageNet network) or standard normal
    (``head_init="normal"``, their Omniglot network, whose head reads 64 spatially averaged features), with a zero bias.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Linear):
            if head_init == "normal":
                nn.init.normal_(sub.weight)
            else:
                nn.init.xavier_uniform_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, BatchStatNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class ConvBackbone(Backbone):
    """A convolutional ``features`` trunk, pooled by ``embedding`` (``"mean"`` or ``"flatten"``), and an optional
    linear ``head``; subclasses build those three attributes."""

    features: nn.Module
    embedding: str
    head: nn.Module | None

    def embed(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return h.mean(dim=(2, 3)) if self.embedding == "mean" else h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z


class Conv4(ConvBackbone):
    """The four-block CNN of Vinyals et al. / Finn et al. (2017).

    Each block is a 3x3 convolution with ``hidden`` filters, batch-statistics normalization, ReLU and a 2x2
    downsampling. Finn et al.'s two networks:

    * Omniglot (28x28x1): ``hidden=64, pool="stride", embedding="mean"``: stride-2 convolutions instead of pooling
      (28 -> 14 -> 7 -> 4 -> 2), the last feature map averaged over space, a 64 -> N head.
    * mini-ImageNet (84x84x3): ``hidden=32, pool="max", embedding="flatten"``: 2x2 max-pooling
      (84 -> 42 -> 21 -> 10 -> 5), the 32x5x5 feature map flattened, an 800 -> N head.

    Differences from the TensorFlow original, kept deliberately: the normalization has a learnable scale (TF's
    ``batch_norm`` default had none; initialized to 1 it starts identical). Training uses the statistics of the batch
    it sees, as the original did; evaluation follows the algorithm's ``normalization`` protocol.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet / CIFAR).
        hidden: filters per block (64 for Omniglot, 32 for MAML's mini-ImageNet).
        out_features: classes of the linear ``head``; ``None`` returns embeddings instead.
        pool: ``"max"`` (3x3 conv + 2x2 max-pool) or ``"stride"`` (stride-2 convs without pooling, Finn et al.'s
            Omniglot network).
        image_size: input height/width, to size the head.
        embedding: ``"flatten"`` the last feature map, or ``"mean"`` over its spatial positions (Finn et al. average
            for Omniglot).
        blocks: number of conv blocks (4).
        init: ``"maml"``: Finn et al.'s initialization (Glorot-uniform convs, zero biases; head standard normal with
            ``embedding="mean"`` as in their Omniglot network, Glorot-uniform with ``"flatten"`` as in their
            mini-ImageNet one); ``"torch"``: PyTorch's default initialization.
        norm_eps: the normalization's epsilon (1e-3, TensorFlow's ``batch_norm`` default that Finn et al. used).
        fused_norm: use PyTorch's native batch-norm kernel (faster; first-order methods only, see
            :class:`BatchStatNorm`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int | None = 5,
        pool: str = "max",
        image_size: int = 28,
        embedding: str = "flatten",
        blocks: int = 4,
        init: str = "maml",
        norm_eps: float = 1e-3,
        fused_norm: bool = False,
    ) -> None:
        super().__init__()
        if embedding not in ("flatten", "mean"):
            raise ConfigError(f"embedding must be 'flatten' or 'mean', got {embedding!r}")
        if init not in ("maml", "torch"):
            raise ConfigError(f"init must be 'maml' or 'torch', got {init!r}")
        self.in_channels, self.image_size, self.embedding = in_channels, image_size, embedding
        self.features = nn.Sequential(
            *(conv_block(in_channels if i == 0 else hidden, hidden, pool, norm_eps, fused_norm) for i in range(blocks))
        )
        size = image_size
        for _ in range(blocks):
            size = math.ceil(size / 2) if pool == "stride" else size // 2
        if size < 1:
            raise ConfigError(f"image_size {image_size} is too small for {blocks} downsampling blocks")
        self.feature_size = size
        self.embedding_dim = hidden if embedding == "mean" else hidden * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        if init == "maml":
            maml_init_(self, head_init="normal" if embedding == "mean" else "xavier")



def check_drop_options(drop_rate: float, block_size: int, ramp_steps: int) -> None:
    """Raise a one-line :class:`ConfigError` naming the first invalid dropout / DropBlock option."""
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ConfigError(f"drop_block_size must be a positive integer, got {block_size!r}")
    if not isinstance(ramp_steps, int) or isinstance(ramp_steps, bool) or ramp_steps < 0:
        raise ConfigError(f"drop_ramp_steps must be a non-negative integer, got {ramp_steps!r}")


class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018): zero contiguous ``block_size x block_size`` squares of each
    channel in training, rescaling the rest; the identity in evaluation.

    As in the ResNet-12 of MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020): block centres are drawn
    independently with probability ``gamma = rate / block_size^2 * H W / ((H - block_size + 1)(W - block_size + 1))``
    over the positions where a whole block fits, so that about ``rate`` of the units are dropped, and the kept units
    are multiplied by ``units / kept units`` (counted over the batch the layer sees; under ``vmap`` one task).
    Blocks are capped at the feature map's size.

    The rate ramps linearly from 0 to ``drop_rate`` over ``ramp_steps`` training steps, counted by
    :attr:`step`, which the algorithms set to the optimizer step before every training batch
    (:func:`set_training_step`); that keeps the schedule the same whether the tasks run vmapped or in a loop, and
    makes it resume with the step. The masks come from the global random generator, which lit_meta checkpoints save.

    Args:
        drop_rate: the fraction of units dropped once the ramp is over (RFS and MetaOptNet: 0.1).
        block_size: side of the dropped squares (5 on mini-ImageNet's 10x10 and 5x5 maps in both papers).
        ramp_steps: training steps over which the rate grows from 0 to ``drop_rate``; 0: ``drop_rate`` from the start.
    """

    def __init__(self, drop_rate: float, block_size: int, ramp_steps: int = 0) -> None:
        super().__init__()
        check_drop_options(drop_rate, block_size, ramp_steps)
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.ramp_steps = ramp_steps
        #: The training step the rate is ramped to (see :func:`set_training_step`).
        self.step = 0

    def rate(self) -> float:
        """The fraction of units dropped at :attr:`step`."""
        if self.ramp_steps == 0:
            return self.drop_rate
        return self.drop_rate * min(1.0, self.step / self.ramp_steps)

    def block_mask(self, x: Tensor, gamma: float, size: int) -> Tensor:
        """``[N, C, H, W]`` of 0 (dropped) and 1: ``size``-squares around centres drawn with probability ``gamma``."""
        n, c, h, w = x.shape
        centres = (torch.rand(n, c, h - size + 1, w - size + 1, device=x.device, dtype=x.dtype) < gamma).to(x.dtype)
        # A unit is dropped when a block whose top-left corner lies within size - 1 rows and columns above and left
        # of it was drawn: a max-pool over the centres padded by size - 1 on every side.
        return 1 - F.max_pool2d(F.pad(centres, [size - 1] * 4), size, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        rate = self.rate()
        if not self.training or rate == 0.0:
            return x
        h, w = x.shape[-2:]
        size = min(self.block_size, h, w)
        gamma = rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
        mask = self.block_mask(x, gamma, size)
        return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))


def set_training_step(module: nn.Module, step: int) -> None:
    """Set the training step of every :class:`DropBlock` in ``module`` (its rate ramps with it)."""
    for sub in module.modules():
        if isinstance(sub, DropBlock):
            sub.step = int(step)


class ResidualBlock12(nn.Module):
    """One block of ResNet-12: three 3x3 convs (norm, LeakyReLU between), a 1x1-conv shortcut, then 2x2 max-pool,
    optionally followed by dropout or :class:`DropBlock` (``drop``).

    ``out = drop(maxpool(lrelu(N3(C3(lrelu(N2(C2(lrelu(N1(C1(x))))))) + Ns(Cs(x))))))``
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        negative_slope: float = 0.1,
        norm_eps: float = 1e-5,
        drop: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = BatchStatNorm(out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BatchStatNorm(out_channels, eps=norm_eps)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = BatchStatNorm(out_channels, eps=norm_eps)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), BatchStatNorm(out_channels, eps=norm_eps)
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        out = self.pool(self.act(out + self.shortcut(x)))
        return self.drop(out) if self.drop is not None else out


class ResNet12(ConvBackbone):
    """The ResNet-12 of few-shot learning (Oreshkin et al. 2018, Lee et al. 2019), with batch-statistics norm.

    Four :class:`ResidualBlock12` of widths ``(64, 160, 320, 640)`` (the MetaOptNet widths; TADAM used
    ``(64, 128, 256, 512)``), each halving the resolution (84 -> 42 -> 21 -> 10 -> 5), LeakyReLU(0.1). Like
    :class:`Conv4` it is exact under ``vmap`` with second-order gradients, because its normalization is
    :class:`BatchStatNorm`.

    With ``drop_rate > 0`` it regularizes as MetaOptNet's and RFS's: after each block, dropout at ``drop_rate`` in the
    first blocks and :class:`DropBlock` (``drop_block_size``, rate ramped over ``drop_ramp_steps`` training steps) in
    the last ``drop_block_stages``. Both are the identity in evaluation. The default, ``drop_rate=0``, adds no layer.

    Args:
        in_channels: image channels.
        widths: output channels of the four blocks.
        out_features: classes of the linear ``head``; ``None`` returns embeddings.
        image_size: input height/width, to size the head when ``embedding="flatten"``.
        embedding: ``"mean"`` (global average pooling, 640 features) or ``"flatten"`` (MetaOptNet's 640x5x5).
        negative_slope: of the LeakyReLU.
        norm_eps: the normalization's epsilon.
        drop_rate: dropout and DropBlock rate (RFS and MetaOptNet: 0.1); 0 turns both off.
        drop_block_size: DropBlock's block side (5 in both papers on mini-ImageNet).
        drop_block_stages: how many of the last blocks use DropBlock instead of dropout (2 in both papers).
        drop_ramp_steps: training steps over which DropBlock's rate ramps up from 0 (RFS: 40,000 forward passes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 160, 320, 640),
        out_features: int | None = None,
        image_size: int = 84,
        embedding: str = "mean",
        negative_slope: float = 0.1,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_block_size: int = 5,
        drop_block_stages: int = 2,
        drop_ramp_steps: int = 0,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if embedding not in ("flatten", "mean"):
            raise ConfigError(f"embedding must be 'flatten' or 'mean', got {embedding!r}")
        if not widths:
            raise ConfigError("widths must name at least one block")
        if not isinstance(drop_block_stages, int) or isinstance(drop_block_stages, bool) or not 0 <= drop_block_stages <= len(widths):
            raise ConfigError(f"drop_block_stages must be an integer from 0 to {len(widths)} (the blocks), got {drop_block_stages!r}")
        check_drop_options(drop_rate, drop_block_size, drop_ramp_steps)
        self.embedding = embedding
        channels = (in_channels, *widths)

        def drop(stage: int) -> nn.Module | None:
            if drop_rate == 0:
                return None
            if stage >= len(widths) - drop_block_stages:
                return DropBlock(drop_rate, drop_block_size, drop_ramp_steps)
            return nn.Dropout(drop_rate)

        self.features = nn.Sequential(
            *(
                ResidualBlock12(a, b, negative_slope, norm_eps, drop(stage))
                for stage, (a, b) in enumerate(zip(channels[:-1], channels[1:]))
            )
        )
        size = image_size
        for _ in widths:
            size //= 2
        if size < 1:
            raise ConfigError(f"image_size {image_size} is too small for {len(widths)} pooling blocks")
        self.feature_size = size
        self.embedding_dim = widths[-1] if embedding == "mean" else widths[-1] * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu", a=negative_slope)


class SinusoidMLP(Backbone):
    """Finn et al.'s regression network: ``in -> 40 -> 40 -> out`` with ReLU."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = (in_features, *tuple(hidden))
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], out_features)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
