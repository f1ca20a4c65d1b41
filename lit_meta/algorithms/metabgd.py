r"""MetaBGD: a generated, task-conditioned initialization, then gradient descent on the support set.

The model-based method of this library. A *generator* reads a task's support set and writes the initial weights of a
task model; the model is then fine-tuned with a few gradient steps on the support set; the query loss after
fine-tuning trains the generator and the shared feature extractor end to end, through the fine-tuning steps.

**Equations.** For a task with support set ``S = {(x_i, y_i)}`` (``N`` classes) and query set ``Q``, feature
extractor ``f_theta`` (the backbone, returning ``D``-dimensional embeddings) and generator ``G_phi``:

1. Class summaries (the prototypes of ProtoNet):  ``mu_c = mean_{i: y_i = c} f_theta(x_i)``.
2. Set encoding (DeepSets; each class's weights see the whole task):
   ``e_c = relu(A mu_c + a)``,  ``m = mean_c e_c``.
3. Generated head, one row per class:  ``[w_c ; b_c] = MLP_phi([e_c ; m])``  (``w_c`` in R^D, ``b_c`` in R),
   i.e. ``W_0 = [w_1 ... w_N]^T``, ``b_0 = [b_1 ... b_N]``.
4. Fine-tuning, ``k`` steps of gradient descent on the support cross-entropy (:func:`lit_meta.adaptation.adapt`):
   ``(W_{j+1}, b_{j+1}) = (W_j, b_j) - alpha * grad_{W, b} L_S(W_j, b_j)``,
   ``L_S(W, b) = CE(f_theta(x_S) W^T + b, y_S)``.
5. Meta-objective, averaged over the tasks of a meta-batch:  ``L_Q(W_k, b_k) = CE(f_theta(x_Q) W_k^T + b_k, y_Q)``,
   minimised over ``theta`` and ``phi`` (and ``alpha`` with ``learn_inner_lr``). Its gradient flows through the
   ``k`` fine-tuning steps (second order: the Hessian-vector products of ``L_S``); ``first_order=True`` treats the
   inner gradients as constants.

Options:

* ``film=True`` also conditions *every layer* of the feature extractor on the task (FiLM, Perez et al. 2018): a
  second set encoder reads the class means of an unmodulated pass and outputs, for every
  :class:`~lit_meta.backbones.BatchStatNorm` layer ``l``, a per-channel ``(gamma_l, beta_l)``; the layer's affine
  map becomes ``weight_l * (1 + gamma_l)`` and ``bias_l + beta_l``. Its output layer starts at zero, so training
  starts from the unmodulated network.
* ``finetune="all"`` fine-tunes the whole task model (the (modulated) backbone and the generated head, MAML-style)
  instead of the head alone. Each forward pass then sees a single set (support or query), so embeddings are taken
  separately (``joint_embedding`` must be false).

**Relation to LEO** (Rusu et al., ICLR 2019). LEO also generates a task's classifier weights from its support set and
fine-tunes them: it encodes the support embeddings into a per-class latent code (a relation network over all pairs
of examples), samples a stochastic latent, decodes it into the weights, adapts the *latent code* by gradient steps,
then fine-tunes the decoded weights directly for a few more steps; the features are pre-trained and frozen and the
losses carry KL and orthogonality regularisers. MetaBGD is the deterministic "conditional generator + fine-tuning"
variant of LEO's ablation (Table 3 there): no latent space and no latent-space adaptation, a DeepSets set encoder
(mean over classes) instead of the pairwise relation network, and the feature extractor trained end to end with the
generator instead of pre-trained and frozen.

Under DDP every parameter takes part in every step (the FiLM generator exists only with ``film=True``, the learned
inner learning rate only with ``learn_inner_lr=True``), so no ``find_unused_parameters`` is needed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError, require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import Params, adapt, map_tasks
from lit_meta.normalization import episode_outputs, query_outputs
from lit_meta.algorithms.base import task_loss, task_metric
from lit_meta.algorithms.embedding import EmbeddingMetaLearner, class_means
from lit_meta.backbones import BatchStatNorm, refuse_fused_norm_for_second_order

FINETUNE = ("head", "all")
INITS = ("generated", "zero", "random")


class HeadGenerator(nn.Module):
    """Class means ``[N, D]`` -> initial classifier ``(weight [N, D], bias [N])`` (steps 2-3 of the module docstring).

    Args:
        dim: embedding size ``D``.
        hidden: width of the set encoder and of the decoder MLP.
        set_context: give each class's decoder the mean encoding of all classes of the task (permutation-equivariant
            over classes); without it each row depends on its own class only.
    """

    def __init__(self, dim: int, hidden: int = 256, set_context: bool = True) -> None:
        super().__init__()
        self.set_context = set_context
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        # No bias on the output layer: a vector added to every class's row shifts all logits alike (before and after
        # fine-tuning, whose weight gradients sum to zero over the classes), so it would never receive a gradient.
        self.decoder = nn.Sequential(
            nn.Linear(2 * hidden if set_context else hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim + 1, bias=False)
        )

    def forward(self, means: Tensor) -> tuple[Tensor, Tensor]:
        e = self.encoder(means)
        if self.set_context:
            e = torch.cat([e, e.mean(dim=-2, keepdim=True).expand_as(e)], dim=-1)
        out = self.decoder(e)
        return out[..., :-1], out[..., -1]


class FiLMGenerator(nn.Module):
    """Class means ``[N, D]`` -> per-channel ``(gamma, beta)`` for each normalization layer of the backbone.

    Args:
        dim: embedding size ``D``.
        channels: ``{layer name: channels}`` of the modulated layers, in order.
        hidden: width of the set encoder.
    """

    def __init__(self, dim: int, channels: dict[str, int], hidden: int = 256) -> None:
        super().__init__()
        self.channels = dict(channels)
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 2 * sum(self.channels.values()))
        # Zero output: the first steps see the unmodulated network, so FiLM cannot derail early training.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, means: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        out = self.out(self.encoder(means).mean(dim=-2))
        gammas, betas = out.split(sum(self.channels.values()), dim=-1)
        sizes = list(self.channels.values())
        return {
            name: (g, b) for name, g, b in zip(self.channels, gammas.split(sizes, dim=-1), betas.split(sizes, dim=-1))
        }


class _GeneratedLinear(nn.Module):
    """A linear layer without parameters of its own: ``weight`` and ``bias`` come from ``functional_call``."""

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight, self.bias)


class _TaskClassifier(nn.Module):
    """``backbone`` followed by a generated linear head (``finetune="all"``); parameters come from ``functional_call``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.backbone(x).flatten(1), self.weight, self.bias)


