"""The one inner loop: functional gradient steps on a task's support set, and mapping a function over tasks.

Everything is written with ``torch.func`` (``functional_call`` + ``grad``), never ``backward``, so that

* it runs unchanged inside ``torch.func.vmap`` (one kernel launch per layer for a whole meta-batch),
* second-order meta-gradients flow through the inner updates (``first_order=False``),
* under DDP the only backward of a step is the outer ``manual_backward`` (one gradient all-reduce).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lit_meta.normalization import current_recording, recording

Params = dict[str, Tensor]
# A learning rate per step: one float for every parameter, or one (tensor or float) per parameter name.
StepSize = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
LossFn = Callable[[Tensor, Tensor], Tensor]
# A custom inner update ``(step, params, grads) -> new params`` (e.g. Reptile's Adam); the default is SGD.
UpdateFn = Callable[[int, Params, Params], Params]

# Set by :func:`fp32_inner_loop` (the MetaLearner enters it around its steps when ``inner_loop_fp32``). A context
# variable rather than an argument, so every algorithm's ``adapt`` calls follow it without passing it along.
_INNER_FP32: ContextVar[bool] = ContextVar("lit_meta_inner_fp32", default=False)


@contextmanager
def fp32_inner_loop(enabled: bool = True) -> Iterator[None]:
    """Run every :func:`adapt` inside the block in float32: autocast is disabled within the inner loop only.

    Under ``16-mixed``/``bf16-mixed`` the rest of the step (query forward, outer backward) stays in mixed precision;
    the support-set gradients and updates, the part that underflows in fp16 and loses most to bf16 rounding, are
    computed in float32. ``enabled=False`` leaves the inner loop under whatever autocast is active.
    """
    token = _INNER_FP32.set(enabled)
    try:
        yield
    finally:
        _INNER_FP32.reset(token)


def _to_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
    checkpoint: bool = False,
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
            fp16 inner gradients do not underflow (pass the GradScaler's scale). Ignored inside
            :func:`fp32_inner_loop`, where there is nothing to underflow.
        update: replaces the SGD step ``params - step_size * grads``: called as ``update(step, params, grads)``
            with the (detached if ``first_order``, unscaled) gradients, it returns the new parameters; a stateful
            callable carries optimizer state across steps (Reptile's inner Adam). ``step_size`` is then unused.
        checkpoint: keep no activations of the inner steps for the meta-gradient: each step stores only its inputs
            (parameters, support set, rates) and is recomputed in the backward pass. The meta-gradient is the same
            (second order included) and peak memory no longer grows with the activations of every step, for one
            more forward and inner backward per step. Ignored with ``update`` (first order by construction).

    Returns:
        The trajectory ``[params, params_1, ..., params_steps]``; the last entry is the adapted parameters.
    """
    context = context or {}
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    fp32 = autocast and _INNER_FP32.get()
    if fp32:
        loss_scale = 1.0
        # Tensors computed under autocast (ANIL's features, MetaBGD's generated head) arrive in half precision:
        # lift them to float32 (differentiably), or the un-autocast layers would see half or mixed dtypes.
        x = _to_fp32(x)
        params = {k: _to_fp32(v) for k, v in params.items()}
        context = {k: _to_fp32(v) for k, v in context.items()}
    # The forward runs under the caller's autocast (none in the fp32 inner loop); the backward, which
    # torch.func.grad runs after inner_loss returned, runs with autocast off, as torch.amp prescribes: its ops then
    # follow the forward's dtypes. Under an enabled autocast even the backward of float32 ops would drop to half
    # precision (which would make the fp32 inner loop fp16 again where it matters: its gradients).
    dtype = torch.get_autocast_dtype(device) if autocast else None

    # Normalization statistics computed inside torch.func.grad cannot leave it as side effects: while training
    # records them, the inner loss returns them as grad's auxiliary output and they are passed on to the caller's scope.
    outer = current_recording()
    recorded: list[nn.Module] = []

    def inner_loss(p: Params, x: Tensor, context: Params) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
        with torch.autocast(device, dtype=dtype, enabled=not fp32) if autocast else nullcontext():
            if outer is None:
                return loss_fn(functional_call(model, {**context, **p}, (x,)), y) * loss_scale
            with recording() as scope:
                loss = loss_fn(functional_call(model, {**context, **p}, (x,)), y) * loss_scale
            recorded[:] = scope.modules
            return loss, tuple(scope.tensors)

    def one_step(step: int, p: Params, x: Tensor, context: Params, lr: StepSize | None) -> tuple[Params, tuple[Tensor, ...]]:
        if outer is None:
            grads, statistics = torch.func.grad(inner_loss)(p, x, context), ()
        else:
            grads, statistics = torch.func.grad(inner_loss, has_aux=True)(p, x, context)
        new: Params = {}
        for name, value in p.items():
            g = grads[name]
            if first_order:
                g = g.detach()
            if loss_scale != 1.0:
                g = g / loss_scale
            new[name] = g if update is not None else value - step_size_for(lr, name) * g
        return (update(step, p, new) if update is not None else new), statistics

    trajectory = [params]
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        for step in range(steps):
            lr = None if update is not None else step_size(step) if callable(step_size) else step_size
            if checkpoint and update is None:
                params, statistics = _checkpointed_step(one_step, step, params, x, context, lr)
            else:
                params, statistics = one_step(step, params, x, context, lr)
            if outer is not None:
                outer.extend(recorded, statistics)
            trajectory.append(params)
    return trajectory


