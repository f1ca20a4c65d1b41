"""Evaluation protocols: which statistics the normalization layers use when a trained model meets a new task.

Few-shot papers differ here, and the difference moves accuracy by whole points. Every algorithm takes
``normalization``, one of:

* ``"transductive"``: a query set is normalized with batch statistics that include the other queries. For the
  optimization-based methods the query set is one batch (Finn et al.'s MAML, Nichol et al.'s "+ transduction"); for
  the metric-based ones support and query go through the backbone together (``joint_embedding``). A prediction then
  depends on the other queries, so the number of test queries is part of the protocol.
* ``"support"``: statistics of the support set alone, applied to every query (no running statistics needed).
* ``"per_query"``: each query is normalized with the support set plus itself (Nichol et al.'s non-transductive
  protocol: one forward pass per query).
* ``"running"``: running averages of the batch statistics, accumulated during meta-training, as ``model.eval()``
  uses for ``nn.BatchNorm`` (Snell et al.'s ProtoNet, Chen et al. 2019, most metric-based papers). Every evaluation
  forward pass uses them, the inner-loop steps on the support set included.

With ``support``, ``per_query`` and ``running`` a query's prediction does not depend on the other queries.
Training is the same under every protocol: batch statistics, with the running averages recorded on the side.

How it works: :class:`~lit_meta.backbones.BatchStatNorm` reads the statistics source from a context variable set
here (so no algorithm passes it through its backbone), and, while training, records the statistics it computed in
the current :func:`recording` scope. The per-task code returns the recorded statistics as outputs, which carries
them out of ``torch.func.vmap`` and ``torch.func.grad``; :func:`update_running_statistics` then folds them into
the running averages once per optimizer step.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from datamodules.errors import ConfigError

PROTOCOLS = ("transductive", "support", "per_query", "running")

#: Where the normalization layers take their statistics from: ``None`` (the batch they see), an ``int`` ``n`` (the
#: first ``n`` rows of that batch: the support set of a support-then-query batch), or ``"running"``.
_SOURCE: ContextVar[int | str | None] = ContextVar("lit_meta_norm_source", default=None)
#: The open recording scope, or ``None`` when nothing records.
_RECORDING: ContextVar["Recording | None"] = ContextVar("lit_meta_norm_recording", default=None)


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` if it is one of :data:`PROTOCOLS`, else raise a one-line :class:`ConfigError`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"normalization must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return protocol


def statistics_source() -> int | str | None:
    """The source the normalization layers use now (see :data:`_SOURCE`)."""
    return _SOURCE.get()


@contextmanager
def _source(value: int | str | None) -> Iterator[None]:
    token = _SOURCE.set(value)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def running_statistics() -> "contextmanager[None]":
    """Inside the block every normalization layer uses its running statistics."""
    return _source("running")


def batch_statistics() -> "contextmanager[None]":
    """Inside the block every normalization layer uses the statistics of the batch it sees (the default)."""
    return _source(None)


def statistics_of_first(rows: int) -> "contextmanager[None]":
    """Inside the block every normalization layer computes its statistics from the first ``rows`` examples."""
    return _source(int(rows))


# ------------------------------------------------------------------------------------------------- recording
class Recording:
    """The batch statistics that normalization layers computed in one scope, in call order.

    ``modules[i]`` computed ``tensors[2 i]`` (mean) and ``tensors[2 i + 1]`` (unbiased variance), both detached.
    """

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.tensors: list[Tensor] = []

    def add(self, module: nn.Module, mean: Tensor, var: Tensor) -> None:
        self.modules.append(module)
        self.tensors += [mean.detach(), var.detach()]

    def extend(self, modules: Sequence[nn.Module], tensors: Sequence[Tensor]) -> None:
        self.modules += list(modules)
        self.tensors += list(tensors)


@contextmanager
def recording() -> Iterator[Recording]:
    """Record the statistics of every normalization forward pass inside the block (nested scopes record apart)."""
    scope = Recording()
    token = _RECORDING.set(scope)
    try:
        yield scope
    finally:
        _RECORDING.reset(token)


@contextmanager
def not_recording() -> Iterator[None]:
    """Record nothing inside the block (evaluation forwards, analysis passes)."""
    token = _RECORDING.set(None)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def current_recording() -> Recording | None:
    """The open recording scope, or ``None``."""
    return _RECORDING.get()


def update_running_statistics(
    modules: Sequence[nn.Module], tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor] | None = None
) -> None:
    """Fold recorded statistics into each layer's running averages: one momentum step per layer.

    Args:
        modules: the layer of every recorded call (:attr:`Recording.modules`).
        tensors: mean and variance of every call, each ``[C]`` or ``[T, C]`` (stacked over the tasks of a batch).
        reduce: averages a tensor over processes (DDP), so every rank applies the same update.
    """
    by_module: dict[int, tuple[nn.Module, list[Tensor], list[Tensor]]] = {}
    for i, module in enumerate(modules):
        entry = by_module.setdefault(id(module), (module, [], []))
        entry[1].append(tensors[2 * i].reshape(-1, tensors[2 * i].shape[-1]))
        entry[2].append(tensors[2 * i + 1].reshape(-1, tensors[2 * i + 1].shape[-1]))
    with torch.no_grad():
        for module, means, variances in by_module.values():
            mean = torch.cat(means).float().mean(0)
            var = torch.cat(variances).float().mean(0)
            if reduce is not None:
                mean, var = reduce(mean), reduce(var)
            if bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):  # a diverged step teaches nothing
                module.update_running_statistics(mean, var)


# ------------------------------------------------------------------------------------------------ query passes
def query_outputs(forward: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor, protocol: str, vectorize: bool) -> Tensor:
    """``forward``'s outputs for the queries of one task under ``protocol`` (see the module docstring).

    ``transductive``: the query set as one batch. ``support``: support and query as one batch, normalized with the
    support rows' statistics. ``per_query``: each query in a batch with the support set. ``running``: the query set
    as one batch under running statistics (set by the caller for the whole evaluation, see
    ``MetaLearner.evaluation_normalization``).
    """
    if protocol in ("transductive", "running"):
        return forward(query_x)
    n = support_x.shape[0]
    if protocol == "support":
        with statistics_of_first(n):
            return forward(torch.cat([support_x, query_x]))[n:]

    def one(q: Tensor) -> Tensor:
        return forward(torch.cat([support_x, q.unsqueeze(0)]))[-1]

    if vectorize:
        return torch.func.vmap(one, randomness="different")(query_x)
    return torch.stack([one(q) for q in query_x])


def episode_outputs(
    forward: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor, protocol: str, joint: bool, vectorize: bool
) -> tuple[Tensor, Tensor]:
    """``forward``'s outputs for the support and the query examples of one task (the metric-based methods).

    Transductive: one batch of support and query (``joint``) or two batches. Otherwise the support set is normalized
    with its own statistics (or the running ones) and the queries as :func:`query_outputs` says.
    """
    n = support_x.shape[0]
    if protocol == "transductive" or protocol == "running":
        if joint:
            out = forward(torch.cat([support_x, query_x]))
            return out[:n], out[n:]
        return forward(support_x), forward(query_x)
    if protocol == "support":
        with statistics_of_first(n):
            out = forward(torch.cat([support_x, query_x]))
        return out[:n], out[n:]
    return forward(support_x), query_outputs(forward, support_x, query_x, protocol, vectorize)


def has_running_statistics(module: nn.Module) -> bool:
    """Whether every normalization layer of ``module`` has recorded running statistics (at least its initial ones)."""
    layers = [m for m in module.modules() if hasattr(m, "num_batches_tracked")]
    return all(int(m.num_batches_tracked) >= 0 for m in layers)
