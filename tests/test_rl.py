"""Meta-RL on 2-D navigation: the environment against closed forms, the policy-gradient step and MAML-TRPO's
meta-gradient against per-trajectory and per-task references written with plain autograd and torch.distributions,
the TRPO step's constraint, exact resume of the task stream, and a short training run."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from datamodules.errors import ConfigError
from lit_meta.rl import (
    MAMLRL,
    GaussianMLPPolicy,
    Navigation2D,
    NavigationTasks,
    RolloutDataModule,
    advantages,
    conjugate_gradient,
    sample_trajectories,
)
from lit_meta.rl.maml_rl import TRAIN_PHASE


def constant_policy(action, in_features=2):
    """A policy whose mean is ``action`` everywhere, with (numerically) no noise."""
    policy = GaussianMLPPolicy(in_features=in_features, hidden=(4,))
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.mean.bias.copy_(torch.tensor(action))
        policy.log_std.fill_(-40.0)
    return policy


def rollout(policy, env, goals, trajectories=1):
    generators = [torch.Generator().manual_seed(i) for i in range(len(goals))]
    return sample_trajectories(policy, dict(policy.named_parameters()), env, goals, trajectories, generators, batched=False)


def test_rewards_are_minus_the_distance_after_each_move():
    env = Navigation2D(horizon=7, goal_tolerance=0.0)
    goal = torch.tensor([[0.3, -0.2]])
    batch = rollout(constant_policy([1.0, 0.5]), env, goal)
    move = torch.tensor([0.1, 0.05])  # action x 0.1, inside the box
    expected = torch.stack([-((t + 1) * move - goal[0]).norm() for t in range(7)])
    torch.testing.assert_close(batch.rewards[0, 0], expected)
    torch.testing.assert_close(batch.observations[0, 0, 3], 3 * move)  # the position before step 3
    assert batch.mask.all()
    assert batch.returns()[0, 0] == pytest.approx(float(expected.sum()), rel=1e-6)


def test_actions_are_clipped_to_the_box():
    env = Navigation2D(horizon=3, goal_tolerance=0.0)
    batch = rollout(constant_policy([5.0, -5.0]), env, torch.zeros(1, 2))
    torch.testing.assert_close(batch.observations[0, 0, 2], torch.tensor([0.2, -0.2]))
    torch.testing.assert_close(batch.rewards[0, 0], -torch.tensor([1.0, 2.0, 3.0]) * math.sqrt(0.02))


def test_episode_ends_at_the_goal():
    env = Navigation2D(horizon=10)
    goal = torch.tensor([[0.3, 0.15]])  # reached by the third move of (0.1, 0.05)
    batch = rollout(constant_policy([1.0, 0.5]), env, goal)
    torch.testing.assert_close(batch.mask[0, 0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0]))
    assert (batch.rewards[0, 0, 3:] == 0).all()
    expected = -(torch.tensor([0.2, 0.1]).norm() + torch.tensor([0.1, 0.05]).norm())
    assert float(batch.returns()[0, 0]) == pytest.approx(float(expected), abs=1e-6)


def test_oracle_observes_the_goal():
    env = Navigation2D(horizon=2, goal_tolerance=0.0)
    policy = constant_policy([1.0, 0.0], in_features=4)
    generators = [torch.Generator().manual_seed(0)]
    goal = torch.tensor([[0.25, -0.4]])
    batch = sample_trajectories(policy, dict(policy.named_parameters()), env, goal, 1, generators, batched=False, oracle=True)
    torch.testing.assert_close(batch.observations[0, 0, 1], torch.tensor([0.1, 0.0, 0.25, -0.4]))


def small_model(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("backbone", GaussianMLPPolicy(hidden=(8, 8)))
    kwargs.setdefault("horizon", 6)
    kwargs.setdefault("trajectories", 3)
    return MAMLRL(**kwargs).double()


def tasks(count=2, seed=0):
    data = RolloutDataModule(meta_batch_size=count, seed=seed)
    batch = next(iter(data.train_dataloader()))
    return NavigationTasks(batch.goals.double(), batch.seeds)


def reference_log_prob(policy, params, obs, action):
    mean, log_std = functional_call(policy, params, (obs,))
    return Normal(mean, log_std.exp()).log_prob(action).sum()


def test_policy_gradient_step_equals_a_per_trajectory_loop():
    model = small_model()
    batch = tasks()
    params = {k: v.detach() for k, v in model.backbone.named_parameters()}
    trajectories, adv = model.rollout(model.per_task(params, 2), batch, 3, TRAIN_PHASE, 0)
    adapted = model.adapt_step({k: v.requires_grad_() for k, v in model.per_task(params, 2).items()}, (trajectories, adv), create_graph=False)
    names = list(params)
    for t in range(2):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        total = [torch.zeros_like(v) for v in params.values()]
        steps = 0
        for n in range(3):
            for h in range(6):
                if trajectories.mask[t, n, h] == 0:
                    continue
                steps += 1
                logp = reference_log_prob(model.backbone, leaves, trajectories.observations[t, n, h], trajectories.actions[t, n, h])
                grads = torch.autograd.grad(logp, [leaves[k] for k in names])
                total = [a + g * adv[t, n, h] for a, g in zip(total, grads)]
        for k, g in zip(names, total):
            torch.testing.assert_close(adapted[k][t], params[k] + model.inner_lr * g / steps)


def reference_meta_gradient(model, support, query, first_order):
    """Mean over tasks of the gradient of the TRPO surrogate through one inner step, one task at a time."""
    params = dict(model.backbone.named_parameters())
    names = list(params)
    (pre, pre_adv), = support
    post, post_adv = query
    total = None
    for t in range(pre.num_tasks):
        inner = 0.0
        valid = pre.mask[t].bool()
        for n, h in valid.nonzero().tolist():
            inner = inner - reference_log_prob(model.backbone, params, pre.observations[t, n, h], pre.actions[t, n, h]) * pre_adv[t, n, h]
        inner = inner / valid.sum()
        grads = torch.autograd.grad(inner, [params[k] for k in names], create_graph=not first_order)
        fast = {k: params[k] - model.inner_lr * (g.detach() if first_order else g) for k, g in zip(names, grads)}
        old = {k: v.detach() for k, v in fast.items()}
        surrogate = 0.0
        valid = post.mask[t].bool()
        for n, h in valid.nonzero().tolist():
            obs, action = post.observations[t, n, h], post.actions[t, n, h]
            ratio = torch.exp(reference_log_prob(model.backbone, fast, obs, action) - reference_log_prob(model.backbone, old, obs, action))
            surrogate = surrogate - ratio * post_adv[t, n, h]
        surrogate = surrogate / valid.sum() / pre.num_tasks
        g = torch.autograd.grad(surrogate, [params[k] for k in names])
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return total


def library_meta_gradient(model, support, query):
    params = dict(model.backbone.named_parameters())
    surrogate, _ = model.objective(params, support, query, model.old_distribution(support, query), differentiable=True)
    return torch.autograd.grad(surrogate, list(params.values()))


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_a_per_task_loop(first_order):
    model = small_model(first_order=first_order)
    support, query = model.collect(tasks())
    expected = reference_meta_gradient(model, support, query, first_order)
    actual = library_meta_gradient(model, support, query)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * scale)


def test_second_order_differs_from_first_order():
    second = small_model()
    support, query = second.collect(tasks())
    first = small_model(first_order=True)
    g2 = torch.cat([g.reshape(-1) for g in library_meta_gradient(second, support, query)])
    g1 = torch.cat([g.reshape(-1) for g in library_meta_gradient(first, support, query)])
    assert (g2 - g1).norm() > 1e-3 * g2.norm()


@pytest.mark.parametrize("first_order, inner_steps", [(False, 1), (True, 1), (False, 2)])
def test_fisher_vector_product_equals_the_hessian_of_the_kl_through_the_inner_steps(first_order, inner_steps):
    """The Gauss-Newton product ``J^T H' J v`` against the Hessian of the mean KL with respect to the shared
    parameters, differentiated twice through the inner steps (third derivatives of the inner loss included)."""
    model = small_model(first_order=first_order, inner_steps=inner_steps)
    support, query = model.collect(tasks(3))
    params = dict(model.backbone.named_parameters())
    tensors = list(params.values())
    old = model.old_distribution(support, query)
    adapted = model.adapted_parameters(params, support, query[0].num_tasks, differentiable=True)
    product = model.fisher_vector_product(params, adapted, query, old)
    _, kl = model.objective(params, support, query, old, differentiable=True)
    kl_gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, tensors, create_graph=True)])
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(kl_gradient.numel(), generator=generator, dtype=torch.float64)
        expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(kl_gradient.dot(v), tensors, retain_graph=True)])
        actual = product(v)
        assert expected.norm() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_conjugate_gradient_solves_a_positive_definite_system():
    torch.manual_seed(0)
    m = torch.randn(6, 6, dtype=torch.float64)
    a = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, iterations=20), torch.linalg.solve(a, b))


@pytest.mark.parametrize("first_order", [False, True])
def test_trpo_step_keeps_the_kl_bound_and_improves_the_surrogate(first_order):
    model = small_model(first_order=first_order, max_kl=0.01)
    batch = tasks(3)
    before = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
    step, support, query = model.meta_step(batch)
    assert step.accepted
    after = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
    assert any(not torch.equal(before[k], after[k]) for k in before)

    def adapted_distributions(params):
        """Per task, the adapted policy's Normal at every valid post-update step (an independent inner step)."""
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        (pre, pre_adv), = support
        post, post_adv = query
        out = []
        for t in range(pre.num_tasks):
            valid = pre.mask[t].bool()
            mean, log_std = functional_call(model.backbone, leaves, (pre.observations[t][valid],))
            inner = -(Normal(mean, log_std.exp()).log_prob(pre.actions[t][valid]).sum(-1) * pre_adv[t][valid]).mean()
            grads = torch.autograd.grad(inner, list(leaves.values()))
            fast = {k: (leaves[k] - model.inner_lr * g).detach() for k, g in zip(leaves, grads)}
            qvalid = post.mask[t].bool()
            mean, log_std = functional_call(model.backbone, fast, (post.observations[t][qvalid],))
            out.append((Normal(mean, log_std.exp()), post.actions[t][qvalid], post_adv[t][qvalid]))
        return out

    old, new = adapted_distributions(before), adapted_distributions(after)
    kl = torch.stack([kl_divergence(o, n).sum(-1).mean() for (o, _, _), (n, _, _) in zip(old, new)]).mean()
    surrogate_old = -torch.stack([adv.mean() for _, _, adv in old]).mean()
    surrogate_new = -torch.stack(
        [(torch.exp(n.log_prob(a).sum(-1) - o.log_prob(a).sum(-1)) * adv).mean() for (o, a, adv), (n, _, _) in zip(old, new)]
    ).mean()
    assert float(kl) <= model.max_kl + 1e-12
    assert float(kl) > 0
    assert float(kl) == pytest.approx(step.kl, rel=1e-8)
    assert float(surrogate_new) < float(surrogate_old)
    assert float(surrogate_new) == pytest.approx(step.loss_after, rel=1e-8)