class _CheckpointedStep(torch.autograd.Function):
    """One inner step whose graph is not kept: the backward pass recomputes it and takes its vector-Jacobian product.

    ``fn(*tensors)`` returns the new parameters followed by non-differentiable extras (recorded statistics). The vmap
    rule is generated, so the step runs inside ``torch.func.vmap`` like the rest of the inner loop, and the backward
    uses ``torch.func.vjp`` (``torch.autograd.grad`` cannot run under vmap).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(fn: Callable[..., tuple[Tensor, ...]], outputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return fn(*(t.detach() for t in tensors))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        fn, outputs, *tensors = inputs
        ctx.fn, ctx.outputs = fn, outputs
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*output[outputs:])

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[2:]) if needed]

        def recompute(*chosen: Tensor) -> tuple[Tensor, ...]:
            full = list(tensors)
            for i, t in zip(wanted, chosen):
                full[i] = t
            return tuple(ctx.fn(*full)[: ctx.outputs])

        _, vjp = torch.func.vjp(recompute, *(tensors[i] for i in wanted))
        chosen_grads = vjp(tuple(grads[: ctx.outputs]))
        result: list[Tensor | None] = [None] * len(tensors)
        for i, g in zip(wanted, chosen_grads):
            result[i] = g
        return (None, None, *result)


def _checkpointed_step(
    one_step: Callable[..., tuple[Params, tuple[Tensor, ...]]], step: int, params: Params, x: Tensor, context: Params, lr: StepSize
) -> tuple[Params, tuple[Tensor, ...]]:
    """``one_step(step, params, x, context, lr)`` through :class:`_CheckpointedStep`: every tensor it reads is an
    input of the function (so its gradient flows), and the dictionaries are rebuilt inside."""
    names, values = list(params), list(params.values())
    context_names = list(context)
    if isinstance(lr, Mapping):
        lr_names = [k for k, v in lr.items() if isinstance(v, Tensor)]
        lr_fixed = {k: v for k, v in lr.items() if not isinstance(v, Tensor)}
        lr_tensors = [lr[k] for k in lr_names]
    else:
        lr_names, lr_fixed = [], {}
        lr_tensors = [lr] if isinstance(lr, Tensor) else []

    def fn(*tensors: Tensor) -> tuple[Tensor, ...]:
        i = 0
        p = dict(zip(names, tensors[i : i + len(names)]))
        i += len(names)
        x_ = tensors[i]
        i += 1
        ctx = dict(zip(context_names, tensors[i : i + len(context_names)]))
        i += len(context_names)
        rates = tensors[i:]
        if isinstance(lr, Mapping):
            step_lr: StepSize = {**lr_fixed, **dict(zip(lr_names, rates))}
        else:
            step_lr = rates[0] if rates else lr
        new, statistics = one_step(step, p, x_, ctx, step_lr)
        return (*(new[k] for k in names), *statistics)

    outputs = _CheckpointedStep.apply(fn, len(names), *values, x, *context.values(), *lr_tensors)
    return dict(zip(names, outputs[: len(names)])), tuple(outputs[len(names) :])


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
