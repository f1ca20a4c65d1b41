r"""MetaBGD: a generated classifier head, then gradient descent on the support set.

The model-based method of this library. A *generator* reads a task's support set and writes the initial weights of
the task's classifier; the classifier is fine-tuned with a few gradient steps on the support set; the query loss
after fine-tuning (and, weighted, before it) trains the generator and the feature extractor end to end, through the
fine-tuning steps (second order).

**Equations** (defaults). For a task with support set ``S`` (``N`` classes), query set ``Q``, feature extractor
``f_theta`` (the backbone, returning ``D``-dimensional embeddings) and generator ``R_phi``:

1. Features, centred on the support set's mean and L2-normalised (``features="normalized"``):
   ``z = normalize(f_theta(x) - mean_{x' in S} f_theta(x'))``; queries are centred with the same support mean, so
   no query influences another.
2. Class means ``mu_c = mean_{i: y_i = c} z_i`` and a set encoding ``e_c = relu(A mu_c + a)``, ``m = mean_c e_c``.
3. Generated head, a residual over the class means (``generator="residual"``):
   ``[Delta_c ; b_c] = MLP_phi([e_c ; m])`` (last layer initialised at zero), ``w_c = normalize(mu_c + Delta_c)``,
   so training starts from a cosine prototype classifier.
4. Logits with a learned temperature: ``s(x) = tau * (W z(x) + b)``.
5. Fine-tuning, ``k`` steps on the support cross-entropy ``L_S``, with learned per-step, per-dimension rates:
   ``(W, b)_{j+1} = (W, b)_j - (a_j / lambda) * grad L_S((W, b)_j)``, where ``a_j in (0, a_max)`` (``a_max`` times a
   sigmoid) has one entry per feature dimension plus one for the bias, shared by the classes, and ``lambda`` is the
   top eigenvalue of ``L_S``'s Hessian at the generated head (power iteration; no gradient flows through it), so
   the first step has ``alpha * lambda_max < a_max <= 1`` and cannot oscillate. ``lambda`` is kept at least
   ``curvature_floor * C``, where ``C = tau^2 * mean_i (|z_i|^2 + 1) / 2`` bounds the top eigenvalue everywhere
   (the softmax covariance ``diag(p) - p p^T`` is at most ``1/2`` in every direction, so
   ``H <= (tau^2 / 2) I (x) mean_i [z_i; 1][z_i; 1]^T``): a head that already fits the support set confidently has
   almost no curvature, and dividing by it alone would make the steps unbounded.
6. Meta-objective: ``L_Q((W, b)_k) + w_pre * L_Q((W, b)_0) + w_step * mean_{0<j<k} L_Q((W, b)_j)``, averaged
   over the meta-batch; ``w_pre`` is annealed linearly from ``pre_loss_weight`` to ``pre_loss_weight_end`` over
   ``pre_loss_anneal_steps`` steps (MAML++'s multi-step loss, reduced to the two ends of the trajectory). The second
   term asks the generated head itself to classify, so the generator cannot leave all the work to the fine-tuning.
   The third (``step_loss_weight``, default 0) asks every intermediate step to lower the query loss too, not only
   the last; it is MAML++'s multi-step loss without its anneal, kept so that the query loss falls along the whole
   trajectory instead of passing through a minimum.

The ablations of the method are options of this class: ``inner_steps: 0`` (generator only),
``generator: "prototype"`` (Proto-MAML's closed-form head ``w_c = 2 mu_c``, ``b_c = -|mu_c|^2``, then
fine-tuning; Triantafillou et al. 2020), ``generator: "zero"`` (fine-tuning only: for a head-only inner loop a
class-shared initialization is the same as zero, since a row shared by all classes shifts every logit alike), and
``generator: "mlp"`` with ``features: raw``, ``temperature: 1``, ``precondition: false`` (the plain MLP generator
on raw embeddings with a fixed rate). ``film: true`` also conditions every normalization layer of the backbone on the
task (FiLM, Perez et al. 2018), zero-initialised.

**Relation to published methods.** LEO (Rusu et al., ICLR 2019) generates a classifier from a support set and
fine-tunes it; its "conditional generator only" and "+ fine-tuning" ablation rows (arXiv Table 2) are the closest
published analogue of ``inner_steps: 0`` and the full method, but LEO decodes stochastic latent codes, adapts them in
latent space, and uses frozen pre-trained WRN-28-10 features. Gidaris & Komodakis (CVPR 2018) and Qiao et al.
(CVPR 2018) predict classifier weights from class-mean activations with a cosine classifier, without fine-tuning;
the residual generator of step 3 is theirs in spirit.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError, require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import Params, adapt, map_tasks
from lit_meta.algorithms.base import task_loss, task_metric
from lit_meta.algorithms.embedding import EmbeddingMetaLearner, class_means
from lit_meta.backbones import BatchStatNorm
from lit_meta.normalization import episode_outputs

GENERATORS = ("residual", "prototype", "zero", "mlp")
INITS = (*GENERATORS, "random")
FEATURES = ("normalized", "raw")
POWER_ITERATIONS = 50


class _SetEncoder(nn.Module):
    """Class means ``[N, D]`` -> per-class codes ``[N, H]`` (or ``[N, 2H]`` with the task's mean code appended)."""

    def __init__(self, dim: int, hidden: int, set_context: bool) -> None:
        super().__init__()
        self.set_context = set_context
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())

    @property
    def out_features(self) -> int:
        return self.encoder[0].out_features * (2 if self.set_context else 1)

    def forward(self, means: Tensor) -> Tensor:
        e = self.encoder(means)
        if self.set_context:
            e = torch.cat([e, e.mean(dim=-2, keepdim=True).expand_as(e)], dim=-1)
        return e