def test_task_stream_resumes_exactly():
    def fresh():
        return RolloutDataModule(meta_batch_size=3, train_batches=4, seed=5)

    data = fresh()
    stream = iter(data.train_dataloader())
    early = [next(stream) for _ in range(2)]
    state = data.state_dict()
    rest = list(stream)
    restored = fresh()
    restored.load_state_dict(state)
    resumed = list(restored.train_dataloader())
    assert len(resumed) == len(rest) == 2
    for a, b in zip(rest, resumed):
        assert torch.equal(a.goals, b.goals) and torch.equal(a.seeds, b.seeds)
    # the next epoch draws new tasks
    epoch_1 = next(iter(restored._train_loader))
    assert not torch.equal(epoch_1.goals, early[0].goals)
    first = [next(iter(fresh().test_dataloader())) for _ in range(2)]
    assert torch.equal(first[0].goals, first[1].goals)
    assert (first[0].goals.abs() <= 0.5).all()


def test_rollouts_are_reproducible_from_the_task_seeds():
    model = small_model()
    batch = tasks(2)
    params = model.per_task({k: v.detach() for k, v in model.backbone.named_parameters()}, 2)
    a, _ = model.rollout(params, batch, 3, TRAIN_PHASE, 0)
    b, _ = model.rollout(params, batch, 3, TRAIN_PHASE, 0)
    c, _ = model.rollout(params, batch, 3, TRAIN_PHASE, 1)
    assert torch.equal(a.actions, b.actions)
    assert not torch.equal(a.actions, c.actions)
    # A task's trajectories do not depend on the other tasks of its meta-batch.
    single = NavigationTasks(batch.goals[1:], batch.seeds[1:])
    d, _ = model.rollout({k: v[1:] for k, v in params.items()}, single, 3, TRAIN_PHASE, 0)
    torch.testing.assert_close(d.actions[0], a.actions[1])