class MetaBGD(EmbeddingMetaLearner):
    """Generated initialization + fine-tuning (see the module docstring for the equations).

    Args:
        backbone: the feature extractor, returning embeddings (``out_features: null``).
        inner_lr: the fine-tuning learning rate ``alpha``.
        inner_steps: fine-tuning steps during meta-training.
        eval_inner_steps: fine-tuning steps at validation and test (default: ``inner_steps``).
        first_order: drop the second-order terms of the meta-gradient.
        learn_inner_lr: make ``alpha`` a trained parameter (initialised at ``inner_lr``).
        finetune: ``"head"`` (the generated classifier only; embeddings are computed once per task) or ``"all"``
            (the whole task model).
        generator_hidden: width of the generator networks.
        set_context: condition each class's weights on the whole task (see :class:`HeadGenerator`).
        film: also modulate every normalization layer of the backbone from the support set (FiLM).
        embedding_dim: the backbone's embedding size, where it has no ``embedding_dim`` attribute.
        joint_embedding: embed support and query as one batch (see :mod:`lit_meta.algorithms.embedding`); ``None``
            means yes for ``finetune="head"`` and no for ``"all"`` (which cannot).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, lr_scheduler, vectorize, chunk_size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.5,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        finetune: str = "head",
        generator_hidden: int = 256,
        set_context: bool = True,
        film: bool = False,
        embedding_dim: int | None = None,
        joint_embedding: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if finetune not in FINETUNE:
            raise ConfigError(f"finetune must be one of {FINETUNE}, got {finetune!r}")
        if joint_embedding is None:
            joint_embedding = finetune == "head"
        if joint_embedding and finetune == "all":
            raise ConfigError(
                "finetune='all' runs the backbone on the support set alone inside the inner loop, so support and "
                "query cannot be embedded jointly: set joint_embedding: false (or leave it null)"
            )
        super().__init__(backbone, joint_embedding=joint_embedding, **kwargs)
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require_positive(generator_hidden=generator_hidden)
        if not (isinstance(inner_steps, int) and inner_steps >= 0 and isinstance(eval_inner_steps, int) and eval_inner_steps >= 0):
            raise ConfigError(f"inner_steps and eval_inner_steps must be integers >= 0, got {inner_steps!r}, {eval_inner_steps!r}")
        dim = self.embedding_dim(embedding_dim)
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        refuse_fused_norm_for_second_order(self.backbone, not first_order, self.vectorize, type(self).__name__)
        self.finetune = finetune
        if learn_inner_lr:
            self.inner_lr = nn.Parameter(torch.tensor(float(inner_lr)))
        else:
            self.inner_lr = float(inner_lr)
        self.generator = HeadGenerator(dim, generator_hidden, set_context)
        self.film = None
        if film:
            channels = {
                name: module.weight.numel()
                for name, module in self.backbone.named_modules()
                if isinstance(module, BatchStatNorm)
            }
            if not channels:
                raise ConfigError("film=True modulates the backbone's BatchStatNorm layers, but this backbone has none")
            self.film = FiLMGenerator(dim, channels, generator_hidden)
        # Parameter-free wrappers for functional_call, kept out of the module tree (plain attributes) so that the
        # backbone is not registered twice.
        self.__dict__["_linear"] = _GeneratedLinear()
        self.__dict__["_classifier"] = _TaskClassifier(self.backbone)

    # ---------------------------------------------------------------------------------------------- task model
    def backbone_parameters(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, training: bool) -> Params:
        """The backbone's parameters for this task: FiLM-modulated from the support set, or the shared ones."""
        params = dict(self.backbone.named_parameters())
        if self.film is None:
            return params
        # Task context from an unmodulated pass (joint or separate, as for every other pass).
        support_z, _ = self.embed_task(support_x, query_x, training)
        for name, (gamma, beta) in self.film(class_means(support_z, support_y, self.ways_of(support_y))).items():
            params[f"{name}.weight"] = params[f"{name}.weight"] * (1 + gamma)
            params[f"{name}.bias"] = params[f"{name}.bias"] + beta
        return params

    def _embed_with(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.backbone, params, (x,)).flatten(1)

    def initial_head(self, support_z: Tensor, support_y: Tensor, init: str = "generated") -> Params:
        """``{"weight": [N, D], "bias": [N]}``: generated from the support embeddings, zero, or random."""
        ways = self.ways_of(support_y)
        if init == "generated":
            weight, bias = self.generator(class_means(support_z, support_y, ways))
        elif init == "zero":
            weight, bias = support_z.new_zeros(ways, support_z.shape[-1]), support_z.new_zeros(ways)
        elif init == "random":
            # nn.Linear's default initialization.
            bound = 1.0 / math.sqrt(support_z.shape[-1])
            weight = (torch.rand(ways, support_z.shape[-1], device=support_z.device, dtype=support_z.dtype) * 2 - 1) * bound
            bias = (torch.rand(ways, device=support_z.device, dtype=support_z.dtype) * 2 - 1) * bound
        else:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        return {"weight": weight, "bias": bias}

    def steps(self, training: bool) -> int:
        return self.inner_steps if training else self.eval_inner_steps

    def adapted_logits(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        training: bool,
        steps: int | None = None,
        init: str = "generated",
    ) -> list[Tensor]:
        """Query logits of one task after ``0, 1, ..., steps`` fine-tuning steps (``steps`` defaults to the setting's).

        Args:
            support_x, support_y, query_x: one task (no task dimension).
            training: meta-training (keeps the graph for the meta-gradient) or evaluation.
            steps: fine-tuning steps; ``None`` uses ``inner_steps`` or ``eval_inner_steps``.
            init: where fine-tuning starts: ``"generated"`` (the method), or the ``"zero"``/``"random"`` baselines.
        """
        steps = self.steps(training) if steps is None else steps
        first_order = self.first_order or not training
        scale = self.inner_loss_scale() if training else 1.0
        backbone_params = self.backbone_parameters(support_x, support_y, query_x, training)
        protocol = self.protocol(training)
        if self.finetune == "head":
            support_z, query_z = episode_outputs(
                lambda x: self._embed_with(backbone_params, x), support_x, query_x, protocol, self.joint_embedding, self.vectorize
            )
            trajectory = adapt(
                self._linear,
                self.initial_head(support_z, support_y, init),
                support_z,
                support_y,
                loss_fn=task_loss,
                steps=steps,
                step_size=self.inner_lr,
                first_order=first_order,
                loss_scale=scale,
            )
            return [F.linear(query_z, p["weight"], p["bias"]) for p in trajectory]
        # finetune == "all": the whole task model adapts; every pass sees one set.
        support_z = self._embed_with(backbone_params, support_x)
        start = {f"backbone.{k}": v for k, v in backbone_params.items()}
        start.update(self.initial_head(support_z, support_y, init))
        buffers = {f"backbone.{k}": v for k, v in self.backbone.named_buffers()}
        trajectory = adapt(
            self._classifier,
            start,
            support_x,
            support_y,
            loss_fn=task_loss,
            steps=steps,
            step_size=self.inner_lr,
            first_order=first_order,
            context=buffers,
            loss_scale=scale,
        )
        return [
            query_outputs(lambda x: functional_call(self._classifier, {**buffers, **p}, (x,)), support_x, query_x, protocol, self.vectorize)
            for p in trajectory
        ]

    # ---------------------------------------------------------------------------------------------- MetaLearner
    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if training:
            logits = self.adapted_logits(support_x, support_y, query_x, training)[-1]
        else:
            # Evaluation needs no meta-gradient. torch.func.grad ignores an enclosing no_grad, so the fine-tuning
            # steps still differentiate; only the graph back to the meta-parameters is not built.
            with torch.no_grad():
                logits = self.adapted_logits(support_x, support_y, query_x, training)[-1]
        return task_loss(logits, query_y), logits

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query loss and accuracy after fine-tuning, and (``_pre``) of the generated initialization before it."""

        def both(sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                trajectory = self.adapted_logits(sx, sy, qx, training=False)
            return trajectory[0], trajectory[-1]

        with self.episode_ways(batch):
            before, after = map_tasks(
                both, batch.support_x, batch.support_y, batch.query_x, vectorize=self.vectorize, chunk_size=self.chunk_size
            )
        return {
            "acc": self._per_task(task_metric, after, batch.query_y),
            "loss": self._per_task(task_loss, after, batch.query_y),
            "acc_pre": self._per_task(task_metric, before, batch.query_y),
            "loss_pre": self._per_task(task_loss, before, batch.query_y),
        }

    def metrics_by_step(self, batch: TaskBatch, steps: int | None = None, init: str = "generated") -> dict[str, Tensor]:
        """Query ``acc`` and ``loss`` (``[steps + 1, T]`` each) of every task after ``0..steps`` fine-tuning steps.

        For analysis: compares the generated initialization with ``"zero"``/``"random"`` heads, before and after
        fine-tuning (``steps`` defaults to ``eval_inner_steps``).
        """
        self._require_grad_mode()

        def per_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.stack(self.adapted_logits(sx, sy, qx, training=False, steps=steps, init=init))

        with torch.enable_grad(), self.episode_ways(batch), self.inner_loop_precision(), self.evaluation_normalization():
            logits = map_tasks(per_task, batch.support_x, batch.support_y, batch.query_x, vectorize=self.vectorize, chunk_size=self.chunk_size)
        logits = logits.transpose(0, 1)  # [steps + 1, T, Q, N]
        targets = batch.query_y.expand(logits.shape[0], -1, -1)
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape).mean(-1)
        return {"acc": (logits.argmax(-1) == targets).float().mean(-1), "loss": loss}
