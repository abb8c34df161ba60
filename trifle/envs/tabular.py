"""Finite MDPs given as explicit outcome tables, with exact solvers and a batched numpy simulator.

The stochastic toy tasks (Taxi, FrozenLake) are small enough to write down completely. Keeping the
whole model as arrays lets us compute ground truth exactly (optimal values, the return of any policy)
and check learned models and planners against it, instead of trusting Monte Carlo estimates.

Each state-action pair has ``K`` possible outcomes (padded with zero-probability entries), each with
its own next state, reward and flags. ``terminal`` marks outcomes that end the episode (MDP
termination, bootstrapping stops); the step limit ``max_episode_steps`` is a separate truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from trifle.errors import ConfigError, TrifleError


@dataclass(frozen=True, eq=False)
class TabularMDP:
    """A finite MDP with ``S`` states, ``A`` actions and up to ``K`` outcomes per state-action pair.

    ``state_obs[s]`` is the observation vector (small non-negative integers) of state ``s``;
    observation dimension ``d`` takes values in ``range(obs_cardinalities[d])``. ``illegal`` flags
    outcomes of forbidden actions (counted as penalties by the evaluation), ``success`` flags the
    outcomes that complete the task (delivery, reaching the goal).
    """

    name: str
    prob: np.ndarray  # [S, A, K] float64, sums to 1 over K
    next_state: np.ndarray  # [S, A, K] int64
    reward: np.ndarray  # [S, A, K] float64
    terminal: np.ndarray  # [S, A, K] bool
    illegal: np.ndarray  # [S, A, K] bool
    success: np.ndarray  # [S, A, K] bool
    initial: np.ndarray  # [S] float64, sums to 1
    state_obs: np.ndarray  # [S, D] int64
    obs_cardinalities: tuple[int, ...]
    max_episode_steps: int

    def __post_init__(self) -> None:
        _validate_mdp(self)
        # Mixed-radix lookup from an observation vector to its state index (-1: no such state).
        table = np.full(int(np.prod(self.obs_cardinalities)), -1, dtype=np.int64)
        table[self._obs_code(self.state_obs)] = np.arange(self.num_states)
        object.__setattr__(self, "_obs_to_state", table)

    @property
    def num_states(self) -> int:
        return int(self.prob.shape[0])

    @property
    def num_actions(self) -> int:
        return int(self.prob.shape[1])

    @property
    def obs_dim(self) -> int:
        return len(self.obs_cardinalities)

    def decode(self, states: np.ndarray | int) -> np.ndarray:
        """State index (or array of them) -> observation vector(s) ``[..., D]``."""
        return self.state_obs[np.asarray(states)]

    def encode(self, obs: np.ndarray) -> np.ndarray:
        """Observation vector(s) ``[..., D]`` -> state index (or array of them)."""
        obs = np.asarray(obs, dtype=np.int64)
        cards = np.asarray(self.obs_cardinalities)
        if obs.shape[-1] != self.obs_dim or np.any(obs < 0) or np.any(obs >= cards):
            raise TrifleError(
                f"{self.name}: observation {obs.tolist()} outside cardinalities {cards.tolist()}"
            )
        states = self._obs_to_state[self._obs_code(obs)]
        if np.any(states < 0):
            raise TrifleError(f"{self.name}: observation {obs.tolist()} is not a state of this MDP")
        return states

    def _obs_code(self, obs: np.ndarray) -> np.ndarray:
        code = np.zeros(obs.shape[:-1], dtype=np.int64)
        for d, card in enumerate(self.obs_cardinalities):
            code = code * card + obs[..., d]
        return code


def _validate_mdp(mdp: TabularMDP) -> None:
    """Reject inconsistent tables early: a bad model silently corrupts every exact answer derived from it."""
    shape = mdp.prob.shape
    if len(shape) != 3:
        raise ConfigError(f"{mdp.name}: prob must be [S, A, K], got shape {shape}")
    for field in ("next_state", "reward", "terminal", "illegal", "success"):
        if getattr(mdp, field).shape != shape:
            raise ConfigError(f"{mdp.name}: {field} has shape {getattr(mdp, field).shape}, expected {shape}")
    if np.any(mdp.prob < 0) or not np.allclose(mdp.prob.sum(-1), 1.0, atol=1e-9):
        raise ConfigError(f"{mdp.name}: prob must be non-negative and sum to 1 over outcomes")
    if np.any(mdp.next_state < 0) or np.any(mdp.next_state >= shape[0]):
        raise ConfigError(f"{mdp.name}: next_state must lie in [0, {shape[0]})")
    if mdp.initial.shape != (shape[0],) or not np.isclose(mdp.initial.sum(), 1.0) or np.any(mdp.initial < 0):
        raise ConfigError(f"{mdp.name}: initial must be a distribution over {shape[0]} states")
    if mdp.state_obs.shape != (shape[0], len(mdp.obs_cardinalities)):
        raise ConfigError(f"{mdp.name}: state_obs must be [S, {len(mdp.obs_cardinalities)}]")
    if mdp.max_episode_steps < 1:
        raise ConfigError(f"{mdp.name}: max_episode_steps must be >= 1, got {mdp.max_episode_steps}")


def expected_reward(mdp: TabularMDP) -> np.ndarray:
    """Expected immediate reward ``r(s, a)`` ``[S, A]``."""
    return (mdp.prob * mdp.reward).sum(-1)


def value_iteration(
    mdp: TabularMDP, gamma: float, tol: float = 1e-10, max_iterations: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal discounted ``Q [S, A]`` and ``V [S]`` of the infinite-horizon MDP (no step limit).

    Terminal outcomes contribute no future value. Iterates until the sup-norm change of ``V`` is below
    ``tol``; ``gamma == 1`` is allowed when every policy eventually terminates.
    """
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"value_iteration: gamma must be in (0, 1], got {gamma}")
    r = expected_reward(mdp)
    cont = mdp.prob * ~mdp.terminal
    v = np.zeros(mdp.num_states)
    for _ in range(max_iterations):
        q = r + gamma * (cont * v[mdp.next_state]).sum(-1)
        v_new = q.max(-1)
        delta = np.abs(v_new - v).max()
        v = v_new
        if delta < tol:
            q = r + gamma * (cont * v[mdp.next_state]).sum(-1)
            return q, q.max(-1)
    raise ConfigError(
        f"value_iteration on {mdp.name}: no convergence to tol={tol} in {max_iterations} iterations"
    )


