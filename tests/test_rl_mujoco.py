"""Meta-RL on Finn et al.'s HalfCheetah tasks: the reward wrappers against the formulas recomputed from the simulator
state and the action, the vectorized sampler against a plain loop over single environments (and over worker
processes), exact resume of the task stream, and MAML-TRPO through the trainer and the command line."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules.errors import ConfigError
from lit_meta.rl import MAMLRL, GaussianMLPPolicy, NavigationTasks, RolloutDataModule
from lit_meta.rl.locomotion import HalfCheetahTasks, require_gymnasium

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from lit_meta.rl.halfcheetah_env import make_halfcheetah  # noqa: E402
from lit_meta.rl.vector_env import RESET_SEED_BOUND, VectorHalfCheetah, sample_env_trajectories  # noqa: E402


@pytest.mark.parametrize("kind, goal", [("halfcheetah_vel", 1.3), ("halfcheetah_dir", -1.0), ("halfcheetah_dir", 1.0)])
def test_wrappers_give_the_documented_rewards(kind, goal):
    env = make_halfcheetah(kind, goal)
    observation, _ = env.reset(seed=3)
    data, dt = env.unwrapped.data, env.unwrapped.dt
    assert dt == pytest.approx(0.05)
    np.testing.assert_allclose(observation, np.concatenate([data.qpos[1:], data.qvel]))
    rng = np.random.default_rng(0)
    for step in range(25):
        # Some actions leave the box [-1, 1]^6: the reward's control cost uses the clipped action.
        action = rng.normal(scale=1.5, size=6)
        x_before = float(data.qpos[0])
        observation, reward, terminated, truncated, _ = env.step(action)
        velocity = (float(data.qpos[0]) - x_before) / 0.05
        control = 0.05 * float(np.sum(np.clip(action, -1.0, 1.0) ** 2))
        expected = -abs(velocity - goal) - control if kind == "halfcheetah_vel" else goal * velocity - control
        assert reward == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert not terminated and not truncated
        np.testing.assert_allclose(observation, np.concatenate([data.qpos[1:], data.qvel]))


def test_the_simulator_receives_the_clipped_action():
    env = make_halfcheetah("halfcheetah_vel")
    env.reset(seed=0)
    env.step(np.full(6, 5.0))
    np.testing.assert_array_equal(env.unwrapped.data.ctrl, np.ones(6))


def test_goal_distributions():
    velocities = HalfCheetahTasks("halfcheetah_vel").sample_goals(torch.Generator().manual_seed(0), 2000)
    assert velocities.shape == (2000, 1)
    assert 0.0 <= float(velocities.min()) and float(velocities.max()) <= 2.0
    assert float(velocities.mean()) == pytest.approx(1.0, abs=0.05)
    directions = HalfCheetahTasks("halfcheetah_dir").sample_goals(torch.Generator().manual_seed(0), 2000)
    assert set(directions.flatten().tolist()) == {-1.0, 1.0}
    assert float(directions.mean()) == pytest.approx(0.0, abs=0.08)


def small_policy(seed=0):
    torch.manual_seed(seed)
    return GaussianMLPPolicy(in_features=17, hidden=(16,), out_features=6, init_std=0.5)


def loop_reference(policy, kind, goals, trajectories, horizon, seeds):
    """Each trajectory in its own fresh environment, one step at a time, noise and reset seeds drawn as documented."""
    rewards, actions = [], []
    for goal, seed in zip(goals[:, 0].tolist(), seeds):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((trajectories, horizon, 6), generator=generator)
        reset_seeds = torch.randint(0, RESET_SEED_BOUND, (trajectories,), generator=generator)
        for n in range(trajectories):
            env = make_halfcheetah(kind, goal)
            observation, _ = env.reset(seed=int(reset_seeds[n]))
            for t in range(horizon):
                with torch.no_grad():
                    mean, log_std = policy(torch.as_tensor(observation, dtype=torch.float32))
                    action = mean + log_std.exp() * noise[n, t]
                observation, reward, _, _, _ = env.step(action.double().numpy())
                rewards.append(reward)
                actions.append(action)
    shape = (len(seeds), trajectories, horizon)
    return torch.tensor(rewards, dtype=torch.float32).reshape(shape), torch.stack(actions).reshape(*shape, 6)


def sample(policy, envs, kind, goals, trajectories, horizon, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return sample_env_trajectories(policy, dict(policy.named_parameters()), envs, HalfCheetahTasks(kind, horizon), goals, trajectories, generators, batched=False)


@pytest.mark.parametrize("kind", ["halfcheetah_vel", "halfcheetah_dir"])
def test_vectorized_sampler_equals_a_loop_over_single_environments(kind):
    policy = small_policy()
    goals = torch.tensor([[0.4], [1.7]]) if kind == "halfcheetah_vel" else torch.tensor([[1.0], [-1.0]])
    seeds = [11, 12]
    batch = sample(policy, VectorHalfCheetah(kind), kind, goals, 3, 12, seeds)
    rewards, actions = loop_reference(policy, kind, goals, 3, 12, seeds)
    assert batch.rewards.shape == (2, 3, 12) and batch.observations.shape == (2, 3, 12, 17)
    torch.testing.assert_close(batch.actions, actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.rewards, rewards, atol=1e-4, rtol=1e-5)
    assert batch.mask.all()


def test_oracle_policy_observes_the_goal():
    """The oracle's observations are the environment's plus the task's goal, and its actions come from them."""
    kind, goals, seeds = "halfcheetah_vel", torch.tensor([[0.4], [1.7]]), [1, 2]
    plain_policy = small_policy()
    oracle_policy = GaussianMLPPolicy(in_features=18, hidden=(16,), out_features=6, init_std=0.5)
    with torch.no_grad():
        for target, source in zip(oracle_policy.parameters(), plain_policy.parameters()):
            target.copy_(source) if target.shape == source.shape else target.copy_(torch.cat([source, torch.zeros(16, 1)], dim=1))

    def oracle_sample(policy):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        params = dict(policy.named_parameters())
        return sample_env_trajectories(policy, params, VectorHalfCheetah(kind), HalfCheetahTasks(kind, 6), goals, 2, generators, batched=False, oracle=True)

    plain = sample(plain_policy, VectorHalfCheetah(kind), kind, goals, 2, 6, seeds)
    blind = oracle_sample(oracle_policy)  # a zero weight on the goal: the plain policy's trajectories
    assert blind.observations.shape == (2, 2, 6, 18)
    torch.testing.assert_close(blind.observations[..., 17], goals[:, :, None].expand(2, 2, 6))
    torch.testing.assert_close(blind.observations[..., :17], plain.observations, rtol=0, atol=0)
    torch.testing.assert_close(blind.rewards, plain.rewards, rtol=0, atol=0)
    with torch.no_grad():
        oracle_policy.features[0].weight[:, 17] = 1.0
    seeing = oracle_sample(oracle_policy)
    assert not torch.allclose(seeing.actions, blind.actions)
    with torch.no_grad():
        mean, log_std = oracle_policy(seeing.observations)
    for t, seed in enumerate(seeds):
        noise = torch.randn((2, 6, 6), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close((seeing.actions[t] - mean[t]) / log_std[t].exp(), noise, atol=1e-5, rtol=1e-5)


def test_oracle_model_trains_and_evaluates_on_the_cheetah():
    torch.manual_seed(0)
    model = small_model(environment="halfcheetah_dir", oracle=True, inner_steps=0, backbone=None)
    assert model.backbone.features[0].in_features == 18
    batch = next(iter(RolloutDataModule(environment="halfcheetah_dir", meta_batch_size=2, train_batches=1).train_dataloader()))
    before = [p.detach().clone() for p in model.parameters()]
    step, _, query = model.meta_step(batch)
    assert query[0].observations.shape[-1] == 18 and step.accepted and step.kl <= model.max_kl
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    values = model.task_metrics(batch)
    assert set(values) == {"return_0", "return_1", "return_2", "return_3"}


def test_worker_processes_give_the_same_trajectories_and_tasks_are_independent():
    policy = small_policy(1)
    goals = torch.tensor([[0.2], [1.0], [1.9]])
    local = sample(policy, VectorHalfCheetah("halfcheetah_vel", num_workers=1), "halfcheetah_vel", goals, 2, 8, [1, 2, 3])
    envs = VectorHalfCheetah("halfcheetah_vel", num_workers=2)
    try:
        parallel = sample(policy, envs, "halfcheetah_vel", goals, 2, 8, [1, 2, 3])
        # a smaller batch on the same workers: environments are reused and tasks do not depend on their neighbours
        alone = sample(policy, envs, "halfcheetah_vel", goals[1:2], 2, 8, [2])
    finally:
        envs.close()
    torch.testing.assert_close(parallel.rewards, local.rewards, rtol=0, atol=0)
    torch.testing.assert_close(parallel.observations, local.observations, rtol=0, atol=0)
    # (the policy's batched matrix products may round differently for another batch size)
    torch.testing.assert_close(alone.rewards[0], local.rewards[1], rtol=1e-5, atol=1e-5)


def test_task_stream_resumes_exactly():
    def fresh():
        return RolloutDataModule(environment="halfcheetah_dir", meta_batch_size=3, train_batches=4, seed=5)

    data = fresh()
    stream = iter(data.train_dataloader())
    [next(stream) for _ in range(2)]
    state = data.state_dict()
    rest = list(stream)
    restored = fresh()
    restored.load_state_dict(state)
    resumed = list(restored.train_dataloader())
    assert len(resumed) == len(rest) == 2
    for a, b in zip(rest, resumed):
        assert torch.equal(a.goals, b.goals) and torch.equal(a.seeds, b.seeds)
    assert rest[0].goals.shape == (3, 1) and set(rest[0].goals.flatten().tolist()) <= {-1.0, 1.0}
    # a different seed draws different tasks
    other = RolloutDataModule(environment="halfcheetah_dir", meta_batch_size=3, train_batches=4, seed=6)
    assert not torch.equal(next(iter(other.train_dataloader())).seeds, next(iter(fresh().train_dataloader())).seeds)


def small_model(**kwargs):
    defaults = dict(
        backbone=GaussianMLPPolicy(in_features=17, hidden=(16,), out_features=6),
        environment="halfcheetah_vel",
        horizon=10,
        trajectories=2,
        eval_trajectories=2,
    )
    return MAMLRL(**{**defaults, **kwargs})


def test_rollouts_resume_exactly_from_the_task_seeds():
    model = small_model()
    tasks = NavigationTasks(torch.tensor([[0.5], [1.5]]), torch.tensor([7, 8]))
    params = model.per_task({k: v.detach() for k, v in model.backbone.named_parameters()}, 2)
    first, _ = model.rollout(params, tasks, 2, 1, 0)
    again = small_model()
    again.load_state_dict(model.state_dict())
    second, _ = again.rollout(params, tasks, 2, 1, 0)
    torch.testing.assert_close(first.rewards, second.rewards, rtol=0, atol=0)
    other, _ = model.rollout(params, tasks, 2, 1, 1)
    assert not torch.equal(first.actions, other.actions)


def test_two_iteration_fit_through_the_trainer_logs_every_return():
    torch.manual_seed(0)
    model = small_model()
    data = RolloutDataModule(environment="halfcheetah_vel", meta_batch_size=2, train_batches=2, val_episodes=2, test_episodes=2, eval_meta_batch_size=2)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        accelerator="cpu",
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    results = trainer.test(model, data, verbose=False)[0]
    for k in range(4):
        assert np.isfinite(results[f"test/return_{k}"])
    assert model._vector_env is None  # teardown stopped the environments


CHEETAH_CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("halfcheetah_*.yaml"))