def test_advantages_with_full_gae_are_returns_minus_the_baseline():
    model = small_model()
    params = model.per_task({k: v.detach() for k, v in model.backbone.named_parameters()}, 2)
    batch, _ = model.rollout(params, tasks(2), 3, TRAIN_PHASE, 0)
    from lit_meta.rl import discounted_returns, fit_linear_baseline

    returns = discounted_returns(batch, 0.99)
    expected = (returns - fit_linear_baseline(batch, returns)) * batch.mask
    torch.testing.assert_close(advantages(batch, 0.99, 1.0, normalize=False), expected)
    # the reward-to-go by a direct sum
    r = batch.rewards[1, 2]
    torch.testing.assert_close(returns[1, 2, 0], sum(0.99**k * r[k] for k in range(len(r))))


def test_bad_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="inner_steps"):
        MAMLRL(inner_steps=-1)
    with pytest.raises(ConfigError, match="max_kl"):
        MAMLRL(max_kl=0.0)
    with pytest.raises(ConfigError, match="eval_inner_lrs"):
        MAMLRL(eval_inner_steps=3, eval_inner_lrs=[0.1, 0.05])
    with pytest.raises(ConfigError, match="goal_range"):
        RolloutDataModule(goal_range=(0.5, -0.5))
    with pytest.raises(ConfigError, match="monitor"):
        RolloutDataModule(monitor="acc")
    assert RolloutDataModule(monitor="return_0").validation_metric == ("val/return_0", "max")
    with pytest.raises(ConfigError, match="trajectories it collects"):
        MAMLRL().adapt(torch.zeros(1, 2), torch.zeros(1))


