r"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

The network is split into a body ``f_phi`` (everything but the head) and a linear head ``w``. Only the head adapts:

    z = f_phi(x_S),   w_0 = w,   w_{j+1} = w_j - alpha * grad_w L(w_j; z, y_S),

and the meta-parameters ``(phi, w)`` are trained on the query loss ``L(w_k; f_phi(x_Q), y_Q)`` averaged over tasks.
The body does not change in the inner loop, so its features are computed **once per task** (one forward of the
body for the support set, one for the query set) instead of once per inner step; the inner loop runs on the head
alone, on those features. The meta-gradient still reaches ``phi`` through the features: ``w_k`` depends on ``z`` (and
so on ``phi``) through every inner gradient (second order unless ``first_order``), and the query loss through
``f_phi(x_Q)``.

The backbone needs a linear ``head`` (its parameters are those under ``head.``) and an ``embed(x)`` method with
``forward(x) == head(embed(x))``, as every backbone in :mod:`lit_meta.backbones` has. A backbone with a head but no
``embed`` still works: it then runs the whole network at every inner step, adapting the head parameters only.

All MAML++ options of :class:`~lit_meta.algorithms.maml.MAML` apply (to the head's parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError
from lit_meta.adaptation import Params, adapt
from lit_meta.algorithms.base import task_loss
from lit_meta.algorithms.maml import MAML
from lit_meta.normalization import query_outputs

HEAD = "head."


class _HeadView(nn.Module):
    """The head under its name in the backbone (``head.weight``...), so names and per-parameter rates line up."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, z: Tensor) -> Tensor:
        return self.head(z)


class ANIL(MAML):
    """ANIL: MAML with the inner loop restricted to the head, run on features computed once per task.

    Args:
        backbone: a network with a ``head`` (``out_features`` set) and ideally an ``embed`` method.
        inner_lr, inner_steps, eval_inner_steps, first_order: as in :class:`~lit_meta.algorithms.maml.MAML`.
        **kwargs: the MAML++ options and :class:`~lit_meta.algorithms.base.MetaLearner` arguments.
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        **kwargs,
    ) -> None:
        head = getattr(backbone, "head", None) if isinstance(backbone, nn.Module) else None
        if isinstance(backbone, nn.Module) and not isinstance(head, nn.Module):
            raise ConfigError(
                f"ANIL adapts the backbone's `head`, but {type(backbone).__name__} has none: give it out_features"
            )
        super().__init__(backbone, inner_lr, inner_steps, eval_inner_steps, first_order, **kwargs)
        if not any(name.startswith(HEAD) for name, _ in self.backbone.named_parameters()):
            raise ConfigError(f"ANIL adapts the backbone's `head`, but {type(self.backbone).__name__} has no head parameters")

    def inner_loop_module(self) -> nn.Module:
        """The head when the body has ``embed`` (features computed once, so the body only needs first derivatives
        and may use a fused norm), else the whole backbone."""
        return self.backbone.head if hasattr(self.backbone, "embed") else self.backbone

    def fast_parameters(self) -> Params:
        """The head's parameters (named ``head.*``)."""
        return {k: v for k, v in self.backbone.named_parameters() if k.startswith(HEAD)}

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        embed = getattr(self.backbone, "embed", None)
        if embed is None:
            return super().task_step(support_x, support_y, query_x, query_y, training)
        # The body's features, once per task. Called on the module itself (its parameters are the meta-parameters),
        # so in training the graph from the features back to the body is kept for the meta-gradient.
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            support_z = embed(support_x)
            query_z = query_outputs(embed, support_x, query_x, self.protocol(training), self.vectorize)
        head = _HeadView(self.backbone.head)
        fast = self.fast_parameters()
        if not training:
            fast = {k: v.detach() for k, v in fast.items()}
        trajectory = adapt(
            head,
            fast,
            support_z,
            support_y,
            loss_fn=task_loss,
            steps=self.steps(training),
            step_size=self.step_size(training),
            first_order=self.use_first_order(training) or not training,
            loss_scale=self.inner_loss_scale() if training else 1.0,
            checkpoint=self.checkpoint_inner_loop and training,
        )

        def predict(params: Params) -> Tensor:
            return functional_call(head, params, (query_z,))

        return self.query_objective(trajectory, predict, query_y, training)