@pytest.mark.parametrize("name", CHEETAH_CONFIGS)
def test_command_line_fits_the_cheetah_config(name, tmp_path, monkeypatch):
    """Every HalfCheetah config (MAML, pretrained, oracle) trains, checkpoints and resumes through the command line."""
    from lit_meta.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / name)
    small = [
        "--model.init_args.backbone.init_args.hidden=[8]",
        "--model.init_args.trajectories=2",
        "--model.init_args.eval_trajectories=2",
        "--model.init_args.horizon=5",
        "--data.init_args.meta_batch_size=2",
        "--data.init_args.train_batches=1",
        "--data.init_args.val_episodes=2",
        "--data.init_args.test_episodes=2",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--media=false",
    ]
    main(["fit", "--config", config, "--trainer.max_epochs=1", "--test_after_fit=false", *small])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 1
    main(["fit", "--config", config, "--ckpt_path", str(last), "--trainer.max_epochs=2", "--test_after_fit=false", *small])
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_mismatched_or_missing_pieces_are_one_line_config_errors(monkeypatch):
    model = small_model()
    data = RolloutDataModule(environment="navigation2d", meta_batch_size=2, train_batches=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="same environment"):
        trainer.fit(model, data)
    with pytest.raises(ConfigError, match="halfcheetah_dir with oracle observes 18: set the backbone's in_features to 18"):
        MAMLRL(environment="halfcheetah_dir", oracle=True, backbone=GaussianMLPPolicy(in_features=17, out_features=6))
    with pytest.raises(ConfigError, match="environment must be one of"):
        RolloutDataModule(environment="ant_dir")
    with pytest.raises(ConfigError, match="num_workers"):
        VectorHalfCheetah("halfcheetah_vel", num_workers=0)
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'lit-meta\[rl\]'") as error:
        require_gymnasium()
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"lit-meta\[rl\]"):
        small_model()
    MAMLRL()  # navigation does not need gymnasium
