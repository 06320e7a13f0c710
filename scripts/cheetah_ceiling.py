"""How fast can the Table 5 half-cheetah run in its 200 steps? Single-direction TRPO.

The ``finn17_cheetah_dir`` robot (gymnasium's HalfCheetah-v5 read as rllab's: frame skip 1,
centre-of-mass velocity, 20 observed numbers, control cost 0.05·‖a‖²) asked to run forward only,
trained without meta-learning by the presets' TRPO (``outer=trpo_reference``) on the presets'
policy, baseline and advantages. It prints the mean return per trajectory (Table 5's unit) as
it trains: a reference point for what one direction's policy reaches on this robot and engine
(MuJoCo 3+, where the reference code ran MuJoCo 1.31), beside MAML's return after one step.

    python scripts/cheetah_ceiling.py --iterations 400 --max-kl 0.01 --tasks 5

(``--tasks`` × 20 trajectories of 200 steps per iteration; about 4 s an iteration on one core.)
"""

from __future__ import annotations

import argparse
import time

import torch

from maml_runner.models.policy import GaussianPolicy
from maml_runner.rl.envs import Locomotion
from maml_runner.rl.meta import MetaRL
from maml_runner.rl.trpo import TRPO
from maml_runner.tasks.base import make_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--max-kl", type=float, default=0.01)
    parser.add_argument("--tasks", type=int, default=5, help="copies of the forward task")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    env = Locomotion(
        "HalfCheetah-v5",
        goal="direction",
        env_kwargs={"ctrl_cost_weight": 0.05, "frame_skip": 1},
        robot="rllab",
    )
    policy = GaussianPolicy(env.obs_dim, env.act_dim, hidden=(100, 100), init="xavier")
    learner = MetaRL(
        env,
        policy,
        inner_lr=0.1,
        inner_steps=0,  # no inner step: plain TRPO on the tasks' trajectories
        first_order=False,
        episodes_per_task=20,
        horizon=200,
        discount=0.99,
        normalize_advantages=True,
    )
    trpo = TRPO(list(policy.parameters()), max_kl=args.max_kl, fvp_eps=1.0)
    forward = torch.ones(args.tasks, 1)
    start = time.time()
    try:
        for it in range(args.iterations):
            generator = make_generator(1000 * args.seed + it, torch.device("cpu"))
            objective, returns = learner.meta_objective(forward, generator)
            stats = trpo.step(objective)
            if it % 10 == 0 or it == args.iterations - 1:
                print(
                    f"iteration {it}: return {returns[0].item():.1f} (before this step's update), "
                    f"kl {stats['kl']:.4f}, backtracks {stats['backtracks']}, "
                    f"mean log-std {policy.log_std.detach().mean().item():.2f}, "
                    f"{time.time() - start:.0f} s",
                    flush=True,
                )
    finally:
        env.close()


if __name__ == "__main__":
    main()
