"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, section 5.3): policy-gradient inner steps,
a TRPO outer step.

For a task ``i`` and parameters ``theta``, ``D_i`` is a batch of trajectories of ``pi_theta``, ``A`` their advantages
(:mod:`lit_meta.rl.baseline`, each task's own linear baseline) and ``M`` its number of valid steps. The inner step is
vanilla policy gradient (REINFORCE with a baseline), one gradient step on

.. math::

    L^{in}_i(\\theta) = -\\frac{1}{M} \\sum_{(s_t, a_t) \\in D_i} \\log \\pi_\\theta(a_t \\mid s_t) A_t,
    \\qquad \\theta'_i(\\theta) = \\theta - \\alpha \\nabla_\\theta L^{in}_i(\\theta),

(``alpha = 0.1``). With ``theta'_i`` the adapted policy collects ``D'_i``; the outer objective is TRPO's surrogate
over the meta-batch, as a function of ``theta`` *through the inner step*,

.. math::

    L(\\theta) = -\\frac{1}{T} \\sum_i \\frac{1}{M'} \\sum_{D'_i}
        \\frac{\\pi_{\\theta'_i(\\theta)}(a_t \\mid s_t)}{\\pi_{\\theta'_i(\\theta_{old})}(a_t \\mid s_t)} A'_t,
    \\qquad
    \\bar{KL}(\\theta) = \\frac{1}{T} \\sum_i \\frac{1}{M'} \\sum_{D'_i}
        KL\\big(\\pi_{\\theta'_i(\\theta_{old})}(\\cdot \\mid s_t) \\,\\|\\, \\pi_{\\theta'_i(\\theta)}(\\cdot \\mid s_t)\\big),

minimized by a TRPO step (:mod:`lit_meta.rl.trpo`): conjugate gradient on the Fisher-vector products of
``KL-bar`` (the Hessian through the inner step), then a backtracking line search that accepts a step only if the
KL is at most ``max_kl`` (0.01) and the surrogate decreased. Second order (the default) differentiates through
``grad L^in``; ``first_order`` treats it as a constant. As in the reference code, the dependence of the pre-update
trajectories' distribution on ``theta`` is not differentiated.

``inner_steps: 0`` trains one policy for all tasks with the same TRPO step and no adaptation (the "pretrained"
baseline of Finn et al.), and ``oracle: true`` gives the policy the goal as an extra input (the "oracle"); the
"random" baseline is an untrained policy evaluated the same way (``test`` without a checkpoint). Evaluation reports,
for each fixed test task, the average return before adaptation and after 1..``eval_inner_steps`` policy-gradient
steps (``return_k``), each step on new trajectories of the policy of the step before.

The same algorithm trains on the HalfCheetah goal-velocity and goal-direction tasks (``environment``, see
:mod:`lit_meta.rl.locomotion`): their trajectories come from MuJoCo environments stepped together
(:mod:`lit_meta.rl.vector_env`, optionally in ``num_workers`` processes) instead of the navigation tasks' torch
dynamics; everything after the rollouts (baselines, inner steps, the TRPO step, evaluation) is shared.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.errors import ConfigError, require_positive
from datamodules.sampler import episode_generator
from lit_meta.algorithms.base import MetaLearner
from lit_meta.rl.baseline import advantages
from lit_meta.rl.datamodule import ENVIRONMENTS, NavigationTasks
from lit_meta.rl.locomotion import HalfCheetahTasks, require_gymnasium
from lit_meta.rl.navigation import Navigation2D
from lit_meta.rl.policy import GaussianMLPPolicy, gaussian_kl, gaussian_log_prob, policy_forward
from lit_meta.rl.rollouts import Trajectories, sample_trajectories
from lit_meta.rl.trpo import TRPOStep, trpo_step

Params = dict[str, Tensor]
Batch = tuple[Trajectories, Tensor]  # trajectories and their advantages

# Rollout streams of a task: training and evaluation noise never coincide.
TRAIN_PHASE, EVAL_PHASE = 1, 2

# MetaLearner's arguments that have no meaning here (no normalization layers, no outer optimizer); they are dropped
# from the saved hyper-parameters so that a checkpoint rebuilds this class with its own signature.
_UNUSED_BASE_ARGUMENTS = (
    "scheduler_interval",
    "vectorize",
    "chunk_size",
    "grad_clip_norm",
    "inner_loop_fp32",
    "normalization",
    "predict_normalization",
)


class MAMLRL(MetaLearner):
    """MAML-TRPO on the tasks of :class:`~lit_meta.rl.datamodule.RolloutDataModule` (navigation or HalfCheetah).

    Args:
        backbone: the policy (:class:`~lit_meta.rl.policy.GaussianMLPPolicy`; default: Finn et al.'s 100-100 ReLU
            MLP sized for ``environment``; the oracle's also takes the goal: 2 more inputs for navigation, 1 for
            HalfCheetah).
        inner_lr: ``alpha`` of the policy-gradient inner step (Finn et al.: 0.1).
        inner_steps: inner steps in meta-training; 0 trains a single policy on all tasks (the pretrained baseline).
        eval_inner_steps: policy-gradient steps at evaluation (returns are logged after each).
        eval_inner_lrs: the step size of each evaluation step (``eval_inner_steps`` values); ``None``: ``inner_lr``
            for every step. Finn et al.'s test script used 0.1 for the first step and 0.05 for the next ones.
        first_order: do not differentiate through the inner gradient.
        trajectories: trajectories per task and per inner step in meta-training (Finn et al.'s fast batch: 20).
        eval_trajectories: trajectories per task and per step at evaluation.
        discount: ``gamma``.
        gae_lambda: ``tau`` of generalized advantage estimation (1: returns minus baseline).
        normalize_advantages: centre and scale the advantages per task (rllab's ``center_adv``).
        max_kl: the trust region ``delta`` of the TRPO step.
        cg_iters, cg_damping: the conjugate-gradient solve.
        backtrack_ratio, max_backtracks: TRPO's line search.
        oracle: the policy observes the goal (the navigation goal, the cheetah's goal velocity or direction).
        horizon: steps per trajectory (Finn et al.: 100 for navigation, 200 for HalfCheetah).
        environment: ``navigation2d``, ``halfcheetah_vel`` or ``halfcheetah_dir``; the datamodule's must match.
        num_workers: processes that step the HalfCheetah environments (1: this process; unused for navigation).
    """

    def __init__(
        self,
        backbone: nn.Module | dict[str, Any] | None = None,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        eval_inner_lrs: list[float] | None = None,
        first_order: bool = False,
        trajectories: int = 20,
        eval_trajectories: int = 20,
        discount: float = 0.99,
        gae_lambda: float = 1.0,
        normalize_advantages: bool = True,
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 15,
        oracle: bool = False,
        horizon: int = 100,
        environment: str = "navigation2d",
        num_workers: int = 1,
    ) -> None:
        if environment not in ENVIRONMENTS:
            raise ConfigError(f"environment must be one of {', '.join(ENVIRONMENTS)}, got {environment!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        env: Navigation2D | HalfCheetahTasks
        if environment == "navigation2d":
            env, goal_dim = Navigation2D(horizon=horizon), 2
        else:
            # Fail at construction, not at the first rollout, when gymnasium is missing.
            require_gymnasium()
            env, goal_dim = HalfCheetahTasks(kind=environment, horizon=horizon), 1
        if backbone is None:
            backbone = GaussianMLPPolicy(in_features=env.observation_dim + (goal_dim if oracle else 0), out_features=env.action_dim)
        super().__init__(backbone)
        expected = env.observation_dim + (goal_dim if oracle else 0)
        first = next((m for m in self.backbone.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features != expected:
            raise ConfigError(
                f"the policy takes {first.in_features} inputs but {environment}{' with oracle' if oracle else ''} observes "
                f"{expected}: set the backbone's in_features to {expected}"
            )
        for key in _UNUSED_BASE_ARGUMENTS:
            self.hparams.pop(key, None)
        require_positive(trajectories=trajectories, eval_trajectories=eval_trajectories, cg_iters=cg_iters, max_backtracks=max_backtracks)
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if eval_inner_lrs is not None and len(eval_inner_lrs) != eval_inner_steps:
            raise ConfigError(
                f"eval_inner_lrs needs one step size per evaluation step: {len(eval_inner_lrs)} for eval_inner_steps "
                f"= {eval_inner_steps}; give {eval_inner_steps} values or null"
            )
        if not 0.0 < discount <= 1.0 or not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"need 0 < discount <= 1 and 0 <= gae_lambda <= 1, got {discount} and {gae_lambda}")
        if not max_kl > 0 or not 0.0 < backtrack_ratio < 1.0:
            raise ConfigError(f"need max_kl > 0 and 0 < backtrack_ratio < 1, got {max_kl} and {backtrack_ratio}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_lrs = None if eval_inner_lrs is None else [float(lr) for lr in eval_inner_lrs]
        self.first_order = first_order
        self.trajectories = trajectories
        self.eval_trajectories = eval_trajectories
        self.discount = discount
        self.gae_lambda = gae_lambda
        self.normalize_advantages = normalize_advantages
        self.max_kl = max_kl
        self.cg_iters = cg_iters
        self.cg_damping = cg_damping
        self.backtrack_ratio = backtrack_ratio
        self.max_backtracks = max_backtracks
        self.oracle = oracle
        self.environment = environment
        self.num_workers = num_workers
        self.env = env
        # The HalfCheetah environments (and worker processes): built at the first rollout, kept for the next ones.
        self._vector_env: Any = None
        self.last_step: TRPOStep | None = None

    # ------------------------------------------------------------------------------------------------ rollouts
    def parameters_dict(self) -> Params:
        return dict(self.backbone.named_parameters())

    @staticmethod
    def per_task(params: Params, num_tasks: int) -> Params:
        """Shared parameters given a task dimension (differentiably: the tasks' gradients sum into ``params``)."""
        return {k: v.expand(num_tasks, *v.shape) for k, v in params.items()}

    def rollout(self, params: Params, tasks: NavigationTasks, trajectories: int, phase: int, step: int) -> Batch:
        """Trajectories of the per-task ``params`` in every task, and their advantages.

        Task ``t``'s noise comes from a generator keyed by ``(its seed, phase, step)``.
        """
        generators = [episode_generator(int(seed), phase, step) for seed in tasks.seeds.tolist()]
        if isinstance(self.env, Navigation2D):
            batch = sample_trajectories(self.backbone, params, self.env, tasks.goals, trajectories, generators, batched=True, oracle=self.oracle)
        else:
            from lit_meta.rl.vector_env import VectorHalfCheetah, sample_env_trajectories

            if self._vector_env is None:
                self._vector_env = VectorHalfCheetah(self.environment, self.num_workers)
            batch = sample_env_trajectories(
                self.backbone, params, self._vector_env, self.env, tasks.goals, trajectories, generators, batched=True, oracle=self.oracle
            )
        return batch, advantages(batch, self.discount, self.gae_lambda, self.normalize_advantages)

    def log_prob(self, params: Params, trajectories: Trajectories) -> Tensor:
        """``[T, N, H]`` log-probabilities of the actions taken, under per-task ``params``."""
        mean, log_std = self.distribution(params, trajectories)
        return gaussian_log_prob(trajectories.actions, mean, log_std)

    def distribution(self, params: Params, trajectories: Trajectories) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)`` ``[T, N, H, A]`` of the per-task policies at every visited observation."""
        obs = trajectories.observations
        tasks = obs.shape[0]
        mean, log_std = policy_forward(self.backbone, params, obs.reshape(tasks, -1, obs.shape[-1]), batched=True)
        shape = (*obs.shape[:-1], mean.shape[-1])
        return mean.reshape(shape), log_std.reshape(shape)

    # -------------------------------------------------------------------------------------------- inner step
    @staticmethod
    def _valid_mean(values: Tensor, mask: Tensor) -> Tensor:
        """``[T]`` the mean of ``values`` over each task's valid steps."""
        return (values * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))

    def inner_loss(self, params: Params, batch: Batch) -> Tensor:
        """``[T]`` the policy-gradient loss ``-(1/M) sum log pi(a|s) A`` of each task."""
        trajectories, adv = batch
        return -self._valid_mean(self.log_prob(params, trajectories) * adv, trajectories.mask)

    def adapt_step(self, params: Params, batch: Batch, create_graph: bool, lr: float | None = None) -> Params:
        """One policy-gradient step (size ``lr``, default ``inner_lr``) of every task's parameters (``[T, ...]``
        each) on its own batch."""
        lr = self.inner_lr if lr is None else lr
        names = list(params)
        with torch.enable_grad():
            # Tasks are independent, so the gradient of the sum is every task's own gradient.
            loss = self.inner_loss(params, batch).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        return {n: params[n] - lr * g for n, g in zip(names, grads)}

    def adapted_parameters(self, params: Params, support: list[Batch], num_tasks: int, differentiable: bool) -> Params:
        """Per-task parameters ``[T, ...]`` after one step on each of ``support``'s batches, from shared ``params``.

        ``differentiable``: keep the path from ``params`` through the steps (second order unless ``first_order``);
        otherwise the result is detached.
        """
        fast = self.per_task(params, num_tasks)
        for batch in support:
            if not differentiable:
                fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            fast = self.adapt_step(fast, batch, create_graph=differentiable and not self.first_order)
        return fast if differentiable else {k: v.detach() for k, v in fast.items()}

    # ------------------------------------------------------------------------------------------- outer step
    def collect(self, tasks: NavigationTasks) -> tuple[list[Batch], Batch]:
        """The training data of one meta-iteration: a batch per inner step (with the policy of that step), then the
        post-update batch."""
        params = self.per_task({k: v.detach() for k, v in self.parameters_dict().items()}, tasks.num_tasks)
        support: list[Batch] = []
        for step in range(self.inner_steps):
            batch = self.rollout(params, tasks, self.trajectories, TRAIN_PHASE, step)
            support.append(batch)
            params = self.adapt_step({k: v.detach().requires_grad_() for k, v in params.items()}, batch, create_graph=False)
            params = {k: v.detach() for k, v in params.items()}
        query = self.rollout(params, tasks, self.trajectories, TRAIN_PHASE, self.inner_steps)
        return support, query

    def old_distribution(self, support: list[Batch], query: Batch) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)`` of the adapted policies of the current parameters at the post-update observations:
        the ``pi_old`` of the surrogate and the KL, a constant of the step."""
        current = {k: v.detach() for k, v in self.parameters_dict().items()}
        adapted = self.adapted_parameters(current, support, query[0].num_tasks, differentiable=False)
        with torch.no_grad():
            mean, log_std = self.distribution(adapted, query[0])
        return mean, log_std

    def objective(self, params: Params, support: list[Batch], query: Batch, old: tuple[Tensor, Tensor], differentiable: bool) -> tuple[Tensor, Tensor]:
        """``(surrogate L, mean KL)`` of the meta-batch at shared ``params`` (see the module docstring)."""
        adapted = self.adapted_parameters(params, support, query[0].num_tasks, differentiable)
        return self.adapted_objective(adapted, query, old)

    def adapted_objective(self, adapted: Params, query: Batch, old: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(surrogate L, mean KL)`` of the meta-batch given the adapted per-task parameters ``[T, ...]``."""
        trajectories, adv = query
        mean, log_std = self.distribution(adapted, trajectories)
        old_mean, old_log_std = old
        ratio = torch.exp(gaussian_log_prob(trajectories.actions, mean, log_std) - gaussian_log_prob(trajectories.actions, old_mean, old_log_std))
        surrogate = -self._valid_mean(ratio * adv, trajectories.mask).mean()
        kl = self._valid_mean(gaussian_kl(old_mean, old_log_std, mean, log_std), trajectories.mask).mean()
        return surrogate, kl

    def fisher_vector_product(self, params: Params, adapted: Params, query: Batch, old: tuple[Tensor, Tensor]) -> Callable[[Tensor], Tensor]:
        """``v -> F v``, ``F`` the Hessian of the mean KL with respect to the shared ``params`` at the current point.

        ``adapted`` are the per-task parameters computed from ``params`` with their graph (second order unless
        ``first_order``). With ``J`` the Jacobian of the adapted parameters with respect to ``params`` and ``H'`` the
        Hessian of the KL with respect to the adapted parameters, ``F = J^T H' J``: the other term of the chain
        rule multiplies the KL's gradient with respect to the adapted parameters, which is zero where the new policy
        is the old one. So a product costs two passes through the inner step's graph (``J v`` and ``J^T u``) and
        one Hessian-vector product of the policy on the post-update batch, instead of differentiating the KL's
        gradient through the inner step, which takes third derivatives of the inner loss only to multiply them by
        zero.
        """
        names = list(params)
        tensors = [params[n] for n in names]
        outputs = [adapted[n] for n in names]
        leaves = [t.detach().requires_grad_() for t in outputs]
        with torch.enable_grad():
            _, kl = self.adapted_objective(dict(zip(names, leaves)), query, old)
            kl_gradient = torch.autograd.grad(kl, leaves, create_graph=True)
            # J^T w as a function of a probe w: differentiating it with respect to w gives J v (forward mode by two
            # reverse passes, for any number of inner steps).
            probes = [torch.zeros_like(t, requires_grad=True) for t in outputs]
            transposed = torch.autograd.grad(outputs, tensors, grad_outputs=probes, create_graph=True)

        def product(vector: Tensor) -> Tensor:
            with torch.enable_grad():
                jv = torch.autograd.grad(transposed, probes, grad_outputs=_split(vector, tensors), retain_graph=True)
                hjv = torch.autograd.grad(kl_gradient, leaves, grad_outputs=jv, retain_graph=True)
                jthjv = torch.autograd.grad(outputs, tensors, grad_outputs=hjv, retain_graph=True)
            return self._reduce(parameters_to_vector(jthjv))

        return product

    def _reduce(self, value: Tensor) -> Tensor:
        """The mean over processes (each rank has its own tasks); the value itself in a single process."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.strategy.reduce(value, reduce_op="mean")
        if trainer is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            return value / torch.distributed.get_world_size()
        return value

    def meta_step(self, tasks: NavigationTasks) -> tuple[TRPOStep, list[Batch], Batch]:
        """Collect the meta-iteration's trajectories and take the TRPO step on the policy's parameters.

        Under DDP every quantity the step depends on (gradient, Fisher-vector products, line-search values) is
        averaged over the ranks, so that every rank takes the same step on the meta-batch of all ranks' tasks.
        """
        support, query = self.collect(tasks)
        params = self.parameters_dict()
        names = list(params)
        tensors = [params[n] for n in names]
        old = self.old_distribution(support, query)
        with torch.enable_grad():
            adapted = self.adapted_parameters(params, support, query[0].num_tasks, differentiable=True)
            surrogate, _ = self.adapted_objective(adapted, query, old)
            gradient = self._reduce(parameters_to_vector(torch.autograd.grad(surrogate, tensors, retain_graph=True)))
        fisher_vector_product = self.fisher_vector_product(params, adapted, query, old)

        def evaluate(flat: Tensor) -> tuple[Tensor, Tensor]:
            candidate = dict(zip(names, _split(flat, tensors)))
            loss, divergence = self.objective(candidate, support, query, old, differentiable=False)
            return self._reduce(loss.detach()), self._reduce(divergence.detach())

        current = parameters_to_vector(tensors).detach()
        step = trpo_step(
            current,
            gradient.detach(),
            fisher_vector_product,
            evaluate,
            loss_before=float(self._reduce(surrogate.detach())),
            max_kl=self.max_kl,
            cg_iters=self.cg_iters,
            damping=self.cg_damping,
            backtrack_ratio=self.backtrack_ratio,
            max_backtracks=self.max_backtracks,
        )
        with torch.no_grad():
            vector_to_parameters(step.parameters, tensors)
        self.last_step = step
        return step, support, query

    def _check_environment(self) -> None:
        """One-line error when the datamodule's tasks are of another environment than this policy's."""
        given = getattr(self._datamodule(), "environment", None)
        if given is not None and given != self.environment:
            raise ConfigError(
                f"the datamodule gives {given} tasks but this {type(self).__name__} was built for {self.environment}: set "
                "the same environment for model and data"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._check_environment()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._check_environment()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._check_environment()

    def teardown(self, stage: str) -> None:
        # Stop the worker processes of the HalfCheetah environments (a later rollout starts new ones).
        if self._vector_env is not None:
            self._vector_env.close()
            self._vector_env = None
        super().teardown(stage)

    def training_step(self, batch: NavigationTasks, batch_idx: int) -> None:  # type: ignore[override]
        self._require_grad_mode()
        opt = self.optimizers()
        step, support, query = self.meta_step(batch)
        # The TRPO step has written the parameters; the optimizer step only counts it (see configure_optimizers).
        opt.zero_grad(set_to_none=True)
        opt.step()
        before = (support[0] if support else query)[0].average_return().mean()
        after = query[0].average_return().mean()
        values = {
            "train/return_pre": before,
            "train/return_post": after,
            "train/kl": torch.tensor(step.kl),
            "train/surrogate_improvement": torch.tensor(step.loss_before - step.loss_after),
            "train/backtracks": torch.tensor(float(step.backtracks)),
        }
        for name, value in values.items():
            self.log(name, value.float(), prog_bar=name.startswith("train/return"), batch_size=batch.num_tasks)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # TRPO sets the parameters itself. Plain SGD that never receives a gradient leaves them alone, and its
        # step() makes Lightning count meta-iterations as for every other algorithm (global_step, max_steps,
        # checkpoint names, resume).
        return torch.optim.SGD(self.parameters(), lr=1.0)

    # -------------------------------------------------------------------------------------------- evaluation
    def task_metrics(self, batch: NavigationTasks) -> dict[str, Tensor]:  # type: ignore[override]
        """``{"return_k": [T]}``: each task's average return after ``k = 0..eval_inner_steps`` policy-gradient steps."""
        params = self.per_task({k: v.detach() for k, v in self.parameters_dict().items()}, batch.num_tasks)
        values: dict[str, Tensor] = {}
        for step in range(self.eval_inner_steps + 1):
            rollout = self.rollout(params, batch, self.eval_trajectories, EVAL_PHASE, step)
            values[f"return_{step}"] = rollout[0].average_return()
            if step < self.eval_inner_steps:
                lr = None if self.eval_inner_lrs is None else self.eval_inner_lrs[step]
                params = self.adapt_step({k: v.detach().requires_grad_() for k, v in params.items()}, rollout, create_graph=False, lr=lr)
                params = {k: v.detach() for k, v in params.items()}
        return values

    def adapt(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Not available: a policy adapts to a task from its own trajectories, not from a labelled support set."""
        raise ConfigError(
            f"{type(self).__name__} adapts from trajectories it collects itself, not from a support set: evaluate it "
            "with validate/test (task_metrics gives the returns before and after each adaptation step)"
        )

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.adapt()

    def meta_loss(self, batch: NavigationTasks) -> Tensor:  # type: ignore[override]
        """The surrogate of a fresh meta-iteration at the current parameters (differentiable, second order)."""
        support, query = self.collect(batch)
        return self.objective(self.parameters_dict(), support, query, self.old_distribution(support, query), differentiable=True)[0]


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into views shaped like the tensors of ``like``, in order."""
    pieces, offset = [], 0
    for tensor in like:
        pieces.append(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return pieces
