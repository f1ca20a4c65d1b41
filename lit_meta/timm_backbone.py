"""Any model of PyTorch Image Models (``timm``) as a lit_meta backbone (the optional extra ``lit_meta[timm]``).

The model is built by name with timm's classifier removed (``num_classes=0``), so it returns pooled features, and
with its batch normalization replaced by :class:`~lit_meta.backbones.BatchStatNorm` unless asked otherwise. That
replacement is what lets it run under every algorithm: native ``nn.BatchNorm2d`` updates its running statistics in
place, which ``torch.func.vmap`` refuses in training, and its vmapped second-order gradient is wrong (see
:mod:`lit_meta.backbones`); ``BatchStatNorm`` computes the same training forward pass, is exact, and follows the
algorithm's ``normalization`` protocol at evaluation. Other layers keep timm's code: where one cannot run under vmap
or second order, the algorithm says so (layer norms, for second-order MAML) or the per-task loop
(``vectorize: false``) runs it.

Pretrained weights come only from a file the user names; the library never downloads any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from datamodules.errors import ConfigError
from lit_meta.backbones import Backbone, BatchStatNorm

NORMS = ("batch_stat", "native")


def _first_line(err: BaseException) -> str:
    """The error's first line, with the first detail when it only announces a list (as ``load_state_dict``'s does)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def import_timm() -> Any:
    """The ``timm`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("TimmBackbone needs the timm package: pip install lit_meta[timm]") from None
    return timm


class _BatchStatNormAct(BatchStatNorm):
    """:class:`BatchStatNorm` followed by the dropout and activation of a timm ``BatchNormAct2d`` it replaces (the
    state-dict keys stay timm's)."""

    def __init__(self, num_features: int, eps: float, momentum: float, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _replacement(layer: nn.modules.batchnorm._BatchNorm) -> BatchStatNorm | None:
    """The :class:`BatchStatNorm` computing what ``layer`` computes in training, holding its weights and running
    statistics; ``None`` for a layer it cannot stand for (no affine map or no running statistics, or a subclass of
    unknown behaviour)."""
    if not (layer.affine and layer.track_running_stats):
        return None
    momentum = layer.momentum if layer.momentum is not None else 0.1
    if type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d):
        norm = BatchStatNorm(layer.num_features, eps=layer.eps, momentum=momentum)
    elif type(layer).__name__ == "BatchNormAct2d" and isinstance(getattr(layer, "act", None), nn.Module):
        norm = _BatchStatNormAct(layer.num_features, layer.eps, momentum, layer.drop, layer.act)
    else:
        return None
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(norm, name).copy_(getattr(layer, name))
    return norm


def replace_batch_norms(module: nn.Module) -> int:
    """Replace, in place, every batch normalization of ``module`` that :class:`BatchStatNorm` can stand for; returns
    how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        norm = _replacement(child) if isinstance(child, nn.modules.batchnorm._BatchNorm) else None
        if norm is not None:
            setattr(module, name, norm.to(device=child.weight.device, dtype=child.weight.dtype))
            replaced += 1
        else:
            replaced += replace_batch_norms(child)
    return replaced


class TimmBackbone(Backbone):
    """A ``timm`` model by name: its pooled features, and an optional linear ``head``.

    Example::

        backbone = TimmBackbone("resnet18", in_channels=3)                   # 512-d embeddings, random init
        backbone = TimmBackbone("resnet18", pretrained_path="resnet18.safetensors", out_features=5)

    In a config::

        backbone:
          class_path: lit_meta.TimmBackbone
          init_args: {name: resnet10t, in_channels: 1}

    Args:
        name: a timm model name (see ``timm.list_models()``), e.g. ``"resnet18"``, ``"resnet10t"``.
        in_channels: image channels (timm's ``in_chans``); pretrained weights of another channel count are adapted
            by timm (summed over channels for 1, repeated for more).
        out_features: classes of a linear ``head`` on the features (what MAML and ANIL adapt); ``None`` returns the
            features (the metric methods, ``Pretrain``).
        pretrained_path: a local file of weights for this model (``.safetensors``, or a PyTorch file of a state
            dict, loaded with ``weights_only=True``), read once when the backbone is built; ``None``: random
            initialization. Its classifier weights are dropped. A lit_meta checkpoint records the backbone without
            this path: its own weights replace the file's when it is loaded.
        norm: ``"batch_stat"``: every ``nn.BatchNorm1d/2d`` (and timm's ``BatchNormAct2d``) becomes a
            :class:`~lit_meta.backbones.BatchStatNorm` with the same weights and running statistics, exact under
            ``vmap`` and second order; ``"native"``: timm's layers as they are, which episodic training can then run
            only with ``vectorize: false`` and second-order MAML not vmapped (the algorithms refuse, in one line), and
            which evaluate with their running statistics (``model.eval()``) whatever the ``normalization`` protocol.
        model_args: further keyword arguments of ``timm.create_model`` (e.g. ``{drop_path_rate: 0.1}``).

    Raises:
        ConfigError: timm is not installed, the name is unknown, or the weights file is missing or does not fit.
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        out_features: int | None = None,
        pretrained_path: str | None = None,
        norm: str = "batch_stat",
        model_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"TimmBackbone: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        timm = import_timm()
        if not timm.is_model(name):
            raise ConfigError(f"TimmBackbone: timm {timm.__version__} has no model {name!r}; see timm.list_models()")
        options: dict[str, Any] = dict(model_args or {})
        for reserved in ("num_classes", "in_chans", "pretrained", "pretrained_cfg_overlay"):
            if reserved in options:
                raise ConfigError(f"TimmBackbone: model_args may not set {reserved}; it is TimmBackbone's to set")
        if pretrained_path is not None:
            weights = self._read_weights(pretrained_path)
            file_keys = set(weights)
            options.update(pretrained=True, pretrained_cfg_overlay={"state_dict": weights})
        try:
            self.model = timm.create_model(name, num_classes=0, in_chans=in_channels, **options)
        except TypeError as err:
            raise ConfigError(f"TimmBackbone: timm's {name} does not take these model_args: {_first_line(err)}") from None
        except RuntimeError as err:
            if pretrained_path is None:
                raise
            raise ConfigError(f"TimmBackbone: the weights in {pretrained_path} do not fit timm's {name}: {_first_line(err)}") from None
        if pretrained_path is not None:
            # timm loads without strictness once it has dropped the classifier, so a file of another model would
            # leave this one randomly initialized without a word: every entry must be in the file.
            missing = [k for k in self.model.state_dict() if k not in file_keys and not k.endswith("num_batches_tracked")]
            if missing:
                raise ConfigError(
                    f"TimmBackbone: the weights in {pretrained_path} lack {len(missing)} of the entries of timm's {name}, "
                    f"e.g. {missing[0]}; give a file of that model's weights"
                )
        if norm == "batch_stat":
            replace_batch_norms(self.model)
        self.name = name
        self.in_channels = in_channels
        self.norm = norm
        self.embedding_dim: int = int(self.model.num_features)
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        # The record a checkpoint rebuilds from: the architecture only, since the checkpoint holds the weights (and
        # the file need not exist where the checkpoint is loaded).
        recorded = self.__dict__["_backbone_spec"]["init_args"]
        if "pretrained_path" in recorded:
            recorded["pretrained_path"] = None

    @staticmethod
    def _read_weights(path: str) -> dict[str, Tensor]:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"TimmBackbone: no weights file at {file}; give pretrained_path the path of a local file")
        from timm.models import load_state_dict

        try:
            return load_state_dict(str(file), weights_only=True)
        except Exception as err:  # pickle, safetensors and zip errors alike: the file is not a readable state dict
            raise ConfigError(
                f"TimmBackbone: cannot read weights from {file} ({type(err).__name__}: {_first_line(err)}); give a "
                ".safetensors file or a PyTorch state dict"
            ) from None

    def embed(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z