def test_short_training_improves_the_adapted_return():
    torch.manual_seed(0)
    model = MAMLRL(backbone=GaussianMLPPolicy(hidden=(32, 32)), trajectories=10, eval_trajectories=20, eval_inner_steps=1)
    data = RolloutDataModule(meta_batch_size=10, train_batches=8, val_episodes=20, eval_meta_batch_size=20, seed=0)
    evaluation = next(iter(data.val_dataloader()))
    initial = model.task_metrics(evaluation)
    trainer = pl.Trainer(
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
        accelerator="cpu",
    )
    trainer.fit(model, data)
    assert trainer.global_step == 8
    trained = model.task_metrics(evaluation)
    assert float(trained["return_1"].mean()) > float(trained["return_0"].mean()) + 1.0
    assert float(trained["return_1"].mean()) > float(initial["return_1"].mean()) + 5.0


def test_command_line_fits_resumes_and_tests(tmp_path, monkeypatch):
    from lit_meta.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "navigation2d_maml_trpo.yaml")
    small = [
        "--model.init_args.backbone.init_args.hidden=[8, 8]",
        "--model.init_args.trajectories=2",
        "--model.init_args.eval_trajectories=2",
        "--model.init_args.horizon=10",
        "--data.init_args.meta_batch_size=2",
        "--data.init_args.train_batches=2",
        "--data.init_args.val_episodes=2",
        "--data.init_args.test_episodes=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--media=false",
    ]
    main(["fit", "--config", config, "--trainer.max_epochs=1", "--test_after_fit=false", *small])
    checkpoints = {p.name: p for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    last = checkpoints["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 2
    main(["fit", "--config", config, "--ckpt_path", str(last), "--trainer.max_epochs=2", "--test_after_fit=false", *small])
    assert torch.load(last, weights_only=True)["global_step"] == 4
    main(["test", "--config", config, "--ckpt_path", str(last), *small])


def test_evaluation_step_sizes():
    batch = tasks(2)
    default = small_model(eval_inner_steps=2).task_metrics(batch)
    explicit = small_model(eval_inner_steps=2, eval_inner_lrs=[0.1, 0.1]).task_metrics(batch)
    smaller = small_model(eval_inner_steps=2, eval_inner_lrs=[0.1, 0.05]).task_metrics(batch)
    assert set(default) == {"return_0", "return_1", "return_2"}
    for key in default:
        torch.testing.assert_close(default[key], explicit[key], rtol=0, atol=0)
    torch.testing.assert_close(default["return_1"], smaller["return_1"], rtol=0, atol=0)
    assert not torch.equal(default["return_2"], smaller["return_2"])


def test_episode_values_gives_the_per_task_returns():
    from lit_meta.evaluation import episode_values

    model = small_model(eval_inner_steps=1, eval_trajectories=2)
    data = RolloutDataModule(test_episodes=3, eval_meta_batch_size=2)
    values = episode_values(model.float(), data, "test")
    expected = torch.cat([model.task_metrics(batch)["return_1"] for batch in data.test_dataloader()])
    assert values["return_1"].shape == (3,)
    torch.testing.assert_close(values["return_1"], expected)
