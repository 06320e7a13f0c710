"""RL task families: a task is an environment variant (a goal position, a direction, a speed).

Every family offers the same parts in the same order: ``sample_tasks`` draws task parameters
``[n, task_dim]``; ``reset(tasks, generator)`` starts one episode per row of ``tasks``;
``step(action)`` advances all of them at once and returns ``(obs, reward, done)`` as tensors.

References:
    Finn, Abbeel & Levine (2017), §5.3 and Appendix A.2: 2D navigation (goals in the unit square,
    actions clipped to ±0.1, horizon 100) and MuJoCo locomotion (HalfCheetah/Ant; goal direction
    or goal velocity, horizon 200).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from maml_runner.errors import choose, positive_int, require

NAV_REWARDS = ("distance", "squared_distance")
# clip: the env moves by clip(a, ±action_bound); rescale: the policy acts in [−1, 1] and the env
# moves by action_bound·clip(a, ±1) (rllab's normalize(), which the reference code wraps it in)
ACTION_MAPS = ("clip", "rescale")
# disc: ‖x − g‖ < goal_radius; square: |x − g|∞ < goal_radius (the reference code's test)
GOAL_SHAPES = ("disc", "square")
GOALS = ("direction", "velocity")
# sampled: eval.num_tasks test tasks drawn from eval.seed | reference: nav2d's 40 test goals of
# the reference code (test_maml_point.py), which Table 4 was measured on
TEST_GOALS = ("sampled", "reference")
REFERENCE_GOALS = 40
REFERENCE_GOAL_RANGE = (-0.5, 0.5)
FORWARD = "reward_forward"  # gymnasium's forward term, which the task reward replaces
FORWARD_WEIGHT = "forward_reward_weight"  # its weight: the task reward makes it ignored
# How a MuJoCo robot is read. gymnasium: its own observation, root x velocity and reset noise.
# rllab: the readings of the reference code's rllab half-cheetah, on the same model
# (half_cheetah_env_rand_direc.py, rllab's mujoco_env.py and mjcore.py): the task's velocity is
# the whole robot's centre-of-mass x velocity (get_body_comvel("torso"), from the bodies' momenta),
# the observation the joint positions without the root's x, the velocities and the centre of
# mass (20 numbers), reset noise qpos + N(0, 0.01²), qvel + N(0, 0.1²).
ROBOTS = ("gymnasium", "rllab")
# rllab's readings are the half-cheetah's only (its ant observed contact forces and the torso's
# orientation as well); they replace these gymnasium keywords, which would then be ignored
RLLAB_ROBOTS = ("HalfCheetah",)
RLLAB_REPLACES = ("exclude_current_positions_from_observation", "reset_noise_scale")
TORSO = 1  # body 0 is the world; the torso is the root of the robot's tree


class VectorEnv(Protocol):
    obs_dim: int
    act_dim: int
    task_dim: int
    draws_trajectories: bool  # a run plots its test trajectories (2D positions) or not

    def sample_tasks(self, num: int, generator: torch.Generator) -> Tensor: ...

    def reset(self, tasks: Tensor, generator: torch.Generator) -> Tensor: ...

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    def close(self) -> None: ...


def reference_goals() -> Tensor:
    """The 2D navigation test goals of the reference code, ``[40, 2]``.

    cbfinn/maml_rl's ``test_maml_point.py`` seeds numpy with 1 and draws 40 goals uniform in
    [−0.5, 0.5]²; the same legacy generator (``RandomState(1)``) gives the same goals here.
    """
    low, high = REFERENCE_GOAL_RANGE
    goals = np.random.RandomState(1).uniform(low, high, size=(REFERENCE_GOALS, 2))
    return torch.from_numpy(goals).float()


def _check_goal_range(goal_low: float, goal_high: float) -> None:
    require(goal_high >= goal_low, "goal_high", goal_high, f"must be >= goal_low ({goal_low})")


class Nav2D:
    """Point robot on the plane, starting at the origin; the task is an unseen goal position.

    Vectorised in torch: one tensor op moves every episode of a meta-batch. The observation is
    the position; an action moves it by ``clip(a, ±action_bound)`` (``action_map=clip``) or by
    ``action_bound·clip(a, ±1)`` (``rescale``: the policy acts in [−1, 1], as rllab's
    ``normalize`` wrapper of the reference code); the reward is minus the distance to the goal
    (``reward=distance``, the reference code) or minus its square (the paper's text); an episode
    ends within ``goal_radius`` of the goal: in the disc of that radius (``goal_shape=disc``) or
    the square of that half-width (``square``: both coordinates, the reference code's test).

    References:
        cbfinn/maml_rl, ``maml_examples/point_env_randgoal.py`` (the environment) and rllab's
        ``envs/normalized_env.py`` (the action rescaling).

    Raises:
        InvalidArgument: ``goal_high < goal_low``, ``action_bound`` or ``goal_radius`` not > 0,
            a ``reward`` not in ``NAV_REWARDS``, an ``action_map`` not in ``ACTION_MAPS`` or a
            ``goal_shape`` not in ``GOAL_SHAPES``.
    """

    obs_dim, act_dim, task_dim = 2, 2, 2
    draws_trajectories = True  # the observation is the position: paths on the plane

    def __init__(
        self,
        *,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        action_bound: float = 0.1,
        goal_radius: float = 0.01,
        reward: str = "distance",
        action_map: str = "clip",
        goal_shape: str = "disc",
    ) -> None:
        _check_goal_range(goal_low, goal_high)
        require(action_bound > 0, "action_bound", action_bound, "the action clip must be > 0")
        require(goal_radius > 0, "goal_radius", goal_radius, "the goal's radius must be > 0")
        choose("reward", reward, NAV_REWARDS)
        choose("action_map", action_map, ACTION_MAPS)
        choose("goal_shape", goal_shape, GOAL_SHAPES)
        self.goal_low, self.goal_high = goal_low, goal_high
        self.action_bound, self.goal_radius, self.reward = action_bound, goal_radius, reward
        self.action_map, self.goal_shape = action_map, goal_shape
        self._pos = self._goal = torch.empty(0, 2)

    def sample_tasks(self, num: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num, 2, generator=generator, device=generator.device)
        return self.goal_low + (self.goal_high - self.goal_low) * u

    def reset(self, tasks: Tensor, generator: torch.Generator) -> Tensor:
        self._goal = tasks
        self._pos = torch.zeros_like(tasks)
        return self._pos.clone()

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.action_map == "clip":
            move = action.clamp(-self.action_bound, self.action_bound)
        else:
            move = self.action_bound * action.clamp(-1.0, 1.0)
        self._pos = self._pos + move
        offset = self._pos - self._goal
        distance = offset.norm(dim=-1)
        reward = -distance if self.reward == "distance" else -distance.square()
        if self.goal_shape == "disc":
            done = distance < self.goal_radius
        else:
            done = offset.abs().amax(dim=-1) < self.goal_radius
        return self._pos.clone(), reward, done

    def close(self) -> None:
        pass


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr: MuJoCo prints a deprecation warning for every model it compiles."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_robot(robot: str, env_id: str, env_kwargs: dict) -> None:
    """Refuse a ``robot`` reading this ``env_id`` lacks, or gymnasium keywords it would ignore."""
    choose("robot", robot, ROBOTS)
    require(
        FORWARD_WEIGHT not in env_kwargs,
        f"env_kwargs.{FORWARD_WEIGHT}",
        env_kwargs.get(FORWARD_WEIGHT),
        "the task's reward (d·v_x or −|v_x − g|) replaces gymnasium's forward term; drop the key",
    )
    if robot == "rllab":
        require(
            env_id.split("-")[0] in RLLAB_ROBOTS,
            "robot",
            robot,
            f"rllab's readings are {', '.join(RLLAB_ROBOTS)}'s only, not {env_id}'s",
        )
        for key in RLLAB_REPLACES:
            require(
                key not in env_kwargs,
                f"env_kwargs.{key}",
                env_kwargs.get(key),
                "robot=rllab reads its own observation and reset noise; drop the key",
            )


def _make_envs(env_id: str, kwargs: dict, num: int) -> list:
    try:
        import gymnasium as gym
    except ImportError:
        raise ImportError("MuJoCo tasks need gymnasium: pip install 'maml-runner[rl]'") from None
    # .unwrapped: our own horizon replaces gymnasium's TimeLimit(1000); the checker and order
    # wrappers cost ~30% of a HalfCheetah step.
    with _quiet_stderr():
        return [gym.make(env_id, **kwargs).unwrapped for _ in range(num)]


def _serve(conn, env_id: str, kwargs: dict, robot: str) -> None:
    """Worker process: own a slice of the episodes' environments, step them on request."""
    envs: list = []
    while True:
        command, data = conn.recv()
        if command == "reset":
            if len(data) > len(envs):
                envs += _make_envs(env_id, kwargs, len(data) - len(envs))
            conn.send(_reset(envs, data, robot))
        elif command == "step":
            conn.send(_step(envs, data, robot))
        else:
            conn.close()
            return


def _reset(envs: list, seeds: list[int], robot: str) -> np.ndarray:
    obs = []
    for env, seed in zip(envs, seeds):
        o, _ = env.reset(seed=seed)
        if robot == "rllab":
            noise = env.np_random.standard_normal  # seeded by reset
            env.set_state(
                env.init_qpos + 0.01 * noise(env.model.nq),
                env.init_qvel + 0.1 * noise(env.model.nv),
            )
            o = _rllab_readings(env)[0]
        obs.append(o)
    return np.stack(obs)


def _rllab_readings(env) -> tuple[np.ndarray, float]:
    """rllab's observation and the centre-of-mass x velocity of the robot's current state."""
    import mujoco

    model, data = env.model, env.data
    # mj_step leaves the centres of mass at the state before it; rllab's forward_dynamics ended
    # with a whole forward pass; its position and velocity stages give the same readings
    # (bit-identical), without the constraint solve
    mujoco.mj_kinematics(model, data)
    mujoco.mj_comPos(model, data)
    mujoco.mj_comVel(model, data)
    mujoco.mj_subtreeVel(model, data)
    obs = np.concatenate([data.qpos[1:], data.qvel, data.subtree_com[TORSO]])
    return obs, float(data.subtree_linvel[TORSO, 0])


def _step(envs: list, actions: np.ndarray, robot: str) -> tuple[np.ndarray, ...]:
    """Step ``len(actions)`` envs; return obs, x velocity, the non-forward rewards, terminated."""
    obs, velocity, rest, terminated = [], [], [], []
    for env, action in zip(envs, actions):
        o, _, term, _, info = env.step(action)
        speed = info["x_velocity"]
        if robot == "rllab":
            o, speed = _rllab_readings(env)
        obs.append(o)
        velocity.append(speed)
        rest.append(sum(v for k, v in info.items() if k.startswith("reward_") and k != FORWARD))
        terminated.append(term)
    return np.stack(obs), np.array(velocity), np.array(rest), np.array(terminated)


class Locomotion:
    """A gymnasium MuJoCo robot (``HalfCheetah-v5``, ``Ant-v5``) asked to run a task's way.

    ``goal=direction``: a task is ±1 (forward or backward), reward ``d·v_x``;
    ``goal=velocity``: a task is a target speed ``g ~ U[goal_low, goal_high]``, reward
    ``−|v_x − g|``.
    To either the environment's own other terms are added (control cost; for the ant, contact
    cost and survival bonus), with weights from ``env_kwargs``. Actions are clipped to the action
    space. Episodes are split over ``workers`` processes (1: in this process). ``robot``: how
    the robot is read, gymnasium's way or the reference code's rllab half-cheetah's (``ROBOTS``).

    Raises:
        InvalidArgument: a ``goal`` not in ``GOALS``, ``goal_high < goal_low``, ``workers``
            not an integer >= 1, or a ``robot`` reading ``check_robot`` refuses (checked before
            any environment is made).
        ImportError: gymnasium is not installed.
    """

    task_dim = 1
    draws_trajectories = False

    def __init__(
        self,
        env_id: str,
        *,
        goal: str,
        goal_low: float = 0.0,
        goal_high: float = 2.0,
        env_kwargs: dict | None = None,
        workers: int = 1,
        robot: str = "gymnasium",
    ) -> None:
        choose("goal", goal, GOALS)
        _check_goal_range(goal_low, goal_high)
        positive_int("workers", workers)
        self.env_id, self.goal, self.goal_low, self.goal_high = env_id, goal, goal_low, goal_high
        self.kwargs = dict(env_kwargs or {})
        check_robot(robot, env_id, self.kwargs)
        self.robot = robot
        probe = _make_envs(env_id, self.kwargs, 1)[0]
        shape = (
            _rllab_readings(probe)[0].shape if robot == "rllab" else probe.observation_space.shape
        )
        self.obs_dim = int(shape[0])
        self.act_dim = int(probe.action_space.shape[0])
        self.low = torch.as_tensor(probe.action_space.low, dtype=torch.float32)
        self.high = torch.as_tensor(probe.action_space.high, dtype=torch.float32)
        probe.close()
        self.workers = workers
        self._local: list = []
        self._pipes: list = []
        self._procs: list = []
        self._sizes: list[int] = []
        self._tasks = torch.empty(0, 1)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        for _ in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(child, self.env_id, self.kwargs, self.robot), daemon=True
            )
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    def sample_tasks(self, num: int, generator: torch.Generator) -> Tensor:
        if self.goal == "direction":
            u = torch.randint(0, 2, (num, 1), generator=generator, device=generator.device)
            return 2.0 * u.float() - 1.0
        u = torch.rand(num, 1, generator=generator, device=generator.device)
        return self.goal_low + (self.goal_high - self.goal_low) * u

    def reset(self, tasks: Tensor, generator: torch.Generator) -> Tensor:
        self._tasks = tasks.float().cpu()
        seeds = torch.randint(0, 2**31 - 1, (len(tasks),), generator=generator).tolist()
        if self.workers == 1:
            if len(seeds) > len(self._local):
                self._local += _make_envs(self.env_id, self.kwargs, len(seeds) - len(self._local))
            return torch.as_tensor(_reset(self._local, seeds, self.robot), dtype=torch.float32)
        if not self._procs:
            self._start()
        parts = np.array_split(np.arange(len(seeds)), self.workers)
        self._sizes = [len(p) for p in parts]
        for pipe, part in zip(self._pipes, parts):
            pipe.send(("reset", [seeds[i] for i in part]))
        obs = np.concatenate([pipe.recv() for pipe in self._pipes])
        return torch.as_tensor(obs, dtype=torch.float32)

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        action = action.detach().cpu().clamp(self.low, self.high).numpy()
        if self.workers == 1:
            results = [_step(self._local, action, self.robot)]
        else:
            lo = 0
            for pipe, size in zip(self._pipes, self._sizes):
                pipe.send(("step", action[lo : lo + size]))
                lo += size
            results = [pipe.recv() for pipe in self._pipes]
        obs, velocity, rest, terminated = (np.concatenate(r) for r in zip(*results))
        velocity = torch.as_tensor(velocity, dtype=torch.float32)
        goal = self._tasks[:, 0]
        task_reward = goal * velocity if self.goal == "direction" else -(velocity - goal).abs()
        reward = task_reward + torch.as_tensor(rest, dtype=torch.float32)
        return (
            torch.as_tensor(obs, dtype=torch.float32),
            reward,
            torch.as_tensor(terminated),
        )

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
        self._pipes, self._procs = [], []
        for env in self._local:
            env.close()
        self._local = []