class HeadGenerator(nn.Module):
    """Class means ``[N, D]`` -> head ``(W [N, D], b [N])``: a set encoder and an MLP decoder.

    With ``residual`` (step 3 of the module docstring) the rows are ``normalize(mu_c + Delta_c)`` and the decoder's
    last layer starts at zero, so training begins as a cosine prototype classifier; without it the decoder's output
    is the head itself (the plain MLP generator).

    Args:
        dim: embedding size ``D``.
        hidden: width of the set encoder and of the decoder.
        set_context: give each class's decoder the mean code of all classes of the task.
        residual: a residual over the class means (see above).
    """

    def __init__(self, dim: int, hidden: int = 256, set_context: bool = True, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.set_encoder = _SetEncoder(dim, hidden, set_context)
        # No bias on the output layer: a bias shared by the classes shifts every logit alike and never gets a gradient.
        self.decoder = nn.Sequential(nn.Linear(self.set_encoder.out_features, hidden), nn.ReLU(), nn.Linear(hidden, dim + 1, bias=False))
        if residual:
            nn.init.zeros_(self.decoder[-1].weight)

    def forward(self, means: Tensor) -> tuple[Tensor, Tensor]:
        out = self.decoder(self.set_encoder(means))
        if self.residual:
            return F.normalize(means + out[..., :-1], dim=-1), out[..., -1]
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


class _TaskHead(nn.Module):
    """``temperature * (z W^T + b)`` with every tensor supplied by ``functional_call`` (no parameters of its own)."""

    def forward(self, z: Tensor) -> Tensor:
        return self.temperature * F.linear(z, self.weight, self.bias)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def head_hessian_product(z: Tensor, tau: Tensor, head: Params) -> Callable[[Params], Params]:
    """``v -> H v``, ``H`` the Hessian in ``(W, b)`` of ``mean_i CE(tau * (W z_i + b), y_i)`` at ``head``.

    In closed form, because the head is linear: the logits move by ``u_i = tau * (V z_i + v_b)`` along ``v``, the
    cross-entropy's Hessian in the logits is ``(diag p_i - p_i p_i^T) / n`` (independent of the labels), and the
    product maps back through the same linear map. Two small matrix products per call instead of a Hessian-vector
    product through autograd, which matters because the curvature is measured at every training step.

    Args:
        z: the support features ``[n, D]``.
        tau: the logit scale.
        head: ``{"weight": [N, D], "bias": [N]}``.
    """
    p = torch.softmax(tau * F.linear(z, head["weight"], head["bias"]), dim=-1)
    scale = tau / z.shape[0]

    def product(v: Params) -> Params:
        pu = p * (tau * F.linear(z, v["weight"], v["bias"]))
        g = scale * (pu - p * pu.sum(-1, keepdim=True))
        return {"weight": g.T @ z, "bias": g.sum(0)}

    return product


def _top_eigenvalue(product: Callable[[Params], Params], like: Params, sqrt_p: Params | None, iterations: int = POWER_ITERATIONS) -> Tensor:
    """The largest eigenvalue of ``P^1/2 H P^1/2`` (``H``: the symmetric positive semi-definite operator ``product``
    on tensors shaped like ``like``; ``P = I`` without ``sqrt_p``) by power iteration (runs inside ``vmap``)."""

    def operator(v: Params) -> Params:
        scaled = v if sqrt_p is None else {k: sqrt_p[k] * v[k] for k in v}
        hv = product(scaled)
        return hv if sqrt_p is None else {k: sqrt_p[k] * hv[k] for k in hv}

    # A fixed, deterministic start (no random state, so vmapped and looped runs agree); not the all-ones vector, which
    # lies in the Hessian's null space (adding one vector to every class's row changes no probability).
    v = {k: torch.sin(torch.arange(t.numel(), dtype=t.dtype, device=t.device) * 12.9898 + 1.0).view_as(t) for k, t in like.items()}
    value = next(iter(like.values())).new_zeros(())
    for _ in range(iterations):
        # Clamped: a zero operator (all rates zero) has top eigenvalue 0, not 0 / 0.
        norm = torch.sqrt(sum(t.pow(2).sum() for t in v.values())).clamp_min(torch.finfo(value.dtype).tiny)
        v = {k: t / norm for k, t in v.items()}
        hv = operator(v)
        value = sum((hv[k] * v[k]).sum() for k in v)
        v = hv
    return value


class MetaBGD(EmbeddingMetaLearner):
    """Generated head + fine-tuning (see the module docstring for the equations).

    Args:
        backbone: the feature extractor, returning embeddings (``out_features: null``).
        generator: where fine-tuning starts: ``"residual"`` (the method), ``"prototype"`` (Proto-MAML's head),
            ``"zero"`` (fine-tuning only) or ``"mlp"`` (a plain MLP generator).
        features: ``"normalized"`` (centred on the support mean, then L2-normalised) or ``"raw"`` embeddings.
        temperature: the logit scale ``tau`` (its initial value when learned).
        learn_temperature: train ``tau`` (as ``log tau``).
        inner_lr: the fine-tuning rate: ``a`` in units of ``1 / C`` with ``precondition`` (then below
            ``max_inner_lr``), else the plain learning rate. Its initial value when learned.
        inner_steps: fine-tuning steps during meta-training (0: the generator alone).
        eval_inner_steps: fine-tuning steps at validation and test (default: ``inner_steps``); steps beyond the
            trained ones reuse the last step's rates.
        learn_inner_lr: learn one rate per step and per feature dimension (plus the bias), shared by the classes.
        max_inner_lr: ``a_max``, the upper end of the learned rates (a sigmoid keeps them inside ``(0, a_max)``).
        precondition: divide the rates by the support loss's curvature at the generated head (step 5); with
            ``max_inner_lr <= 1`` the first fine-tuning step has ``alpha * lambda_max < 1``.
        curvature_floor: the least curvature the rates are divided by, as a fraction of ``C``: it caps the steps
            where the generated head already fits the support set confidently and its curvature nearly vanishes.
            With several shots per class that happens in a few episodes, and ``1e-3`` lets their first step
            diverge; the 5-shot configs use ``0.01`` (docs/metabgd.md measures both).
        first_order: drop the second-order terms of the meta-gradient.
        pre_loss_weight: weight of the query loss of the generated head, before fine-tuning.
        pre_loss_weight_end: the weight reached after ``pre_loss_anneal_steps`` (default: ``pre_loss_weight``).
        pre_loss_anneal_steps: optimizer steps of the linear anneal (0: constant weight).
        step_loss_weight: weight of the mean query loss after the intermediate fine-tuning steps ``1..k-1``.
        generator_hidden: width of the generator networks.
        set_context: condition each class's weights on the whole task.
        film: also modulate every normalization layer of the backbone from the support set (FiLM).
        embedding_dim: the backbone's embedding size, where it has no ``embedding_dim`` attribute.
        joint_embedding: embed support and query as one batch (see :mod:`lit_meta.algorithms.embedding`).
        monitor_every: every this many training steps, log the diagnostics of :meth:`trajectory_metrics`
            (``train/acc_pre``, ``train/stability``, ...) for the current meta-batch; 0 disables.
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, lr_scheduler, vectorize, chunk_size,
            grad_clip_norm, normalization).
    """

    def __init__(
        self,
        backbone: nn.Module,
        generator: str = "residual",
        features: str = "normalized",
        temperature: float = 10.0,
        learn_temperature: bool = True,
        inner_lr: float = 0.5,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        learn_inner_lr: bool = True,
        max_inner_lr: float = 1.0,
        precondition: bool = True,
        curvature_floor: float = 1e-3,
        first_order: bool = False,
        pre_loss_weight: float = 1.0,
        pre_loss_weight_end: float | None = None,
        pre_loss_anneal_steps: int = 0,
        step_loss_weight: float = 0.0,
        generator_hidden: int = 256,
        set_context: bool = True,
        film: bool = False,
        embedding_dim: int | None = None,
        joint_embedding: bool = True,
        monitor_every: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, joint_embedding=joint_embedding, **kwargs)
        if generator not in GENERATORS:
            raise ConfigError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if features not in FEATURES:
            raise ConfigError(f"features must be one of {FEATURES}, got {features!r}")
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps), ("pre_loss_anneal_steps", pre_loss_anneal_steps), ("monitor_every", monitor_every)):
            if not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        require_positive(generator_hidden=generator_hidden)
        for name, value in (("temperature", temperature), ("inner_lr", inner_lr), ("max_inner_lr", max_inner_lr)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(curvature_floor, (int, float)) and 0 < curvature_floor <= 1):
            raise ConfigError(f"curvature_floor is a fraction of the curvature bound C, in (0, 1]; got {curvature_floor!r}")
        pre_loss_weight_end = pre_loss_weight if pre_loss_weight_end is None else pre_loss_weight_end
        if pre_loss_weight < 0 or pre_loss_weight_end < 0:
            raise ConfigError(f"pre_loss_weight and pre_loss_weight_end must be >= 0, got {pre_loss_weight!r}, {pre_loss_weight_end!r}")
        if not (isinstance(step_loss_weight, (int, float)) and step_loss_weight >= 0):
            raise ConfigError(f"step_loss_weight must be a number >= 0, got {step_loss_weight!r}")
        learned_rates = learn_inner_lr and inner_steps > 0
        if learned_rates and not inner_lr < max_inner_lr:
            raise ConfigError(
                f"a learned inner_lr starts inside (0, max_inner_lr): got inner_lr {inner_lr} >= max_inner_lr {max_inner_lr}; "
                "lower inner_lr or raise max_inner_lr"
            )
        dim = self.embedding_dim(embedding_dim)
        self.generator_kind = generator
        self.features = features
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.precondition = precondition
        self.curvature_floor = float(curvature_floor)
        self.max_inner_lr = float(max_inner_lr)
        self.pre_loss_weight = float(pre_loss_weight)
        self.pre_loss_weight_end = float(pre_loss_weight_end)
        self.pre_loss_anneal_steps = pre_loss_anneal_steps
        self.step_loss_weight = float(step_loss_weight)
        self.monitor_every = monitor_every
        log_tau = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        # One rate per step and per feature dimension (+ bias), as sigmoid logits; a fixed scalar otherwise.
        self.inner_lr_logits = (
            nn.Parameter(torch.full((inner_steps, dim + 1), _logit(inner_lr / max_inner_lr))) if learned_rates else None
        )
        self.inner_lr = float(inner_lr)
        learned = generator in ("residual", "mlp")
        self.generator = HeadGenerator(dim, generator_hidden, set_context, residual=generator == "residual") if learned else None
        self.film = None
        if film:
            channels = {name: module.weight.numel() for name, module in self.backbone.named_modules() if isinstance(module, BatchStatNorm)}
            if not channels:
                raise ConfigError("film=True modulates the backbone's BatchStatNorm layers, but this backbone has none")
            self.film = FiLMGenerator(dim, channels, generator_hidden)
        # A parameter-free module for functional_call, kept out of the module tree (a plain attribute).
        self.__dict__["_head"] = _TaskHead()
        # The largest alpha * lambda_max seen in training, kept in checkpoints so that it survives a resume.
        self.register_buffer("max_stability", torch.zeros(()))

    # ---------------------------------------------------------------------------------------------- task model
    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def steps(self, training: bool) -> int:
        return self.inner_steps if training else self.eval_inner_steps

    def pre_loss_weight_at(self, step: int) -> float:
        """``w_pre`` after ``step`` optimizer steps (the linear anneal of step 6 of the module docstring)."""
        if self.pre_loss_anneal_steps == 0:
            return self.pre_loss_weight
        t = min(step / self.pre_loss_anneal_steps, 1.0)
        return self.pre_loss_weight + t * (self.pre_loss_weight_end - self.pre_loss_weight)

    def rate(self, step: int) -> Tensor | float:
        """The fine-tuning rate ``a_j`` of a step: ``[D + 1]`` when learned (steps past the trained ones reuse the last)."""
        if self.inner_lr_logits is None:
            return self.inner_lr
        return self.max_inner_lr * torch.sigmoid(self.inner_lr_logits[min(step, self.inner_lr_logits.shape[0] - 1)])

    def curvature_bound(self, support_z: Tensor) -> Tensor:
        """``C``: a bound on the top eigenvalue of the support loss's Hessian in the head (step 5)."""
        return 0.5 * self.temperature**2 * (support_z.pow(2).sum(-1) + 1).mean()

    def step_scale(self, support_z: Tensor, support_y: Tensor, head: Params) -> Tensor | float:
        """What the rates are divided by: the curvature at the initial head with ``precondition``, else 1."""
        return self.curvature(support_z, support_y, head) if self.precondition else 1.0

    def curvature(self, support_z: Tensor, support_y: Tensor, head: Params) -> Tensor:
        """``lambda_max`` of the support loss's Hessian at ``head`` (power iteration), detached, at least
        ``curvature_floor * C``."""
        # A step-size normaliser, not part of the objective: no gradient flows through it. Float32 without autocast:
        # Hessian-vector products overflow in half precision.
        z, tau = _at_least_fp32(support_z.detach()), self.temperature.detach()
        with torch.autocast(z.device.type, enabled=False):
            at = {k: _at_least_fp32(v.detach()) for k, v in head.items()}
            value = _top_eigenvalue(head_hessian_product(z, tau, at), at, None)
            value = torch.maximum(value, self.curvature_floor * self.curvature_bound(z).detach())
        return value.to(support_z.dtype)

    def step_sizes(self, support_z: Tensor, scale: Tensor | float = 1.0) -> Callable[[int], dict[str, Tensor | float]]:
        """``step -> {"weight": rate [D] or float, "bias": rate}``: the per-entry step sizes, ``a_j / scale``."""

        def at(step: int) -> dict[str, Tensor | float]:
            rate = self.rate(step)
            if isinstance(rate, Tensor):
                return {"weight": rate[:-1] / scale, "bias": rate[-1] / scale}
            return {"weight": rate / scale, "bias": rate / scale}

        return at

    def backbone_parameters(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, training: bool) -> dict[str, Tensor]:
        """The backbone's parameters for this task: FiLM-modulated from the support set, or the shared ones."""
        params = dict(self.backbone.named_parameters())
        if self.film is None:
            return params
        support_z, _ = self.embed_task(support_x, query_x, training)
        for name, (gamma, beta) in self.film(class_means(support_z, support_y, self.ways_of(support_y))).items():
            params[f"{name}.weight"] = params[f"{name}.weight"] * (1 + gamma)
            params[f"{name}.bias"] = params[f"{name}.bias"] + beta
        return params

    def task_features(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """Support and query features of one task (step 1): the protocol's embeddings, transformed by ``features``."""
        params = self.backbone_parameters(support_x, support_y, query_x, training)
        support_z, query_z = episode_outputs(
            lambda x: functional_call(self.backbone, params, (x,)).flatten(1),
            support_x, query_x, self.protocol(training), self.joint_embedding, self.vectorize,
        )
        if self.features == "raw":
            return support_z, query_z
        centre = support_z.mean(0, keepdim=True)
        return F.normalize(support_z - centre, dim=-1), F.normalize(query_z - centre, dim=-1)

    def initial_head(self, support_z: Tensor, support_y: Tensor, init: str | None = None) -> Params:
        """``{"weight": [N, D], "bias": [N]}`` where fine-tuning starts: ``generator``'s head, or ``init``'s."""
        init = init or self.generator_kind
        ways, dim = self.ways_of(support_y), support_z.shape[-1]
        if init == "zero":
            return {"weight": support_z.new_zeros(ways, dim), "bias": support_z.new_zeros(ways)}
        if init == "random":  # nn.Linear's default initialization
            bound = 1.0 / math.sqrt(dim)
            weight = (torch.rand(ways, dim, device=support_z.device, dtype=support_z.dtype) * 2 - 1) * bound
            return {"weight": weight, "bias": (torch.rand(ways, device=support_z.device, dtype=support_z.dtype) * 2 - 1) * bound}
        means = class_means(support_z, support_y, ways)
        if init == "prototype":
            return {"weight": 2 * means, "bias": -means.pow(2).sum(-1)}
        if init not in INITS or self.generator is None or init != self.generator_kind:
            raise ConfigError(f"init must be one of {('zero', 'random', 'prototype', self.generator_kind)}, got {init!r}")
        weight, bias = self.generator(means)
        return {"weight": weight, "bias": bias}

    def logits(self, z: Tensor, head: Params) -> Tensor:
        """``tau * (z W^T + b)``."""
        return self.temperature * F.linear(z, head["weight"], head["bias"])

    def head_trajectory(
        self, support_z: Tensor, support_y: Tensor, training: bool, steps: int | None = None, init: str | None = None
    ) -> list[Params]:
        """The head before and after each fine-tuning step on one task's support features: ``[(W, b)_0, ..., (W, b)_k]``."""
        steps = self.steps(training) if steps is None else steps
        head = self.initial_head(support_z, support_y, init)
        return adapt(
            self._head,
            head,
            support_z,
            support_y,
            loss_fn=task_loss,
            steps=steps,
            step_size=self.step_sizes(support_z, self.step_scale(support_z, support_y, head) if steps else 1.0),
            first_order=self.first_order or not training,
            context={"temperature": self.temperature},
            loss_scale=self.inner_loss_scale() if training else 1.0,
        )

    # ---------------------------------------------------------------------------------------------- MetaLearner
    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        if not training:
            # Evaluation needs no meta-gradient. torch.func.grad ignores an enclosing no_grad, so the fine-tuning
            # steps still differentiate; only the graph back to the meta-parameters is not built.
            with torch.no_grad():
                return self._task_objective(support_x, support_y, query_x, query_y, training)
        return self._task_objective(support_x, support_y, query_x, query_y, training)

    def _task_objective(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        support_z, query_z = self.task_features(support_x, support_y, query_x, training)
        trajectory = self.head_trajectory(support_z, support_y, training)
        logits = self.logits(query_z, trajectory[-1])
        objective = task_loss(logits, query_y)
        weight = self.pre_loss_weight_at(self.global_step)
        if training and len(trajectory) > 1 and weight > 0:
            objective = objective + weight * task_loss(self.logits(query_z, trajectory[0]), query_y)
        if training and len(trajectory) > 2 and self.step_loss_weight > 0:
            middle = torch.stack([task_loss(self.logits(query_z, head), query_y) for head in trajectory[1:-1]])
            objective = objective + self.step_loss_weight * middle.mean()
        return objective, logits

    def stability(self, support_z: Tensor, support_y: Tensor, head: Params, rates: dict[str, Tensor | float]) -> Tensor:
        """``lambda_max(P^1/2 H P^1/2)``: ``alpha * lambda_max`` of a fine-tuning step with per-entry ``rates`` ``P``
        from ``head``, ``H`` the Hessian of the support loss there (below 2 the step does not diverge; below 1 it does
        not oscillate)."""
        sqrt_p = {k: torch.as_tensor(rates[k], dtype=v.dtype, device=v.device).sqrt().expand_as(v) for k, v in head.items()}
        return _top_eigenvalue(head_hessian_product(support_z, self.temperature, head), head, sqrt_p)

    def trajectory_metrics(self, batch: TaskBatch, training: bool = False, steps: int | None = None, init: str | None = None) -> dict[str, Tensor]:
        """Per-task diagnostics of the fine-tuning (``[T]`` each), without a meta-gradient.

        ``acc``/``loss`` after the last step, ``acc_pre``/``loss_pre`` of the initial head, ``acc_step{j}``/
        ``loss_step{j}`` after each step ``j``, ``stability`` (the largest ``alpha * lambda_max`` over the steps, see
        :meth:`stability`) and ``drift`` (``|(W, b)_k - (W, b)_0| / |(W, b)_0|``, not for a zero head).
        """
        steps = self.steps(training) if steps is None else steps
        init = init or self.generator_kind

        def per_task(sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                support_z, query_z = self.task_features(sx, sy, qx, training)
                trajectory = self.head_trajectory(support_z, sy, False, steps, init)
                logits = torch.stack([self.logits(query_z, p) for p in trajectory])
                # The diagnostics in float32 without autocast (power iteration overflows in half precision).
                with torch.autocast(support_z.device.type, enabled=False):
                    z = _at_least_fp32(support_z)
                    heads = [{k: _at_least_fp32(v) for k, v in p.items()} for p in trajectory]
                    if steps:
                        rates = self.step_sizes(z, self.step_scale(z, sy, heads[0]))
                        stability = torch.stack([self.stability(z, sy, p, rates(j)) for j, p in enumerate(heads[:-1])]).max()
                    else:
                        stability = z.new_zeros(())
                    start, end = heads[0], heads[-1]
                    change = torch.sqrt(sum((end[k] - start[k]).pow(2).sum() for k in start))
                    drift = change / torch.sqrt(sum(start[k].pow(2).sum() for k in start)).clamp_min(1e-12)
            return logits, stability, drift

        with self.episode_ways(batch):
            logits, stability, drift = map_tasks(
                per_task, batch.support_x, batch.support_y, batch.query_x, vectorize=self.vectorize, chunk_size=self.chunk_size
            )
        logits = logits.transpose(0, 1)  # [steps + 1, T, Q, N]
        targets = batch.query_y
        values = {"acc": self._per_task(task_metric, logits[-1], targets), "loss": self._per_task(task_loss, logits[-1], targets)}
        for j in range(steps + 1):
            suffix = "_pre" if j == 0 else f"_step{j}"
            values[f"acc{suffix}"] = self._per_task(task_metric, logits[j], targets)
            values[f"loss{suffix}"] = self._per_task(task_loss, logits[j], targets)
        values["stability"] = stability
        if init != "zero":
            values["drift"] = drift
        return values

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query loss and accuracy after fine-tuning, and the diagnostics of :meth:`trajectory_metrics`."""
        return self.trajectory_metrics(batch, training=False)

    def metrics_by_step(self, batch: TaskBatch, steps: int | None = None, init: str | None = None) -> dict[str, Tensor]:
        """Query ``acc`` and ``loss`` (``[steps + 1, T]`` each) after ``0..steps`` fine-tuning steps from the
        generated head or another ``init`` (``"zero"``, ``"random"``, ``"prototype"``), under the evaluation protocol."""
        self._require_grad_mode()
        steps = self.eval_inner_steps if steps is None else steps
        with torch.enable_grad(), self.inner_loop_precision(), self.evaluation_normalization():
            values = self.trajectory_metrics(batch, training=False, steps=steps, init=init)
        names = ["_pre", *(f"_step{j}" for j in range(1, steps + 1))]
        return {key: torch.stack([values[f"{key}{n}"] for n in names]) for key in ("acc", "loss")}

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.monitor_every and batch_idx % self.monitor_every == 0:
            # Logged per step and averaged per epoch; the stability's running maximum is logged with every step.
            values = self.trajectory_metrics(batch, training=True)
            # The largest over every rank's tasks, so the buffer stays identical on all ranks.
            self.max_stability.copy_(torch.maximum(self.max_stability, self.all_gather(values["stability"].max()).max()))
            for key in ("acc_pre", "loss_pre", "drift"):
                if key in values:
                    self.log(f"train/{key}", values[key].mean(), on_step=True, on_epoch=True, batch_size=batch.num_tasks)
            self.log("train/stability", values["stability"].max(), on_step=True, on_epoch=True, reduce_fx="max", batch_size=batch.num_tasks)
        self.log("train/stability_max", self.max_stability, batch_size=batch.num_tasks)
        self.log("train/temperature", self.temperature.detach(), batch_size=batch.num_tasks)
        return loss
