"""The one inner loop: functional gradient steps on a task's support set, and mapping a function over tasks.

Everything is written with ``torch.func`` (``functional_call`` + ``grad``), never ``backward``, so that

* it runs unchanged inside ``torch.func.vmap`` (one kernel launch per layer for a whole meta-batch),
* second-order meta-gradients flow through the inner updates (``first_order=False``),
* under DDP the only backward of a step is the outer ``manual_backward`` (one gradient all-reduce).
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
# A learning rate per step: one float for every parameter, or one (tensor or float) per parameter name.
StepSize = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
LossFn = Callable[[Tensor, Tensor], Tensor]
# A custom inner update ``(step, params, grads) -> new params`` (e.g. Reptile's Adam); the default is SGD.
UpdateFn = Callable[[int, Params, Params], Params]


def step_size_for(step_size: StepSize, name: str) -> float | Tensor:
    if isinstance(step_size, Mapping):
        return step_size[name]
    return step_size


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    steps: int,
    step_size: StepSize | Callable[[int], StepSize],
    first_order: bool = False,
    context: Params | None = None,
    loss_scale: float = 1.0,
    update: UpdateFn | None = None,
) -> list[Params]:
    """Take ``steps`` gradient steps on ``loss_fn(model(x), y)`` with respect to ``params``.

    Args:
        model: evaluated with :func:`torch.func.functional_call`, so its own parameters are not touched.
        params: the parameters being adapted (name -> tensor), e.g. all of them for MAML, the head for ANIL.
        x, y: the support set of one task.
        loss_fn: the inner loss.
        steps: number of gradient steps.
        step_size: the inner learning rate: a float, a tensor (learnable), a per-parameter mapping (Meta-SGD), or a
            callable ``step -> any of those`` (MAML++'s per-step rates).
        first_order: stop gradients through the inner gradients (FOMAML); the adapted parameters still depend on
            ``params`` with identity Jacobian.
        context: parameters and buffers that are used but not adapted.
        loss_scale: multiplies the inner loss before differentiation and divides the gradient after, so that
            fp16 inner gradients do not underflow (pass the GradScaler's scale).
        update: replaces the SGD step ``params - step_size * grads``: called as ``update(step, params, grads)``
            with the (detached if ``first_order``, unscaled) gradients, it returns the new parameters; a stateful
            callable carries optimizer state across steps (Reptile's inner Adam). ``step_size`` is then unused.

    Returns:
        The trajectory ``[params, params_1, ..., params_steps]``; the last entry is the adapted parameters.
    """
    context = context or {}

    def inner_loss(p: Params) -> Tensor:
        out = functional_call(model, {**context, **p}, (x,))
        return loss_fn(out, y) * loss_scale

    trajectory = [params]
    for step in range(steps):
        grads = torch.func.grad(inner_loss)(params)
        lr = None if update is not None else step_size(step) if callable(step_size) else step_size
        new: Params = {}
        for name, value in params.items():
            g = grads[name]
            if first_order:
                g = g.detach()
            if loss_scale != 1.0:
                g = g / loss_scale
            new[name] = g if update is not None else value - step_size_for(lr, name) * g
        params = update(step, params, new) if update is not None else new
        trajectory.append(params)
    return trajectory


def map_tasks(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    *tensors: Tensor,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Apply a per-task function over the leading (task) dimension of ``tensors`` and stack the results.

    With ``vectorize`` the tasks run as one batched computation (``torch.func.vmap``, in chunks of ``chunk_size``
    tasks); otherwise one after another in a Python loop, which is the reference the vectorized path is tested
    against and the path for modules that vmap does not support.
    """
    if vectorize:
        return torch.func.vmap(fn, randomness="different", chunk_size=chunk_size)(*tensors)
    outputs = [fn(*(t[i] for t in tensors)) for i in range(tensors[0].shape[0])]
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs))
    return torch.stack(outputs)
