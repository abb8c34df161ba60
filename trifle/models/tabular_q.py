"""Q_taxi: the behaviour policy's action values, learned by tabular policy evaluation on the offline data.

The paper's Taxi ablation (docs/evaluation.md#q-taxi) learns Q by the on-data update
Q(s, a) <- Q(s, a) + alpha [r + gamma Q(s', a') - Q(s, a)] over the dataset's transitions (s, a, r, s', a').
Swept until it stops moving, that update settles where every visited (s, a) satisfies

    Q(s, a) = mean over the data's transitions from (s, a) of  r + gamma (1 - d) Q(s', a'),

the empirical Bellman equation of the behaviour policy (d: the episode ended by a real terminal). This
module solves that linear system exactly (one dense solve over the visited pairs), so the answer does
not depend on a step size, a sweep order or a number of sweeps. A timed-out episode's last transition has
no s' and is left out, as in the IQL critic (trifle.models.iql_training.transition_rows).

Pairs the data never visits get the lowest Q of the visited ones: offline data say nothing about them,
and the pessimistic value keeps both of the table's uses (reweighting the planner's action prior, valuing
a plan's last step) away from actions the behaviour never took. An observation never seen in the data
gets that value for every action, so it reweights nothing.

Only discrete tasks have a table: the dataset must carry ``obs_cardinalities`` and ``num_actions``
(trifle.data.d4rl_format) and a single action column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trifle.data.labels import LabeledTrajectories
from trifle.errors import DataError
from trifle.models.iql_training import transition_rows


@dataclass
class TabularQ:
    """Q[s, a] over the dataset's distinct observations ``states`` [S, obs_dim] and actions 0..A-1."""

    states: np.ndarray  # [S, obs_dim] float64, the distinct observations in sorted order
    q: np.ndarray  # [S, A] float64
    visits: np.ndarray  # [S, A] int64, transitions from (s, a) used by the evaluation
    unseen: float  # the value of unvisited pairs and unseen observations

    @classmethod
    def fit(cls, labeled: LabeledTrajectories, discount: float, source: str = "dataset") -> TabularQ:
        """Evaluate the data's behaviour policy exactly (module docstring) on every episode of ``labeled``."""
        attrs = labeled.attrs
        if "num_actions" not in attrs or "obs_cardinalities" not in attrs:
            raise DataError(
                f"{source}: a tabular Q needs a discrete dataset (attributes obs_cardinalities and "
                "num_actions); this one has continuous observations or actions"
            )
        actions = np.asarray(labeled.actions, np.float64)
        if actions.ndim != 2 or actions.shape[1] != 1:
            raise DataError(f"{source}: a tabular Q needs one action column, got shape {actions.shape}")
        if not 0.0 <= float(discount) < 1.0:
            raise DataError(f"{source}: a tabular Q needs a discount in [0, 1), got {discount!r}")
        num_actions = int(attrs["num_actions"])
        obs = np.asarray(labeled.observations, np.float64)
        states, state_of_row = np.unique(obs, axis=0, return_inverse=True)
        state_of_row = state_of_row.reshape(-1)
        act = np.rint(actions[:, 0]).astype(np.int64)
        if np.any(act < 0) or np.any(act >= num_actions):
            raise DataError(f"{source}: actions must be integers in [0, num_actions={num_actions})")
        rows, nxt, done = transition_rows(labeled, np.arange(len(labeled.episode_starts)))
        if rows.size == 0:
            raise DataError(f"{source}: no transitions with a successor to evaluate")
        pair = state_of_row * num_actions + act  # (s, a) of every row
        pairs, index = np.unique(pair[rows], return_inverse=True)  # the visited pairs
        counts = np.bincount(index, minlength=len(pairs)).astype(np.float64)
        mean_reward = np.bincount(index, weights=labeled.rewards[rows].astype(np.float64)) / counts
        # P[i, j]: the fraction of pair i's transitions that continue with visited pair j (not after a
        # terminal). A successor pair that never starts a transition itself (a timed-out episode's last
        # row, when that pair occurs nowhere else) has no data: its share goes to `unknown` and is valued
        # at the pessimistic fill.
        live = ~done
        succ = pair[nxt[live]]
        col = np.searchsorted(pairs, succ).clip(max=len(pairs) - 1)
        found = pairs[col] == succ
        n = len(pairs)
        transition = np.zeros((n, n))
        np.add.at(transition, (index[live][found], col[found]), 1.0)
        transition /= counts[:, None]
        unknown = np.bincount(index[live][~found], minlength=n) / counts
        # Q = r + gamma P Q + gamma unknown * fill: linear in the fill, Q = a + fill * b, and the fill is
        # itself the lowest visited value, fill = min(a + fill * b) (a single solution, since b < 1).
        gamma = float(discount)
        rhs = np.stack([mean_reward, gamma * unknown], axis=1)
        a, b = np.linalg.solve(np.eye(n) - gamma * transition, rhs).T
        fill = _lowest_value_fixed_point(a, b)
        q_pairs = a + fill * b
        q = np.full((len(states), num_actions), fill)
        visits = np.zeros((len(states), num_actions), np.int64)
        q.reshape(-1)[pairs] = q_pairs
        visits.reshape(-1)[pairs] = counts.astype(np.int64)
        return cls(states=states, q=q, visits=visits, unseen=fill)

    @property
    def num_actions(self) -> int:
        return self.q.shape[1]

    def state_index(self, obs: np.ndarray) -> np.ndarray:
        """Row of each observation ``[R, obs_dim]`` in the table, -1 where the data never saw it."""
        obs = np.asarray(obs, np.float64).reshape(-1, self.states.shape[1])
        keys = np.ascontiguousarray(self.states).view([("", np.float64)] * self.states.shape[1]).ravel()
        wanted = np.ascontiguousarray(obs).view([("", np.float64)] * obs.shape[1]).ravel()
        where = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
        return np.where(keys[where] == wanted, where, -1)

    def action_values(self, obs: torch.Tensor) -> torch.Tensor:
        """Q(s, a) for every action ``[R, A]`` (float64) of observations ``[R, obs_dim]``."""
        index = self.state_index(obs.detach().cpu().numpy())
        table = np.vstack([self.q, np.full((1, self.num_actions), self.unseen)])
        return torch.as_tensor(table[index], dtype=torch.float64, device=obs.device)

    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a) ``[R]`` of observations ``[R, obs_dim]`` and actions ``[R, 1]`` (the critic interface of
        trifle.planning.planners.CriticValue)."""
        act = actions.reshape(-1).round().long().clamp(0, self.num_actions - 1)
        return self.action_values(obs).gather(1, act[:, None].to(obs.device))[:, 0]


def _lowest_value_fixed_point(a: np.ndarray, b: np.ndarray) -> float:
    """The f with f = min_i(a_i + f b_i), for 0 <= b_i < 1: g(f) = min_i(a_i + f b_i) - f is strictly
    decreasing, so bracket its root and bisect (exactly min(a) when no pair reaches an unknown one)."""
    if not np.any(b > 0):
        return float(a.min())

    def g(f: float) -> float:
        return float(np.min(a + f * b)) - f

    width = float(np.abs(a).max()) + 1.0
    lo, hi = float(a.min()) - width, float(a.max()) + width
    while g(lo) < 0:
        lo -= 2 * (hi - lo)
    while g(hi) > 0:
        hi += 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)