def greedy_policy(q: np.ndarray) -> np.ndarray:
    """Deterministic greedy policy as a one-hot ``[S, A]`` matrix (lowest index wins ties)."""
    policy = np.zeros_like(q)
    policy[np.arange(q.shape[0]), q.argmax(-1)] = 1.0
    return policy


@dataclass(frozen=True)
class PolicyEvaluation:
    """Exact finite-horizon statistics of a stationary policy from the initial distribution."""

    expected_return: float  # undiscounted, within the step limit
    success_probability: float  # P(a success outcome before the step limit)
    timeout_probability: float  # P(still running at the step limit)
    expected_length: float


def evaluate_policy(mdp: TabularMDP, policy: np.ndarray, horizon: int | None = None) -> PolicyEvaluation:
    """Propagate the state distribution step by step to get exact episode statistics.

    ``policy`` is ``[S, A]`` with rows summing to 1. ``horizon`` defaults to the MDP's step limit, so
    the result is what an unbounded number of evaluation episodes would average to.
    """
    if policy.shape != (mdp.num_states, mdp.num_actions) or not np.allclose(policy.sum(-1), 1.0):
        raise ConfigError(
            f"evaluate_policy: policy must be [S, A] = {mdp.prob.shape[:2]} with rows summing to 1"
        )
    horizon = mdp.max_episode_steps if horizon is None else horizon
    alive = mdp.initial.astype(np.float64)
    ret = success = length = 0.0
    for _ in range(horizon):
        length += float(alive.sum())
        mass = alive[:, None, None] * policy[:, :, None] * mdp.prob
        ret += float((mass * mdp.reward).sum())
        success += float(mass[mdp.success].sum())
        cont = np.where(mdp.terminal, 0.0, mass)
        alive = np.bincount(mdp.next_state.ravel(), weights=cont.ravel(), minlength=mdp.num_states)
    return PolicyEvaluation(ret, success, float(alive.sum()), length)


