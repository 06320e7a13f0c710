"""RL: environments and rewards, the policy-gradient estimate, the second-order meta-gradient
through the inner policy-gradient step, TRPO, and a short 2D-navigation run that improves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributions import Independent, Normal
from torch.distributions import kl_divergence as kl

from maml_runner.maml import per_task
from maml_runner.models import GaussianPolicy
from maml_runner.models.policy import kl_divergence, log_prob
from maml_runner.rl.envs import Locomotion, Nav2D
from maml_runner.rl.episodes import Episodes, discounted_returns, rollout, with_advantages
from maml_runner.rl.meta import (
    METRICS,
    OPTIMIZER_METRICS,
    MetaRL,
    RLTaskStream,
    outer_optimizer_step,
    pg_loss,
    trpo_step,
)
from maml_runner.rl.trpo import TRPO, conjugate_gradient
from maml_runner.tasks.base import make_generator
from tests.helpers import make_config, maml_run, read_metrics

CPU = torch.device("cpu")


def test_nav2d_clips_actions_rewards_distance_and_stops_at_the_goal() -> None:
    env = Nav2D()
    goals = torch.tensor([[0.3, 0.0], [0.05, 0.0], [0.0, -0.2]])
    assert torch.equal(env.reset(goals, make_generator(0, CPU)), torch.zeros(3, 2))
    obs, reward, done = env.step(torch.tensor([[1.0, 0.0], [0.045, 0.0], [0.0, -0.05]]))
    assert torch.allclose(obs, torch.tensor([[0.1, 0.0], [0.045, 0.0], [0.0, -0.05]]))
    assert torch.allclose(reward, -torch.tensor([0.2, 0.005, 0.15]))
    assert done.tolist() == [False, True, False]
    squared = Nav2D(reward="squared_distance")
    squared.reset(goals, make_generator(0, CPU))
    _, reward, _ = squared.step(torch.zeros(3, 2))
    assert torch.allclose(reward, -goals.norm(dim=1).square())
    tasks = env.sample_tasks(1000, make_generator(1, CPU))
    assert tasks.min() >= -0.5 and tasks.max() <= 0.5 and tasks.std() > 0.25


def test_nav2d_reference_action_map_and_square_goal() -> None:
    """action_map=rescale: the policy acts in [−1, 1] and the robot moves 0.1·clip(a, ±1) (rllab's
    normalize); goal_shape=square: done when both coordinates are within 0.01, so a point
    0.009 off in x and y (0.0127 away) ends the episode where the disc would not."""
    goals = torch.tensor([[0.059, 0.059], [0.5, 0.0]])
    moves = torch.tensor([[0.5, 0.5], [3.0, -0.2]])
    square = Nav2D(action_map="rescale", goal_shape="square")
    square.reset(goals, make_generator(0, CPU))
    obs, reward, done = square.step(moves)
    assert torch.allclose(obs, torch.tensor([[0.05, 0.05], [0.1, -0.02]]))
    assert torch.allclose(reward, -(obs - goals).norm(dim=1))
    assert done.tolist() == [True, False]
    disc = Nav2D(action_map="rescale")
    disc.reset(goals, make_generator(0, CPU))
    assert disc.step(moves)[2].tolist() == [False, False]
    clipped = Nav2D()  # the earlier mapping: clip the raw action to ±0.1
    clipped.reset(goals, make_generator(0, CPU))
    assert torch.allclose(clipped.step(moves)[0], torch.tensor([[0.1, 0.1], [0.1, -0.1]]))


def test_step_sampling_collects_whole_trajectories_until_the_budget() -> None:
    """sampling=steps (rllab's sampler): whole trajectories until K·H time steps per task. A goal
    reached on the first step gives 10 one-step trajectories for K=2, H=5; an unreachable one
    2 full ones. Returns average over the trajectories there are; the losses read the same live
    steps as the unpacked episodes."""
    torch.manual_seed(0)
    env = Nav2D(action_map="rescale", goal_shape="square", goal_radius=0.15)
    policy = GaussianPolicy(2, 2, hidden=(8,))
    tasks = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    params = per_task(dict(policy.named_parameters()), 2)
    kw = dict(episodes_per_task=2, horizon=5, generator=make_generator(1, CPU))
    eps = rollout(env, policy, params, tasks, sampling="steps", **kw)
    assert eps.valid.sum(1).tolist() == [10, 2] and eps.mask.sum((1, 2)).tolist() == [10, 10]
    expected = torch.stack([eps.returns[0, :10].mean(), eps.returns[1, :2].mean()])
    torch.testing.assert_close(eps.mean_return(), expected)
    fixed = rollout(env, policy, params, tasks, sampling="episodes", **kw)
    assert fixed.valid.sum(1).tolist() == [2, 2]
    with_advantages(eps, discount=0.99, normalize=True)
    mean, log_std = policy.distribution(params, eps.flat_obs())
    logp = log_prob(mean, log_std, eps.flat_actions()).view_as(eps.mask)
    unpacked = -(logp * eps.advantages * eps.mask).sum((1, 2)) / eps.mask.sum((1, 2))
    torch.testing.assert_close(pg_loss(policy, params, eps), unpacked)


def _wave(lengths: list[list[int]], horizon: int) -> Episodes:
    """A wave of trajectories of the given lengths, ``[T, M]``; each reward is its slot's label."""
    t, m = len(lengths), len(lengths[0])
    mask = torch.zeros(t, m, horizon)
    for i, row in enumerate(lengths):
        for j, length in enumerate(row):
            mask[i, j, :length] = 1
    label = torch.arange(1, t * m + 1, dtype=torch.float32).view(t, m, 1)
    return Episodes(mask.unsqueeze(-1), mask.unsqueeze(-1), mask * label, mask)


def test_rllab_sampling_keeps_what_the_vectorized_sampler_finished_first() -> None:
    """sampling=rllab: environments stepped together, each running trajectories one after the
    other; the sampler stops at the first time step where the finished ones hold the budget and
    drops those still running. A test task (2 environments, budget 2·10): environment 0 runs
    3, 4, 10 steps (ending at 3, 7, 17), environment 1 10, 10 (ending at 10, 20): at 17 the
    finished hold 3+4+10+10 = 27 >= 20, so the 10-step trajectory running to 20 is dropped
    (sampling=steps keeps the first trajectories in slot order: 3, 10, 4, 10 here too, but
    not 3, 4 before a 10). Two waves are too few to tell: environment 0 might end a third
    trajectory before 20."""
    from maml_runner.rl.episodes import _vectorized

    w1, w2, w3 = _wave([[3, 10]], 10), _wave([[4, 10]], 10), _wave([[10, 10]], 10)
    assert _vectorized([w1, w2], 2, 10, pooled=False) is None
    kept = _vectorized([w1, w2, w3], 2, 10, pooled=False)
    assert kept.mask.sum(-1).tolist() == [[3.0, 10.0, 4.0, 10.0]]
    assert kept.rewards[..., 0].tolist() == [[1.0, 2.0, 1.0, 1.0]]  # w3's env-0 trajectory
    # a meta-training batch (pooled): one environment per task, one budget 2·2·10 for both;
    # task 0 ends at 10, 20, 30, 40, task 1 at 2, 5, 10, 20: 20 steps are finished at 20
    pooled = _vectorized(
        [_wave([[10, 10], [2, 3]], 10), _wave([[10, 10], [5, 10]], 10)], 2, 10, True
    )
    assert pooled.mask.sum(-1).tolist() == [[10.0, 10.0, 0.0, 0.0], [2.0, 3.0, 5.0, 10.0]]


def test_rllab_sampling_over_represents_trajectories_that_end_early() -> None:
    """Where no trajectory ends early (the locomotion tasks) sampling=rllab gives exactly
    sampling=episodes' trajectories; where goals are reached it keeps whole trajectories that
    hold at least the budget, more of the short ones than sampling=steps (the bias of the
    reference code's figures)."""
    torch.manual_seed(0)
    policy = GaussianPolicy(2, 2, hidden=(8,))
    far = torch.tensor([[3.0, 3.0], [-3.0, 3.0]])  # unreachable in 5 steps
    params = per_task(dict(policy.named_parameters()), 2)
    env = Nav2D(action_map="rescale", goal_shape="square", goal_radius=0.15)
    for pooled in (False, True):
        kw = dict(episodes_per_task=3, horizon=5)
        ours = rollout(
            env,
            policy,
            params,
            far,
            generator=make_generator(1, CPU),
            sampling="rllab",
            pooled=pooled,
            **kw,
        )
        plain = rollout(env, policy, params, far, generator=make_generator(1, CPU), **kw)
        for name in ("obs", "actions", "rewards", "mask"):
            assert torch.equal(getattr(ours, name), getattr(plain, name))
    near = Nav2D(action_map="rescale", goal_shape="square", goal_radius=0.06)
    goals = torch.tensor([[0.05, 0.05]] * 2)  # reached in 1 step or a few, or missed
    short = {}
    for sampling in ("steps", "rllab"):
        eps = rollout(
            near,
            policy,
            params,
            goals,
            episodes_per_task=40,
            horizon=20,
            generator=make_generator(2, CPU),
            sampling=sampling,
        )
        lengths = eps.mask.sum(-1)[eps.valid.bool()]
        assert (eps.mask.sum((1, 2)) >= 800).all()
        short[sampling] = (lengths < 20).float().mean().item()
    assert short["rllab"] > short["steps"] + 0.05, short


def test_xavier_policy_init_has_zero_biases_and_glorot_weights() -> None:
    """model.init=xavier: the reference policy's Glorot-uniform weights and zero biases."""
    torch.manual_seed(0)
    policy = GaussianPolicy(20, 6, hidden=(100, 100), init="xavier")
    layers = [m for m in policy.mean if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(GaussianPolicy(20, 6).mean[0].bias) > 0  # torch's default


def test_rl_meta_test_samples_eval_k_shot_trajectories() -> None:
    """The meta-test and validation sample task.eval_k_shot trajectories per step, training
    task.k_shot (the job was once built with k_shot at test)."""
    from maml_runner.build import build

    cfg = make_config([*TINY_NAV, "task.sampling=episodes", "task.k_shot=3", "task.eval_k_shot=5"])
    job = build(cfg)
    try:
        adapted = job.adaptation(job.learner.params, job.test_tasks[:2], 1, seed=0)
        assert [e.valid.shape[1] for e in adapted.episodes] == [5, 5]
        params = per_task(job.learner.params, 2)
        sampled = job.learner.sample(params, job.test_tasks[:2], make_generator(0, CPU))
        assert sampled.valid.shape[1] == 3
    finally:
        job.close()


@pytest.mark.parametrize("goal", ["direction", "velocity"])
def test_locomotion_task_rewards_match_gymnasium(goal: str) -> None:
    """Our reward = task term on gymnasium's x velocity + its control cost, step for step."""
    gym = pytest.importorskip("gymnasium")
    env = Locomotion("HalfCheetah-v5", goal=goal, env_kwargs={"ctrl_cost_weight": 0.05})
    ref = gym.make("HalfCheetah-v5", ctrl_cost_weight=0.05).unwrapped
    tasks = torch.tensor([[1.0], [-1.0]]) if goal == "direction" else torch.tensor([[0.5], [1.7]])
    generator = make_generator(3, CPU)
    seeds = torch.randint(0, 2**31 - 1, (2,), generator=make_generator(3, CPU)).tolist()
    obs = env.reset(tasks, generator)
    for i, seed in enumerate(seeds):
        ref_obs, _ = ref.reset(seed=seed)
        assert torch.allclose(obs[i], torch.as_tensor(ref_obs, dtype=torch.float32))
    actions = torch.rand(5, 2, 6, generator=make_generator(4, CPU)) * 3 - 1.5  # some out of range
    rewards = []
    for a in actions:
        _, reward, done = env.step(a)
        rewards.append(reward)
        assert not done.any()
    for i, seed in enumerate(seeds):
        ref.reset(seed=seed)
        for step, a in enumerate(actions):
            clipped = a[i].clamp(-1, 1).numpy()
            _, _, _, _, info = ref.step(clipped)
            v = info["x_velocity"]
            g = tasks[i, 0].item()
            task_term = g * v if goal == "direction" else -abs(v - g)
            expected = task_term - 0.05 * float((clipped**2).sum())
            assert math.isclose(rewards[step][i].item(), expected, rel_tol=1e-5, abs_tol=1e-5)
    env.close()


def test_rllab_readings_of_the_half_cheetah() -> None:
    """task.robot=rllab: the observation is qpos[1:], qvel and the whole robot's centre of mass
    (20), the task's velocity that centre of mass's x velocity (its sum × dt is the centre of
    mass's displacement, which the root's is not), reset noise N(0, 0.01²) on the positions."""
    pytest.importorskip("gymnasium")
    kwargs = {"frame_skip": 1, "ctrl_cost_weight": 0.0}
    env = Locomotion("HalfCheetah-v5", goal="direction", env_kwargs=kwargs, robot="rllab")
    try:
        assert env.obs_dim == 20
        obs = env.reset(torch.tensor([[1.0], [-1.0]]), make_generator(0, CPU))
        assert obs.shape == (2, 20)
        robot = env._local[0]
        data = robot.data
        deviation = data.qpos - robot.init_qpos
        assert 0 < abs(deviation).max() < 0.05  # N(0, 0.01²): gymnasium's is U(±0.1)
        torch.testing.assert_close(obs[0, 8:17], torch.as_tensor(data.qvel, dtype=torch.float32))
        start_com, start_root = data.subtree_com[1, 0], data.qpos[0]
        actions = torch.randn(100, 2, 6, generator=make_generator(1, CPU))
        returns = torch.zeros(2)
        for a in actions:
            obs, reward, _ = env.step(a)
            returns += reward
        com = torch.as_tensor(data.subtree_com[1], dtype=torch.float32)
        torch.testing.assert_close(obs[0, 17:], com)
        torch.testing.assert_close(obs[0, :8], torch.as_tensor(data.qpos[1:], dtype=torch.float32))
        dt = robot.dt
        com_moved, root_moved = data.subtree_com[1, 0] - start_com, data.qpos[0] - start_root
        # (to the integrator's error: the velocity is read at the new state)
        assert math.isclose(returns[0].item() * dt, com_moved, rel_tol=1e-2), (returns, com_moved)
        assert root_moved != pytest.approx(com_moved, rel=1e-3)
        # rllab's own formula (mjcore.py's body_comvels): the bodies' linear momenta over the mass
        import mujoco

        momentum = np.zeros(3)
        for body in range(1, robot.model.nbody):
            velocity = np.zeros(6)
            mujoco.mj_objectVelocity(robot.model, data, mujoco.mjtObj.mjOBJ_BODY, body, velocity, 0)
            momentum += robot.model.body_mass[body] * velocity[3:]
        rllab_velocity = momentum[0] / robot.model.body_mass[1:].sum()
        assert math.isclose(reward[0].item(), rllab_velocity, rel_tol=1e-5, abs_tol=1e-5)
    finally:
        env.close()


def test_rllab_readings_are_refused_where_they_do_not_apply() -> None:
    from maml_runner.errors import InvalidArgument

    with pytest.raises(
        InvalidArgument, match="robot=rllab: rllab's readings are HalfCheetah's only"
    ):
        Locomotion("Ant-v5", goal="direction", robot="rllab")
    kwargs = {"exclude_current_positions_from_observation": False}
    with pytest.raises(InvalidArgument, match="exclude_current_positions_from_observation=False"):
        Locomotion("HalfCheetah-v5", goal="direction", env_kwargs=kwargs, robot="rllab")
    with pytest.raises(InvalidArgument, match="forward_reward_weight=2.0: the task's reward"):
        Locomotion("HalfCheetah-v5", goal="velocity", env_kwargs={"forward_reward_weight": 2.0})
    with pytest.raises(InvalidArgument, match="robot=mujoco_py: choose one of gymnasium, rllab"):
        Locomotion("HalfCheetah-v5", goal="direction", robot="mujoco_py")


@pytest.mark.parametrize("robot", ["gymnasium", "rllab"])
def test_locomotion_worker_processes_give_the_same_episodes(robot: str) -> None:
    pytest.importorskip("gymnasium")
    obs_dim = {"gymnasium": 17, "rllab": 20}[robot]
    policy = GaussianPolicy(obs_dim, 6, hidden=(8,))
    params = per_task(dict(policy.named_parameters()), 2)
    runs = []
    for workers in (1, 2):
        env = Locomotion("HalfCheetah-v5", goal="velocity", workers=workers, robot=robot)
        try:
            runs.append(
                rollout(
                    env,
                    policy,
                    params,
                    torch.tensor([[0.5], [1.5]]),
                    episodes_per_task=3,
                    horizon=6,
                    generator=make_generator(5, CPU),
                )
            )
        finally:
            env.close()
    assert torch.equal(runs[0].obs, runs[1].obs)
    assert torch.equal(runs[0].rewards, runs[1].rewards)


def test_returns_and_baseline_advantages() -> None:
    rewards = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert torch.allclose(
        discounted_returns(rewards, 0.5), torch.tensor([[[1 + 0.5 * 2 + 0.25 * 3, 2 + 1.5, 3.0]]])
    )
    # returns that are an exact linear function of the features leave no advantage
    obs = torch.linspace(-1, 1, 20).view(1, 2, 10, 1)
    episodes = Episodes(obs, torch.zeros(1, 2, 10, 1), torch.zeros(1, 2, 10), torch.ones(1, 2, 10))
    from maml_runner.rl.episodes import linear_baseline

    returns = 3 * obs[..., 0] - 2 * obs[..., 0].square() + 0.5
    assert torch.allclose(linear_baseline(episodes, returns), returns, atol=1e-4)
    episodes.rewards = torch.randn(1, 2, 10, generator=make_generator(0, CPU))
    normalized = with_advantages(episodes, discount=0.99, normalize=True).advantages
    assert (
        abs(normalized.mean().item()) < 1e-5 and abs(normalized.std(correction=0).item() - 1) < 1e-3
    )


def test_policy_gradient_matches_finite_differences_on_a_bandit() -> None:
    """One-step problem r(a) = −(a − c)², J(μ, σ) = −((μ − c)² + σ²): the score-function
    gradient from many samples (no baseline) agrees with finite differences of J."""
    torch.manual_seed(0)
    c, samples = 0.7, 200_000
    policy = GaussianPolicy(1, 1, hidden=())
    with torch.no_grad():
        policy.mean[0].weight.fill_(0.2)
        policy.mean[0].bias.fill_(0.1)
        policy.log_std.fill_(math.log(0.5))
    params = per_task(dict(policy.named_parameters()), 1)
    obs = torch.ones(1, samples, 1, 1)
    mean, log_std = policy.distribution(params, obs.view(1, samples, 1))
    actions = (mean + log_std.exp() * torch.randn(mean.shape)).detach().view(1, samples, 1, 1)
    rewards = -(actions[..., 0] - c).square()
    ep = Episodes(obs, actions, rewards, torch.ones(1, samples, 1), advantages=rewards)
    grads = torch.autograd.grad(-pg_loss(policy, params, ep).sum(), list(params.values()))
    grad = dict(zip(params, grads))

    def J(mu: float, sigma: float) -> float:
        return -((mu - c) ** 2 + sigma**2)

    mu, sigma, h = 0.3, 0.5, 1e-4
    dj_dmu = (J(mu + h, sigma) - J(mu - h, sigma)) / (2 * h)
    dj_dlogstd = (J(mu, sigma * math.exp(h)) - J(mu, sigma * math.exp(-h))) / (2 * h)
    # dμ/dbias = 1 and dμ/dweight = obs = 1
    assert grad["mean.0.bias"].item() == pytest.approx(dj_dmu, abs=0.02)
    assert grad["mean.0.weight"].item() == pytest.approx(dj_dmu, abs=0.02)
    assert grad["log_std"].item() == pytest.approx(dj_dlogstd, abs=0.02)


def _learner(first_order: bool = False, dtype=torch.float32, inner_steps: int = 1, **kw) -> MetaRL:
    torch.manual_seed(0)
    policy = GaussianPolicy(2, 2, hidden=(16,)).to(dtype)
    return MetaRL(
        Nav2D(),
        policy,
        inner_lr=0.1,
        inner_steps=inner_steps,
        first_order=first_order,
        episodes_per_task=4,
        horizon=10,
        discount=0.99,
        normalize_advantages=True,
        **kw,
    )


def test_meta_gradient_through_the_inner_step_matches_finite_differences() -> None:
    """d/dθ of the post-update loss, with θ' = θ − α∇L_PG(θ), in float64: second order exact;
    first order misses the curvature term."""
    torch.set_default_dtype(torch.float64)
    try:
        _check_meta_gradient()
    finally:
        torch.set_default_dtype(torch.float32)


def _check_meta_gradient() -> None:
    learner = _learner(dtype=torch.float64)
    generator = make_generator(0, CPU)
    tasks = learner.env.sample_tasks(3, generator)
    theta = {n: p.detach().clone().requires_grad_() for n, p in learner.params.items()}
    inner = learner.sample(per_task(theta, 3), tasks, generator)
    post = learner.sample(per_task(theta, 3), tasks, generator)
    assert post.obs.dtype == torch.float64

    def outer(params, create_graph: bool) -> torch.Tensor:
        fast = learner.adapt(per_task(params, 3), [inner], 0.1, create_graph)
        return pg_loss(learner.policy, fast, post).mean()

    grads = torch.autograd.grad(outer(theta, True), list(theta.values()))
    fo = torch.autograd.grad(outer(theta, False), list(theta.values()))
    direction = {n: torch.randn_like(p) for n, p in theta.items()}
    h = 1e-6

    def shifted(sign: float):
        p = {n: (theta[n] + sign * h * direction[n]).detach().requires_grad_() for n in theta}
        return outer(p, False).item()

    fd = (shifted(1) - shifted(-1)) / (2 * h)
    analytic = sum((g * direction[n]).sum() for n, g in zip(theta, grads)).item()
    first_order = sum((g * direction[n]).sum() for n, g in zip(theta, fo)).item()
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert abs(first_order - fd) > 1e-4 * max(1.0, abs(fd))


def test_conjugate_gradient_solves_a_positive_definite_system() -> None:
    a = torch.randn(6, 6, generator=make_generator(0, CPU), dtype=torch.float64)
    spd = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=make_generator(1, CPU), dtype=torch.float64)
    x = conjugate_gradient(lambda v: spd @ v, b, iters=20)
    assert torch.allclose(spd @ x, b, atol=1e-8)


@pytest.mark.parametrize("first_order", [False, True])
def test_trpo_step_improves_the_surrogate_within_the_kl_bound(first_order: bool) -> None:
    learner = _learner(first_order)
    trpo = TRPO(list(learner.params.values()))
    stream = RLTaskStream(learner.env, meta_batch_size=3, seed=0)
    before = {n: p.detach().clone() for n, p in learner.params.items()}
    objective, returns = learner.meta_objective(*stream.batch(0))
    stats = trpo.step(objective)
    assert torch.isfinite(returns).all() and returns.shape == (2,)
    assert stats["surrogate"] < stats["surrogate_before"]
    assert 0 < stats["kl"] <= trpo.max_kl
    moved = sum((p - before[n]).abs().sum() for n, p in learner.params.items())
    assert moved > 0


def test_finite_difference_fvp_with_a_small_eps_is_the_exact_product() -> None:
    """Central differences of the KL gradient (through the inner step) at θ ± ε·v approach the
    exact Fisher-vector product as ε → 0 (float64); at the reference's ε = 1/‖θ‖ they do not."""
    torch.set_default_dtype(torch.float64)
    try:
        learner = _learner(dtype=torch.float64)
        stream = RLTaskStream(learner.env, meta_batch_size=3, seed=0)
        objective, _ = learner.meta_objective(*stream.batch(0))
        params = list(learner.params.values())
        before = [p.detach().clone() for p in params]
        _, kl = objective(True)
        v = torch.randn(sum(p.numel() for p in params), generator=make_generator(1, CPU))
        exact = TRPO(params).fisher_vector_product(objective, kl)(v)
        small = TRPO(params, fvp_eps=1e-5).fisher_vector_product(objective, kl)(v)
        wide = TRPO(params, fvp_eps=1.0).fisher_vector_product(objective, kl)(v)
        assert (small - exact).norm() < 1e-6 * exact.norm()
        assert (wide - exact).norm() > 0.1 * exact.norm()
        assert all(torch.equal(p, b) for p, b in zip(params, before))  # θ put back
    finally:
        torch.set_default_dtype(torch.float32)


def test_finite_difference_fvp_at_the_reference_eps_holds_back_a_falling_log_std() -> None:
    """The reference's ε = 1/‖θ‖ sees the KL grow faster than its quadratic model where a
    log-std falls (KL(Δ) = Δ + e^{−2Δ}/2 − 1/2, Δ its change), so the step moves the log-std
    less, relative to a mean weight (KL m²: quadratic, seen alike), than the exact step does."""
    ratios = {}
    for name, kw in (("exact", {}), ("fd", {"fvp_eps": 1.0})):
        m, s = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        other = torch.full((1,), 3.0, requires_grad=True)  # ‖θ‖ = 3: ε = 1/3

        def objective(differentiable: bool, m=m, s=s, other=other):
            delta = -(s + 0 * other).sum()  # the log-std falls as s rises
            kl = m.square().sum() + delta + torch.exp(-2 * delta) / 2 - 0.5
            return -(m + 10 * s + 0 * other).sum(), kl

        stats = TRPO([m, s, other], max_kl=0.01, **kw).step(objective)
        assert stats["surrogate"] < stats["surrogate_before"] and 0 < stats["kl"] <= 0.01
        assert other.item() == 3.0
        ratios[name] = s.item() / m.item()
    assert ratios["exact"] == pytest.approx(10, rel=1e-3)  # H = diag(2, 2): the step ∝ g
    assert 0 < ratios["fd"] < 0.9 * ratios["exact"]


def test_trpo_update_returns_what_it_names() -> None:
    """``trpo_step``'s figures are [post, pre, kl, backtracks, surrogate improvement], as METRICS
    names them (the trust region's health every step); the stream's tasks (and so the step)
    are a function of (seed, step) alone."""
    learner = _learner()
    stream = RLTaskStream(learner.env, meta_batch_size=3, seed=0)
    tasks, _ = stream.batch(4)
    assert torch.equal(tasks, stream.batch(4)[0]) and not torch.equal(tasks, stream.batch(5)[0])
    update = trpo_step(learner, TRPO(list(learner.params.values())), stream)
    out = update(0)
    assert METRICS == (
        "meta_train/return_post",
        "meta_train/return_pre",
        "meta_train/kl",
        "meta_train/backtracks",
        "meta_train/surrogate_improvement",
    )
    assert out.shape == (len(METRICS),) and torch.isfinite(out).all()
    assert 0 < out[2] <= 0.01 and out[3] == int(out[3]) and 0 <= out[3] < 15
    assert out[4] > 0  # an accepted step lowers the surrogate


def test_pretraining_with_adam_is_the_reference_codes_step() -> None:
    """algorithm=pretrain outer=adam (the reference's MAMLNPO(use_maml=False)): the outer
    objective's gradient at θ_old is that of the tasks' mean −log π·Â on the same episodes, and
    one iteration is one full-batch Adam step (the first: lr·g/(|g| + ε) on every weight)."""
    learner = _learner(inner_steps=0)
    stream = RLTaskStream(learner.env, meta_batch_size=3, seed=0)
    params = list(learner.params.values())
    objective, _ = learner.meta_objective(*stream.batch(0))
    loss, _ = objective(True)
    ours = torch.autograd.grad(loss, params)
    # the reference's loss on the same episodes: re-sample them with the step's generator
    tasks, generator = stream.batch(0)
    episodes = learner.sample(per_task(learner.params, 3), tasks, generator)
    reference = pg_loss(learner.policy, per_task(learner.params, 3), episodes).mean()
    expected = torch.autograd.grad(reference, params)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    before = [p.detach().clone() for p in params]
    adam = torch.optim.Adam(params, lr=1e-3)
    out = outer_optimizer_step(learner, adam, stream)(0)
    figures = dict(zip(OPTIMIZER_METRICS, out.tolist(), strict=True))
    # no inner step: the post-update episodes are the pre-update ones
    assert figures["meta_train/return_post"] == figures["meta_train/return_pre"]
    # it moved the policy and lowered the surrogate on the step's own samples
    assert figures["meta_train/kl"] > 0 and figures["meta_train/surrogate_improvement"] > 0
    for p, b, g in zip(params, before, expected, strict=True):  # Adam's first step, eps 1e-8
        torch.testing.assert_close(b - p, 1e-3 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-9)


def test_rl_with_a_torch_optimizer_resumes_exactly(tmp_path) -> None:
    """experiment=finn17_nav2d_pretrain (Adam) and MAML with outer=sgd: 3 iterations in one go
    == 1, then resume to 3 (Adam's moments travel in the checkpoint); a bad outer class is
    refused in one line."""
    for name, args in (
        ("adam", [*TINY_NAV, "experiment=finn17_nav2d_pretrain"]),
        ("sgd", [*TINY_NAV, "outer=sgd", "outer.lr=0.01"]),
    ):
        straight, split = tmp_path / f"{name}_straight", tmp_path / f"{name}_split"
        maml_run([*args, "trainer.steps=3", f"hydra.run.dir={straight}"], cwd=tmp_path)
        maml_run([*args, "trainer.steps=1", f"hydra.run.dir={split}"], cwd=tmp_path)
        maml_run([f"resume={split}", "trainer.steps=3"], cwd=tmp_path)
        a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 3
        for weight, value in a["model"].items():
            assert torch.equal(value, b["model"][weight]), (name, weight)
        # the history keeps the step's KL and improvement; there is no line search to report
        rows = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines()]
        logged = {k for r in rows for k in r}
        assert {"meta_train/kl", "meta_train/surrogate_improvement"} <= logged
        assert "meta_train/backtracks" not in logged
        # each test goal's return after each step, for θ and for the random initialisation
        metrics = read_metrics(straight)
        for tested in (metrics["meta_test"], metrics["baselines"]["random_init"]):
            rows = tested["per_task"]["return"]
            assert len(rows) == len(tested["inner_steps"]) and len(rows[0]) == tested["num_tasks"]
            assert sum(rows[-1]) / len(rows[-1]) == pytest.approx(tested["return"]["mean"][-1])
    for bad, expected in (
        ("outer._target_=torch.nn.Linear", "outer._target_=torch.nn.Linear: "),
        # torch.optim would take True as lr 1
        ("outer.lr=true", "outer.lr=True: the meta step size must be a number >= 0"),
    ):
        proc = maml_run([*TINY_NAV, "outer=adam", bad], cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert expected in proc.stderr, proc.stderr


def test_gaussian_log_prob_and_kl_match_torch_distributions() -> None:
    g = make_generator(3, CPU)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mean0, mean1, action = randn(4, 5, 3), randn(4, 5, 3), randn(4, 5, 3)
    log_std0, log_std1 = 0.5 * randn(4, 1, 3), 0.5 * randn(4, 1, 3)
    p = Independent(Normal(mean0, log_std0.exp().expand_as(mean0)), 1)
    q = Independent(Normal(mean1, log_std1.exp().expand_as(mean1)), 1)
    torch.testing.assert_close(log_prob(mean0, log_std0, action), p.log_prob(action))
    torch.testing.assert_close(kl_divergence(mean0, log_std0, mean1, log_std1), kl(p, q))


def test_short_navigation_run_learns_to_adapt(tmp_path) -> None:
    """maml-run experiment=finn17_nav2d, shortened: one policy-gradient step must raise the
    return on held-out goals well above the pre-update return and above a random init's."""
    run = tmp_path / "nav"
    maml_run(
        [
            "experiment=finn17_nav2d",
            "trainer.steps=12",
            "trainer.meta_batch_size=10",
            "task.k_shot=10",
            "task.eval_k_shot=10",
            "eval.num_tasks=20",
            "task.test_goals=sampled",
            "trainer.progress=false",
            "logger.mode=offline",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    m = read_metrics(run)
    ret = m["meta_test"]["return"]["mean"]
    rand = m["baselines"]["random_init"]["return"]["mean"]
    # measured (torch 2.13 CPU, reference protocol): 0/1 steps -36.0/-19.6, random init -68.8/-61.2
    assert ret[1] > ret[0] + 5, ret
    assert ret[1] > rand[1] + 20, (ret, rand)
    assert (run / "trajectories.png").exists() and (run / "adaptation.png").exists()
    assert list((run / "wandb").glob("offline-run-*"))


TINY_NAV = [
    "experiment=finn17_nav2d",
    "trainer.meta_batch_size=3",
    "task.k_shot=4",
    "task.horizon=20",
    "eval.num_tasks=4",
    "task.test_goals=sampled",
    "eval.plot_tasks=2",
    "trainer.progress=false",
    "logger.mode=disabled",
]


def test_reference_test_goals_are_the_reference_codes_40() -> None:
    """task.test_goals=reference: test_maml_point.py's goals (numpy seed 1, uniform ±0.5)."""
    from maml_runner.build import build

    job = build(make_config([*TINY_NAV, "task.test_goals=reference", "eval.num_tasks=40"]))
    try:
        goals = job.test_tasks
        assert goals.shape == (40, 2) and goals.abs().max() <= 0.5
        # the first two draws of numpy's legacy generator seeded with 1, minus 0.5
        expected = torch.tensor([[0.417022005, 0.720324493], [0.000114375, 0.302332573]]) - 0.5
        torch.testing.assert_close(goals[:2], expected)
    finally:
        job.close()


def test_evaluate_may_change_the_later_steps_step_size() -> None:
    """task.eval_later_lr_scale is a test-time setting (the reference tests chose it per robot):
    evaluate takes it; a bad value is refused as at training."""
    from maml_runner.build import validate
    from maml_runner.cli import _evaluation_config
    from maml_runner.errors import UserError

    saved = make_config(TINY_NAV)
    cfg = _evaluation_config(saved, ["task.eval_later_lr_scale=0.25"], {})
    validate(cfg)
    assert cfg.task.eval_later_lr_scale == 0.25 and saved.task.eval_later_lr_scale == 0.5
    with pytest.raises(UserError, match="task.eval_later_lr_scale=0"):
        validate(_evaluation_config(saved, ["task.eval_later_lr_scale=0"], {}))


def test_evaluate_may_change_how_test_episodes_are_sampled() -> None:
    """task.sampling is a test-time setting too (a run trained with one sampling can be tested
    as the reference tested, sampling=rllab); a bad value is refused in one line."""
    from maml_runner.build import build
    from maml_runner.cli import _evaluation_config
    from maml_runner.errors import UserError

    saved = make_config([*TINY_NAV, "task.sampling=steps"])
    with build(_evaluation_config(saved, ["task.sampling=rllab"], {})) as job:
        assert job.learner.sampling == "rllab" and saved.task.sampling == "steps"
    with pytest.raises(UserError, match="task.sampling=paths: choose one of"):
        build(_evaluation_config(saved, ["task.sampling=paths"], {}))


def test_rl_resume_is_exact_and_evaluate_reads_rl_runs(tmp_path) -> None:
    """4 iterations in one go == 2, then `resume=DIR trainer.steps=4`; `maml-run evaluate`
    re-runs the RL meta-test from the checkpoint and gets the run's own numbers."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    maml_run([*TINY_NAV, "trainer.steps=4", f"hydra.run.dir={straight}"], cwd=tmp_path)
    maml_run([*TINY_NAV, "trainer.steps=2", f"hydra.run.dir={split}"], cwd=tmp_path)
    # a task key of the run's own task is checked on the run's config (the default task,
    # sinusoid, has no task.eval_later_lr_scale: it was refused as "no such config key")
    maml_run([f"resume={split}", "trainer.steps=4", "task.eval_later_lr_scale=0.5"], cwd=tmp_path)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    proc = maml_run(["evaluate", str(straight)], cwd=tmp_path)
    assert "return" in proc.stdout
    evaluated = json.loads(next((straight / "checkpoints").glob("eval_*.json")).read_text())
    ours = read_metrics(straight)["meta_test"]["return"]["mean"]
    assert evaluated["meta_test"]["return"]["mean"] == pytest.approx(ours, rel=1e-5)
    # the same θ on the reference code's 40 goals (test_maml_point.py's)
    maml_run(
        ["evaluate", str(split), "task.test_goals=reference", "--num-tasks", "40"], cwd=tmp_path
    )
    (on_reference,) = (split / "checkpoints").glob("eval_*_n40_*.json")
    assert json.loads(on_reference.read_text())["overrides"] == ["task.test_goals=reference"]
    table = maml_run(["table", str(straight), str(split)], cwd=tmp_path).stdout
    assert "return @3 (ours)" in table and "-40.41" in table
    assert table.count("nav2d random init") == 1  # same task and seed: one shared init row


def test_meta_test_later_steps_use_the_scaled_step_size() -> None:
    """Step 1 at α, steps 2.. at α·task.eval_later_lr_scale (the reference tests: 0.5; the ant's
    direction: 0.01), replayed by hand on the episodes the adaptation sampled."""
    from maml_runner.build import build

    for scale in (0.5, 0.01):
        cfg = make_config([*TINY_NAV, f"task.eval_later_lr_scale={scale}", "inner.lr=0.3"])
        job = build(cfg)
        try:
            tasks = job.test_tasks[:2]
            adapted = job.adaptation(job.learner.params, tasks, 2, seed=0)
            by_hand = per_task({n: p.detach() for n, p in job.learner.params.items()}, 2)
            for episodes, lr in zip(adapted.episodes[:2], (0.3, 0.3 * scale), strict=True):
                with torch.enable_grad():
                    by_hand = {n: p.requires_grad_() for n, p in by_hand.items()}
                    loss = pg_loss(job.learner.policy, by_hand, episodes).sum()
                    grads = torch.autograd.grad(loss, list(by_hand.values()))
                by_hand = {
                    n: (p - lr * g).detach()
                    for (n, p), g in zip(by_hand.items(), grads, strict=True)
                }
            for name, value in adapted.params.items():
                torch.testing.assert_close(value, by_hand[name], rtol=1e-6, atol=1e-7)
        finally:
            job.close()


RL_PARTS = ["model=gaussian_mlp", "outer=trpo"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["task=cheetah_dir", "task.action_map=rescale"],
            "task.action_map=rescale: task=cheetah_dir",
        ),
        (["task=ant_vel", "task.reward=distance"], "task.reward=distance: task=ant_vel would"),
        (["task=cheetah_vel", "task.goal_radius=0.1"], "task.goal_radius=0.1: task=cheetah_vel"),
        (["task=ant_dir", "task.goal_shape=square"], "task.goal_shape=square: task=ant_dir"),
        (["task=cheetah_dir", "task.action_bound=1.0"], "task.action_bound=1.0: task=cheetah"),
        (["task=cheetah_dir", "task.goal_low=1.0"], "task.goal_low=1.0: task=cheetah_dir would"),
        (["task=ant_dir", "task.goal_high=2.0"], "direction goals are ±1"),
        (["task=nav2d", "task.workers=4"], "task.workers=4: task=nav2d would ignore it"),
        (["task=nav2d", "+task.env_kwargs.frame_skip=1"], "task.env_kwargs={'frame_skip': 1}"),
        (["task=cheetah_vel", "task.goal_low=null"], "task.goal_low=null: task=cheetah_vel needs"),
        (["task=nav2d", "task.action_map=null"], "task.action_map=null: task=nav2d needs a"),
        (["task=cheetah_dir", "task.workers=null"], "task.workers=null: task=cheetah_dir needs"),
        (["task=nav2d", "task.robot=rllab"], "task.robot=rllab: task=nav2d would ignore it"),
        (["task=ant_dir", "task.robot=rllab"], "task.robot=rllab: rllab's readings are Half"),
        # a navigation preset's keys on a locomotion task: refused, not dropped
        (["experiment=finn17_nav2d", "task=ant_dir"], "task.reward=distance: task=ant_dir would"),
    ],
)
def test_a_key_the_robot_would_ignore_is_refused(overrides, expected) -> None:
    """The task keys of nav2d's point robot, the MuJoCo robots' and the goal range of
    velocity/position goals are each refused where the task would not read them (they used to
    sit in every task file, "ignored here"), and required where it would."""
    from maml_runner.build import validate
    from maml_runner.errors import UserError

    with pytest.raises(UserError) as err:
        validate(make_config([*RL_PARTS, *overrides]))
    assert expected in str(err.value), err.value


@pytest.mark.parametrize("task", ["nav2d", "cheetah_dir", "cheetah_vel", "ant_dir", "ant_vel"])
def test_every_rl_task_file_passes_its_own_key_check(task) -> None:
    from maml_runner.build import validate

    validate(make_config([*RL_PARTS, f"task={task}"]))
    validate(make_config([f"experiment=finn17_{task}"]))


def test_evaluate_reads_a_run_saved_with_the_keys_its_robot_ignored() -> None:
    """Runs saved before the task files kept only their robot's keys carry nav2d's on a
    cheetah and the MuJoCo ones on nav2d; the run ignored them, so evaluate drops them."""
    from maml_runner.build import validate
    from maml_runner.cli import _evaluation_config

    old = {
        "cheetah_dir": {"reward": "distance", "action_map": "clip", "goal_low": 0.0},
        "nav2d": {"workers": 2, "env_kwargs": {}},
    }
    for task, keys in old.items():
        saved = OmegaConf.to_container(make_config([*RL_PARTS, f"task={task}"]))
        saved["task"].update(keys)
        cfg = _evaluation_config(OmegaConf.create(saved), ["task.test_goals=sampled"], {})
        validate(cfg)
        assert all(not cfg.task[key] for key in keys), cfg.task
    # a preset's gymnasium keywords (frame_skip), which the task file lacks, are the run's; a run
    # saved before task.robot existed read the robot as gymnasium does
    saved = OmegaConf.to_container(make_config(["experiment=finn17_cheetah_dir"]))
    del saved["task"]["robot"]
    saved["task"]["env_kwargs"]["exclude_current_positions_from_observation"] = False
    cfg = _evaluation_config(OmegaConf.create(saved), [], {})
    validate(cfg)
    assert cfg.task.robot == "gymnasium" and cfg.task.env_kwargs.frame_skip == 1


def test_rl_bad_input_is_one_line(tmp_path) -> None:
    for args, expected in (
        (["task=nav2d"], "model=mlp: task=nav2d needs model=gaussian_mlp, with outer=trpo"),
        ([*TINY_NAV, "task.reward=manhattan"], "task.reward=manhattan: choose one of"),
        ([*TINY_NAV, "task.action_map=tanh"], "task.action_map=tanh: choose one of"),
        ([*TINY_NAV, "task.goal_shape=star"], "task.goal_shape=star: choose one of"),
        ([*TINY_NAV, "task.sampling=paths"], "task.sampling=paths: choose one of"),
        ([*TINY_NAV, "model.init=glorot"], "model.init=glorot: choose one of"),
        ([*TINY_NAV, "task.test_goals=mine"], "task.test_goals=mine: choose one of"),
        (
            [*TINY_NAV, "task.test_goals=reference"],
            "eval.num_tasks=4: task.test_goals=reference is the reference code's 40 goals",
        ),
        (
            [*TINY_NAV, "task.test_goals=reference", "eval.num_tasks=40", "task.goal_high=1.0"],
            "task.test_goals=reference: the reference goals lie in [-0.5, 0.5]², not",
        ),
        (
            [*RL_PARTS, "task=cheetah_dir", "task.test_goals=reference", "eval.num_tasks=40"],
            "task.test_goals=reference: the reference goals are nav2d's",
        ),
        (
            [*TINY_NAV, "task.eval_later_lr_scale=0"],
            "task.eval_later_lr_scale=0.0: give a number > 0",
        ),
        ([*RL_PARTS, "task=cheetah_dir", "task.env=Nope-v0"], "task.env=Nope-v0"),
        ([*TINY_NAV, "task=cheetah_dir"], "task.reward=distance: task=cheetah_dir would ignore"),
        (["task=sinusoid", "outer=trpo"], "the Gaussian policy and TRPO are for RL tasks"),
        # TRPO's numbers: a string or a bool was a Hydra error (or taken as 1) and left a folder
        ([*TINY_NAV, "outer.fvp_eps=abc"], "outer.fvp_eps=abc: null (exact products) or > 0"),
        ([*TINY_NAV, "outer.fvp_eps=true"], "outer.fvp_eps=True: null (exact products) or > 0"),
        ([*TINY_NAV, "outer.max_kl=abc"], "outer.max_kl=abc: the KL bound must be > 0"),
    ):
        proc = maml_run(args, cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
