"""Meta-reinforcement learning: MAML-TRPO on Finn et al.'s 2-D navigation and HalfCheetah tasks (see ``docs/rl.md``).

The HalfCheetah environments need gymnasium with MuJoCo (``pip install 'lit-meta[rl]'``); they are imported only
when used, so navigation works without it.
"""

from lit_meta.rl.baseline import advantages, discounted_returns, fit_linear_baseline
from lit_meta.rl.datamodule import NavigationTasks, RolloutDataModule
from lit_meta.rl.locomotion import HalfCheetahTasks
from lit_meta.rl.maml_rl import MAMLRL
from lit_meta.rl.navigation import Navigation2D
from lit_meta.rl.policy import GaussianMLPPolicy
from lit_meta.rl.rollouts import Trajectories, sample_trajectories
from lit_meta.rl.trpo import TRPOStep, conjugate_gradient, trpo_step

__all__ = [
    "GaussianMLPPolicy",
    "HalfCheetahTasks",
    "MAMLRL",
    "Navigation2D",
    "NavigationTasks",
    "RolloutDataModule",
    "TRPOStep",
    "Trajectories",
    "advantages",
    "conjugate_gradient",
    "discounted_returns",
    "fit_linear_baseline",
    "sample_trajectories",
    "trpo_step",
]