def sample_outcomes(mdp: TabularMDP, states: np.ndarray, actions: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Outcome index ``k`` for each (state, action, uniform draw), by inverse-CDF sampling.

    Scaling ``u`` by the row total means a CDF that ends at 0.9999999 never selects a zero-probability
    padding outcome.
    """
    cdf = np.cumsum(mdp.prob[states, actions], axis=-1)
    return (u[:, None] * cdf[:, -1:] >= cdf).sum(-1)


#: Mixed into every slot's seed, so an environment stream never equals a policy stream seeded by the same
#: ``(seed, slot)`` pair (DTPolicy samples from ``SeedSequence([seed, slot])``; the rollout passes the
#: environment and the policy the same batch seed).
_ENV_STREAM_TAG = 0x7461_626C  # "tabl"


class VectorTabularEnv:
    """``num_envs`` independent episodes of one MDP stepped together with numpy.

    Nothing resets automatically: a finished environment stays frozen (reward 0, no flags) until the
    caller resets it, and ``info["stepped"]`` says which environments actually moved. ``truncated`` is
    raised only when the step limit is reached without termination, matching D4RL's convention that
    ``terminals`` and ``timeouts`` are mutually exclusive.

    **Random numbers (common random numbers).** With ``rng="per_env"`` (the default) every slot ``i``
    has its own stream, seeded by ``SeedSequence([seed, i, tag])``; each reset of the slot and each of
    its steps takes the next uniform of that stream and nothing else does. So slot ``i`` of two
    environments built with the same seed (two methods evaluated on the same episode) starts in the
    same state, and its t-th step uses the same uniform whatever the other slots do (finish early,
    act differently): as long as the two episodes' states and actions agree, so do their outcomes, and
    their return difference has the low variance of a paired comparison. The uniforms are drawn from
    each stream in blocks (``block`` at a time, default one episode's worth, ``max_episode_steps + 1``),
    which changes only speed: a Generator's ``random(n)`` calls continue one sequence.
    ``rng="shared"`` is the earlier layout (one Generator for all slots, drawing for the running slots
    in order), kept so that the published toy datasets regenerate bit for bit.
    """

    def __init__(
        self, mdp: TabularMDP, num_envs: int, seed: int, *, rng: str = "per_env", block: int | None = None
    ) -> None:
        if num_envs < 1:
            raise ConfigError(f"VectorTabularEnv: num_envs must be >= 1, got {num_envs}")
        if rng not in ("per_env", "shared"):
            raise ConfigError(f"VectorTabularEnv: rng must be 'per_env' or 'shared', got {rng!r}")
        block = mdp.max_episode_steps + 1 if block is None else int(block)
        if block < 1:
            raise ConfigError(f"VectorTabularEnv: block must be >= 1, got {block}")
        self.mdp = mdp
        self.num_envs = num_envs
        self.rng_layout = rng
        if rng == "shared":
            self.rng = np.random.default_rng(seed)
        else:
            self._rngs = [
                np.random.default_rng(np.random.SeedSequence([int(seed), i, _ENV_STREAM_TAG]))
                for i in range(num_envs)
            ]
            self._block = min(block, 4096)
            self._buffer = np.empty((num_envs, self._block))
            self._used = np.full(num_envs, self._block, dtype=np.int64)  # all used: refill on first draw
        cdf = np.cumsum(mdp.initial)
        self._initial_cdf = cdf
        self._last_initial = int(np.flatnonzero(mdp.initial > 0)[-1])
        self.states = np.zeros(num_envs, dtype=np.int64)
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.done = np.ones(num_envs, dtype=bool)

    def _uniforms(self, ids: np.ndarray) -> np.ndarray:
        """The next uniform of each slot in ``ids`` (distinct, any order) from its own stream."""
        empty = ids[self._used[ids] >= self._block]
        for i in empty.tolist():  # once per slot per block: one Generator call each
            self._buffer[i] = self._rngs[i].random(self._block)
        self._used[empty] = 0
        u = self._buffer[ids, self._used[ids]]
        self._used[ids] += 1
        return u

    def reset(self, env_ids: np.ndarray | None = None) -> np.ndarray:
        """Start new episodes in ``env_ids`` (default: all); return every environment's observation."""
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64)
        if self.rng_layout == "shared":
            self.states[ids] = self.rng.choice(self.mdp.num_states, size=ids.size, p=self.mdp.initial)
        else:  # inverse CDF of the initial distribution; zero-probability states are never chosen
            x = self._uniforms(ids) * self._initial_cdf[-1]
            states = np.searchsorted(self._initial_cdf, x, side="right")
            self.states[ids] = np.minimum(states, self._last_initial)
        self.steps[ids] = 0
        self.done[ids] = False
        return self.mdp.decode(self.states)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Apply ``actions [E]`` to every running environment."""
        actions = np.asarray(actions, dtype=np.int64)
        if (
            actions.shape != (self.num_envs,)
            or np.any(actions < 0)
            or np.any(actions >= self.mdp.num_actions)
        ):
            raise TrifleError(
                f"{self.mdp.name}: actions must be [{self.num_envs}] in [0, {self.mdp.num_actions})"
            )
        run = ~self.done
        s, a = self.states[run], actions[run]
        u = self.rng.random(s.size) if self.rng_layout == "shared" else self._uniforms(np.flatnonzero(run))
        k = sample_outcomes(self.mdp, s, a, u)
        reward = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        illegal = np.zeros(self.num_envs, dtype=bool)
        success = np.zeros(self.num_envs, dtype=bool)
        reward[run] = self.mdp.reward[s, a, k]
        terminated[run] = self.mdp.terminal[s, a, k]
        illegal[run] = self.mdp.illegal[s, a, k]
        success[run] = self.mdp.success[s, a, k]
        self.states[run] = self.mdp.next_state[s, a, k]
        self.steps[run] += 1
        truncated = run & ~terminated & (self.steps >= self.mdp.max_episode_steps)
        self.done |= terminated | truncated
        info = {"stepped": run, "illegal": illegal, "success": success, "state": self.states.copy()}
        return self.mdp.decode(self.states), reward, terminated, truncated, info


class TabularGymEnv(gymnasium.Env):
    """One episode at a time through the standard gymnasium API (the step limit is built in).

    Observations are ``MultiDiscrete(obs_cardinalities)`` vectors, actions ``Discrete(num_actions)``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, mdp: TabularMDP) -> None:
        self.mdp = mdp
        self.observation_space = spaces.MultiDiscrete(list(mdp.obs_cardinalities))
        self.action_space = spaces.Discrete(mdp.num_actions)
        self._state = 0
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._state = int(self.np_random.choice(self.mdp.num_states, p=self.mdp.initial))
        self._steps = 0
        return self.mdp.decode(self._state), {"state": self._state}

    def step(self, action: int):
        s, a = self._state, int(action)
        k = int(sample_outcomes(self.mdp, np.array([s]), np.array([a]), self.np_random.random(1))[0])
        self._state = int(self.mdp.next_state[s, a, k])
        self._steps += 1
        terminated = bool(self.mdp.terminal[s, a, k])
        truncated = not terminated and self._steps >= self.mdp.max_episode_steps
        info = {"state": self._state, "illegal": bool(self.mdp.illegal[s, a, k])}
        info["success"] = bool(self.mdp.success[s, a, k])
        return self.mdp.decode(self._state), float(self.mdp.reward[s, a, k]), terminated, truncated, info
