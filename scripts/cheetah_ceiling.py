"""How fast can the Table 5 half-cheetah run in its 200 steps? Single-direction TRPO.

``experiment=finn17_cheetah_dir`` with ``algorithm=pretrain`` (no inner step), composed as a run
would be: the preset's robot and readings, policy, baseline, advantages, sampling and TRPO, its
tasks all asked to run forward. It prints the mean return per trajectory (Table 5's unit) as it
trains: a reference point for what one direction's policy reaches on this robot and engine
(MuJoCo 3+, where the reference code ran MuJoCo 1.31), beside MAML's return after one step.

    python scripts/cheetah_ceiling.py --iterations 400 --max-kl 0.01 --tasks 5

(``--tasks`` × ``task.k_shot`` (20) trajectories of 200 steps per iteration; about 4 s an
iteration on 2 cores.)
"""

from __future__ import annotations

import argparse
import random
import time

import hydra
import torch

from maml_runner.build import build
from maml_runner.cli import compose
from maml_runner.tasks.base import make_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--max-kl", type=float, default=0.01)
    parser.add_argument("--tasks", type=int, default=5, help="copies of the forward task")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = compose(
        [
            "experiment=finn17_cheetah_dir",
            "algorithm=pretrain",
            f"outer.max_kl={args.max_kl}",
            f"seed={args.seed}",
            "logger.mode=disabled",
        ]
    )
    torch.manual_seed(cfg.seed)  # as a run seeds its model
    random.seed(cfg.seed)
    with build(cfg) as job:
        torch.set_num_threads(job.num_threads)
        trpo = hydra.utils.instantiate(cfg.outer, params=list(job.model.parameters()))
        forward = torch.ones(args.tasks, 1)
        start = time.time()
        for it in range(args.iterations):
            generator = make_generator(1000 * cfg.seed + it, torch.device("cpu"))
            objective, returns = job.learner.meta_objective(forward, generator)
            stats = trpo.step(objective)
            if it % 10 == 0 or it == args.iterations - 1:
                log_std = job.model.log_std.detach().mean().item()
                print(
                    f"iteration {it}: return {returns[0].item():.1f} (before this step's update), "
                    f"kl {stats['kl']:.4f}, backtracks {stats['backtracks']}, "
                    f"mean log-std {log_std:.2f}, {time.time() - start:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
