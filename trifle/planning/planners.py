"""The evaluated planners ``tt``, ``trifle-s`` and ``trifle-m``: Trifle's hooks and the Policy (their
settings and config checks are the torch-free trifle.planning.planner_settings).

All three run TT's beam search (trifle.planning.beam) on the same GPT; they differ in two hooks:

========== ================================================ ==========================================
method     first-step action proposal                       value of a candidate plan
========== ================================================ ==========================================
tt         p_GPT(a^i | ...)                                 GPT: Σ γ^τ E[r_τ] + γ^{t+1} E[V_t]
trifle-s   p_GPT(a^i | ...) · p_PC(G_t in top | s, a^{<=i}) GPT, as tt (the released code, docs/paper.md#beam-search)
trifle-m   same correction as trifle-s                      circuit: Σ γ^h S_h E[r_h] + γ^H S_{H-1}
                                                            E[V_{H-1}] over the K-window (docs/paper.md#multi-step-value)
========== ================================================ ==========================================

TT(+Q) (tt-q, trifle-s-q; docs/planning.md#ttq) is ``terminal_value: critic`` on tt or trifle-s: the
value's last GPT return r_t + γ E[V_t] becomes an offline IQL critic's Q(s_t, a_t) (:class:`CriticValue`).

Three semantic choices have a config key each, so that each form can be measured against the other:

* ``correction_target`` (Trifle methods): G_t is the first transition's return-to-go r_t + gamma V_t
  (``return``, exact from the circuit's joint p(r_t, V_t | ...)) or its value token V_t alone
  (``value``, the released code's); V_t excludes what the action earns now, so an action that ends the
  episode with its reward looks like failing (circuit_queries.CorrectionTarget).
* ``value_threshold`` (Trifle methods): with q the (1 - top_ratio)-quantile level of p_PC(G_t | s,
  a^{<i}), ``mass`` (default) keeps exactly the top top_ratio of the mass (q weighted by the fraction
  that completes it), ``strict`` the levels above q, ``cdf`` (the released code's rule) q and above;
  ``cdf`` is inert at a lowest-level atom, ``strict`` at a best-outcome atom (circuit_queries.kept_bins).
* ``multistep_value`` (trifle-m): ``survival`` (default) conditions on every planned action (hard
  evidence) and weighs step h by S_h = P(episode still running at h | s, a_0..a_{h-1}); ``soft_pad``
  is the former single query with later actions as soft evidence "planned or pad", which rates an
  action the data rarely takes as "the episode probably ended" and, with negative rewards (Taxi),
  makes odd or illegal plans look like a free 0 (circuit_queries.expected_multistep_value).

The correction variable of both Trifle variants is a one-step quantity of the circuit's window: the
distribution of the multi-step V^m (a sum over H rewards and a value) would need the joint of H + 1
variables, so Eq. 4's p(V^m >= v | ...) is not computed; the multi-step quantity enters trifle-m
through the beam's value instead (docs/planning.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trifle.data.discretize import Discretizer
from trifle.data.tokens import TokenData
from trifle.errors import ConfigError
from trifle.models.gpt import TrajectoryGPT
from trifle.planning.beam import TokenSpec, beam_search
from trifle.planning.circuit_queries import (
    CorrectionTarget,
    WindowLayout,
    candidate_scores,
    constraint_evidence,
    expected_multistep_value,
    fixed_kept_levels,
    kept_bins,
)
from trifle.planning.constraints import Bound, allowed_bins, parse_constraint
from trifle.planning.context import TokenHistory
from trifle.planning.planner_settings import (
    MULTISTEP_VALUES,
    TRIFLE_METHODS,
    VALUE_THRESHOLDS,
    PlannerSettings,
    validate_config,
)
from trifle.planning.sampling import bin_values, column_masks


class CircuitProposal:
    """Eq. 2 with an adaptive value threshold (docs/paper.md#adaptive-threshold, docs/paper.md#released-proposal), for the first planning step.

    For action dimension i: p(a^i = c) ∝ p_GPT(a^i = c | ...) · p_PC(G in kept | s_t, a^{<i}, a^i = c),
    where G is the correction target (circuit_queries.CorrectionTarget: the return-to-go or V_t) and
    "kept" the top ``top_ratio`` of p_PC(G | s_t, a^{<i}) under the ``value_threshold`` rule
    (circuit_queries.kept_bins; weights, so the quantile level may count in part). After a^i is
    sampled the threshold distribution becomes the chosen candidate's p_PC(G | s_t, a^{<=i}): with the
    one-pass scores (circuit_queries.one_pass_scores) one query over the chosen rows, asked for lazily.

    Under an action constraint C (``soft``: the allowed bins as evidence, circuit_queries.constraint_evidence)
    every query also conditions on C, so a candidate scores p(V in kept | s_t, a^{<i}, a^i = c, C): the
    first dimensions are chosen knowing what the constraint on later ones does to the value, which an
    autoregressive model cannot do (paper §6.3). With ``constraint_lookahead`` the score is
    p(V in kept, C | s_t, a^{<i}, a^i = c) up to a factor that does not depend on c: the GPT's prior is
    also reweighted by how likely each candidate makes C, by the circuit's estimate.
    """

    def __init__(
        self,
        circuit,
        layout: WindowLayout,
        obs: torch.Tensor,
        top_ratio: float,
        target: int | CorrectionTarget,
        soft: torch.Tensor | None = None,
        value_threshold: str = VALUE_THRESHOLDS[0],
        fixed_threshold: float | None = None,
        fixed_keep: torch.Tensor | None = None,
        constraint_lookahead: bool = False,
    ):
        """``target``: what is thresholded (a CorrectionTarget), or an int, the number of value bins
        (the ``value`` target, V_t of the window's first transition). ``fixed_threshold``: None for the
        adaptive threshold, else the marginal quantile of a fixed one (circuit_queries.fixed_kept_levels);
        ``fixed_keep``: its kept levels if already known (they depend on the circuit and target only)."""
        self.circuit, self.layout, self.obs = circuit, layout, obs
        self.top_ratio, self.value_threshold = top_ratio, value_threshold
        self.fixed_threshold, self._fixed_keep = fixed_threshold, fixed_keep
        if not isinstance(target, CorrectionTarget):
            target = CorrectionTarget.value(layout.value_var(0), int(target))
        self.target = target
        self.soft, self.constraint_lookahead = soft, constraint_lookahead

    def begin(self, env_of_row: torch.Tensor) -> None:
        self.x, self.missing = self.layout.evidence(self.obs[env_of_row])
        self.val_probs = None  # p(G | s_t, a^{<i}): asked for when the adaptive threshold needs it

    def _value_probs(self) -> torch.Tensor:
        """p(G | s_t, a^{<i}) ``[B, L]``: the previous dimension's chosen candidate's distribution when
        the per-candidate path computed it, else one query over the rows' current evidence."""
        if self.val_probs is None:
            self.val_probs = self.target.distribution(self.circuit, self.x, self.missing, self.soft)
        return self.val_probs

    def fixed_keep(self) -> torch.Tensor:
        """The fixed threshold's kept levels ``[1, L]``, from the target's marginal p(G) with nothing
        observed (computed once per proposal: it does not depend on the state)."""
        if self._fixed_keep is None:
            x, missing = self.layout.evidence(self.obs[:1])
            missing[:] = True
            marginal = self.target.distribution(self.circuit, x, missing, None)[0]
            self._fixed_keep = fixed_kept_levels(marginal, self.fixed_threshold)[None, :]
        return self._fixed_keep

    def logits(self, dim: int, logp: torch.Tensor) -> torch.Tensor:
        if self.fixed_threshold is None:
            keep = kept_bins(self._value_probs(), self.top_ratio, self.value_threshold)
        else:
            keep = self.fixed_keep().expand(self.x.size(0), -1)
        var = self.layout.act_var(0, dim)
        scores, self.dists = candidate_scores(
            self.circuit,
            self.x,
            self.missing,
            var,
            logp.size(1),
            self.target,
            keep,
            self.soft,
            lookahead=self.constraint_lookahead,
        )
        corrected = logp.double() + scores.log()
        # A row where every GPT-supported candidate has zero circuit score keeps the GPT's proposal.
        dead = ~torch.isfinite(corrected).any(dim=-1, keepdim=True)
        return torch.where(dead, logp.double(), corrected)

    def chosen(self, dim: int, tokens: torch.Tensor) -> None:
        var = self.layout.act_var(0, dim)
        self.x[:, var], self.missing[:, var] = tokens, False
        # The one-pass scores (dists None) leave the chosen candidate's distribution to one query over
        # the chosen rows, made only if a next dimension asks for it.
        rows = torch.arange(tokens.size(0), device=tokens.device)
        self.val_probs = None if self.dists is None else self.dists[rows, tokens]


class CircuitValue:
    """m-Trifle's plan value: the circuit's expected return given s_t and the planned actions
    (Algorithm 3), in the form ``multistep_value`` (circuit_queries.expected_multistep_value)."""

    def __init__(
        self,
        circuit,
        obs: torch.Tensor,
        window: int,
        discount: float,
        discretizer: Discretizer,
        multistep_value: str = MULTISTEP_VALUES[0],
    ):
        self.circuit, self.obs, self.window = circuit, obs, window
        self.discount, self.discretizer, self.form = discount, discretizer, multistep_value

    def __call__(self, step: int, env_of_row: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor):
        return expected_multistep_value(
            self.circuit,
            self.obs[env_of_row],
            actions,
            window=self.window,
            discount=self.discount,
            discretizer=self.discretizer,
            form=self.form,
        )


def token_values(
    discretizer: Discretizer, *, obs_dim: int, act_dim: int, vocab_size: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each observation and action token's representative value (its bin's), ``[obs_dim, V+1]`` and
    ``[act_dim, V+1]`` (the stop token decodes to 0): how the Q-valued hooks read planned tokens."""
    table = [bin_values(c.values, vocab_size + 1) for c in discretizer.columns[: obs_dim + act_dim]]
    return torch.stack(table[:obs_dim]).to(device), torch.stack(table[obs_dim:]).to(device)


def decode_tokens(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``[R, n]`` of n columns -> their representative values ``[R, n]``, given :func:`token_values`."""
    return values.gather(1, tokens.long().T).T


class QFilter:
    """The Taxi ablation's "action filtering" (docs/evaluation.md#q-taxi): the first planning step's action
    prior reweighted by exp Q_taxi(s_t, a), i.e. logits log p_GPT(a | s_t) + Q(s_t, a) with Q in return
    units (temperature 1, the ablation's form). One discrete action column only; every other filter
    (``act_support``, ``cdf_act``, ``k_act``) acts as it does for TT, the support filter before it.

    ``obs`` are the current observations' tokens ``[E, obs_dim]``; ``table`` a
    :class:`trifle.models.tabular_q.TabularQ`; ``obs_values`` / ``act_values`` are :func:`token_values`.
    """

    def __init__(self, table, obs: torch.Tensor, obs_values: torch.Tensor, act_values: torch.Tensor):
        self.q_by_env = table.action_values(decode_tokens(obs_values, obs))  # [E, A]
        self.act_values = act_values[0]  # [V+1]: the action column's decoded values

    def begin(self, env_of_row: torch.Tensor) -> None:
        self.q = self.q_by_env[env_of_row]

    def logits(self, dim: int, logp: torch.Tensor) -> torch.Tensor:
        actions = self.act_values[: logp.size(1)].round().long().clamp(0, self.q.size(1) - 1)
        return logp.double() + self.q[:, actions.to(self.q.device)]

    def chosen(self, dim: int, tokens: torch.Tensor) -> None:
        pass


class CriticValue:
    """TT(+Q)'s plan value (docs/planning.md#ttq): TT's ``Σ_{h≤t} γ^h r_h + γ^{t+1} V_t`` with the last
    planned transition's GPT return ``r_t + γ V_t`` replaced by an offline critic's ``Q(s_t, a_t)``:

        value = Σ_{h<t} γ^h E[r_h] + γ^t Q(s_t, a_t)

    at planning step t, the rewards E[r_h] being the GPT's (as in TT) and s_t, a_t the plan's last
    state and action tokens decoded to environment values with the task's discretizer (each bin's
    representative). A plan whose s_t is the stop token (the GPT predicts that the episode ended
    before step t) gets Q = 0 there, as TT counts the stop token's reward and value as 0.

    ``critic.q_value(obs [R, obs_dim], actions [R, act_dim])`` returns Q in environment units (an
    :class:`trifle.models.iql.IQLCritic`, or any object with that method).
    """

    uses_state = True  # beam_search passes the last planned state's tokens (beam.PlanValue)

    def __init__(
        self,
        critic,
        discretizer: Discretizer,
        *,
        obs_dim: int,
        act_dim: int,
        vocab_size: int,
        discount: float,
        device: str | torch.device = "cpu",
    ):
        self.critic, self.discount, self.stop = critic, float(discount), int(vocab_size)
        self.obs_values, self.act_values = token_values(
            discretizer, obs_dim=obs_dim, act_dim=act_dim, vocab_size=vocab_size, device=device
        )

    def __call__(
        self,
        step: int,
        env_of_row: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        state: torch.Tensor,
    ) -> torch.Tensor:
        obs = decode_tokens(self.obs_values, state)
        act = decode_tokens(self.act_values, actions[:, step])
        q = self.critic.q_value(obs.float(), act.float()).to(rewards)
        q = torch.where((state == self.stop).any(dim=1), torch.zeros_like(q), q)
        weights = self.discount ** torch.arange(step, dtype=torch.float64, device=rewards.device)
        return rewards[:, :step] @ weights + self.discount**step * q


class BeamPlanner:
    """A :class:`trifle.planning.policy.Policy` that plans every step with TT's beam search."""

    def __init__(
        self,
        settings: PlannerSettings,
        model: TrajectoryGPT,
        discretizer: Discretizer,
        *,
        obs_dim: int,
        act_dim: int,
        discount: float,
        circuit=None,
        circuit_window: int = 1,
        constraint: Sequence[Bound] = (),
        device: str | torch.device = "cpu",
        critic=None,
        tabular_q=None,
    ):
        self.settings, self.model, self.discretizer = settings, model.eval(), discretizer
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.circuit, self.circuit_window, self.discount = circuit, circuit_window, discount
        self.device = torch.device(device)
        self.beam = settings.beam(discount)
        vocab = model.cfg.vocab_size
        # An action constraint: the allowed bins of each constrained dimension (the beam masks the others
        # at every planning step; Trifle's circuit also takes them as evidence).
        self.allowed = allowed_bins(discretizer, obs_dim, constraint)
        masks = column_masks(discretizer.num_bins, vocab, obs_dim, act_dim)
        for dim, bins in self.allowed.items():
            masks[obs_dim + dim, : len(bins)] &= torch.as_tensor(bins)
        self.spec = TokenSpec(
            obs_dim=obs_dim,
            act_dim=act_dim,
            masks=masks.to(self.device),
            reward_values=bin_values(discretizer.columns[-2].values, vocab + 1).to(self.device),
            value_values=bin_values(discretizer.columns[-1].values, vocab + 1).to(self.device),
            action_bins=tuple(int(n) for n in discretizer.num_bins[obs_dim : obs_dim + act_dim]),
        )
        self.history = TokenHistory(discretizer, obs_dim, act_dim, settings.max_context_transitions)
        self.generator: torch.Generator | None = None
        # TT(+Q): the plan's terminal value from an offline critic (None: the GPT's, as in TT).
        self.critic_value = None
        self.tabular_q = tabular_q
        self.fixed_keep: torch.Tensor | None = None  # a fixed threshold's kept levels, once known
        if settings.q_filter:  # decoded once: the Q filter reads the current state at every step
            self.token_values = token_values(
                discretizer, obs_dim=obs_dim, act_dim=act_dim, vocab_size=vocab, device=self.device
            )
        if settings.terminal_value in ("critic", "tabular_q"):
            self.critic_value = CriticValue(
                critic if settings.terminal_value == "critic" else tabular_q,
                discretizer,
                obs_dim=obs_dim,
                act_dim=act_dim,
                vocab_size=vocab,
                discount=discount,
                device=self.device,
            )

    def reset(self, num_envs: int, seed: int) -> None:
        self.history.reset(num_envs)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def _hooks(self, obs: torch.Tensor):
        method = self.settings.method
        if method == "tt":
            if not self.settings.q_filter:
                return None, self.critic_value
            return QFilter(self.tabular_q, obs, *self.token_values), self.critic_value
        layout = WindowLayout(self.obs_dim, self.act_dim, self.circuit_window, self.circuit.num_cats)
        value_bins = int(self.discretizer.num_bins[-1])
        soft = None
        if self.allowed:
            allowed = {d: torch.as_tensor(b) for d, b in self.allowed.items()}
            soft = constraint_evidence(layout, allowed).to(self.device)
        settings = self.settings
        if settings.correction_target == "return":
            target = CorrectionTarget.return_to_go(layout, self.discretizer, self.discount)
        else:
            target = CorrectionTarget.value(layout.value_var(0), value_bins)
        proposal = CircuitProposal(
            self.circuit,
            layout,
            obs,
            settings.top_ratio,
            target,
            soft,
            settings.value_threshold,
            settings.fixed_threshold,
            fixed_keep=self.fixed_keep,
            constraint_lookahead=settings.constraint_lookahead,
        )
        if settings.fixed_threshold is not None and self.fixed_keep is None:
            self.fixed_keep = (
                proposal.fixed_keep()
            )  # the marginal's levels: one query per planner, not per step
        if method == "trifle-s":
            return proposal, self.critic_value
        value = CircuitValue(
            self.circuit, obs, self.circuit_window, self.discount, self.discretizer, settings.multistep_value
        )
        return proposal, value

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        if self.generator is None:
            raise ConfigError("planner: call reset(num_envs, seed) before act()")
        env_ids = np.asarray(env_ids, np.int64).reshape(-1)
        self.history.observe(env_ids, obs)
        tokens = np.zeros((len(env_ids), self.act_dim), np.int64)
        for where, prefix, obs_tokens in self.history.prefix_groups(env_ids):
            obs_tokens = obs_tokens.to(self.device)
            proposal, value_fn = self._hooks(obs_tokens)
            first = beam_search(
                self.model,
                prefix.to(self.device),
                self.spec,
                self.beam,
                self.generator,
                proposal=proposal,
                value_fn=value_fn,
            )
            tokens[where] = first.cpu().numpy()
        columns = self.discretizer.columns[self.obs_dim : self.obs_dim + self.act_dim]
        return np.stack([c.values[tokens[:, i]] for i, c in enumerate(columns)], axis=1)

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        self.history.record(env_ids, actions, rewards)


def check_circuit(settings: PlannerSettings, *, circuit_window: int, has_circuit: bool) -> None:
    """A Trifle method needs a circuit, and trifle-m one whose window covers the horizon."""
    if settings.method in TRIFLE_METHODS and not has_circuit:
        raise ConfigError(
            f"planner.method={settings.method!r} needs a trained circuit, but none was given "
            "(circuit_path is None: run the train_pc stage)"
        )
    if settings.method == "trifle-m" and settings.horizon > circuit_window:
        raise ConfigError(
            f"planner.horizon={settings.horizon}: trifle-m scores plans with the circuit's window, "
            f"which must cover the horizon, but the circuit was trained with task.pc_window={circuit_window}"
        )


def check_critic(settings: PlannerSettings, *, has_critic: bool) -> None:
    """A critic-valued method (TT(+Q)) needs a critic."""
    if settings.terminal_value == "critic" and not has_critic:
        raise ConfigError(
            f"paths.critic: planner.terminal_value=critic (method {settings.name!r}) needs a trained critic, "
            "but none was given (run the train_critic stage)"
        )


def check_tabular_q(settings: PlannerSettings, tabular_q, *, act_dim: int) -> None:
    """A Q_taxi method (``q_filter`` or ``terminal_value: tabular_q``) needs the table, on one action column."""
    if not settings.needs_tabular_q:
        return
    if tabular_q is None:
        raise ConfigError(
            f"paths.labeled: method {settings.name!r} reads the data's tabular Q (planner.q_filter / "
            "terminal_value=tabular_q), learned from the labelled dataset, but none was given"
        )
    if act_dim != 1:
        raise ConfigError(
            f"planner: method {settings.name!r} uses a tabular Q, which needs one discrete action column; "
            f"this task has act_dim={act_dim}"
        )


def check_critic_fits(critic, discretizer: Discretizer, *, obs_dim: int, act_dim: int, name: str) -> None:
    """A critic (``cfg``: trifle.models.iql.CriticConfig) must take this task's observations and actions:
    the same dimensions and, for a discrete critic, every bin's value one of its categories."""
    from trifle.errors import CheckpointError

    cfg = getattr(critic, "cfg", None)
    if cfg is None:  # an in-memory stand-in (tests): nothing to check
        return
    if (cfg.obs_dim, cfg.act_dim) != (obs_dim, act_dim):
        raise CheckpointError(
            f"{name}: the critic takes obs_dim={cfg.obs_dim}, act_dim={cfg.act_dim}, but the tokens have "
            f"obs_dim={obs_dim}, act_dim={act_dim} (a critic trained on another dataset)"
        )
    if not cfg.discrete:
        return
    limits = [*cfg.obs_cardinalities, cfg.num_actions]
    for column, limit in zip(discretizer.columns[: obs_dim + act_dim], limits, strict=True):
        values = np.asarray(column.values, np.float64)
        if np.any(values != np.round(values)) or np.any(values < 0) or np.any(values >= limit):
            raise CheckpointError(
                f"{name}: the critic's categories are 0..{limit - 1}, but the discretizer's bins decode to "
                f"{values.tolist()} (a critic trained on another dataset)"
            )


def check_context(
    settings: PlannerSettings,
    *,
    block_size: int,
    transition_dim: int,
    obs_dim: int,
    gpt_name: str = "the GPT",
) -> None:
    """The prefix (context transitions + current observation) must fit the GPT's trained block.

    A plan may run past the block: the search then crops the oldest transitions as TT does
    (trifle.planning.beam), but context that would be cropped before planning even starts is a
    configuration mistake, not a choice.
    """
    needed = settings.max_context_transitions * transition_dim + obs_dim + 1
    if needed > block_size:
        raise ConfigError(
            f"planner.max_context_transitions={settings.max_context_transitions}: the prefix and the first "
            f"action token need {needed} tokens, but {gpt_name} was trained on block_size={block_size} "
            f"({block_size // transition_dim} transitions); lower it"
        )


def make_planner(
    planner_cfg: Mapping[str, Any],
    *,
    model: TrajectoryGPT,
    discretizer: Discretizer,
    obs_dim: int,
    act_dim: int,
    discount: float,
    circuit=None,
    circuit_window: int = 1,
    constraint: Sequence[Mapping[str, Any]] | None = None,
    device: str | torch.device = "cpu",
    critic=None,
    tabular_q=None,
) -> BeamPlanner:
    """A planner from in-memory models (``build_planner`` loads them from checkpoints first).

    ``constraint`` is the task's ``action_constraint``; only a ``constrained`` planner enforces it.
    """
    settings = validate_config(planner_cfg)
    bounds = constraint_bounds(settings, constraint, act_dim)
    if not 0.0 <= float(discount) <= 1.0:
        raise ConfigError(f"task.labels.discount: expected a number in [0, 1], got {discount!r}")
    dim = obs_dim + act_dim + 2
    check_circuit(settings, circuit_window=circuit_window, has_circuit=circuit is not None)
    check_critic(settings, has_critic=critic is not None)
    if settings.terminal_value == "critic":
        check_critic_fits(critic, discretizer, obs_dim=obs_dim, act_dim=act_dim, name="critic")
    check_tabular_q(settings, tabular_q, act_dim=act_dim)
    check_context(settings, block_size=model.cfg.block_size, transition_dim=dim, obs_dim=obs_dim)
    if settings.method in TRIFLE_METHODS and circuit.num_vars != circuit_window * dim:
        raise ConfigError(
            f"task.pc_window={circuit_window}: expects a circuit over {circuit_window * dim} variables, "
            f"the circuit has {circuit.num_vars}"
        )
    return BeamPlanner(
        settings,
        model.to(device),
        discretizer,
        obs_dim=obs_dim,
        act_dim=act_dim,
        discount=float(discount),
        circuit=circuit if settings.method in TRIFLE_METHODS else None,
        circuit_window=circuit_window,
        constraint=bounds,
        device=device,
        critic=critic if settings.terminal_value == "critic" else None,
        tabular_q=tabular_q if settings.needs_tabular_q else None,
    )


def constraint_bounds(
    settings: PlannerSettings, constraint: Sequence[Mapping[str, Any]] | None, act_dim: int
) -> list[Bound]:
    """The bounds a planner enforces: the task's constraint when the method is constrained, else none."""
    if not settings.constrained:
        return []
    bounds = parse_constraint(constraint, act_dim)
    if not bounds:
        raise ConfigError(
            f"planner.constrained=true (method {settings.name!r}) but task.action_constraint is empty: "
            "expected a list of {dim, low, high} entries"
        )
    return bounds


def build_planner(
    planner_cfg: Mapping[str, Any],
    *,
    gpt_path: str,
    circuit_path: str | None,
    tokens: TokenData,
    circuit_window: int,
    discount: float,
    constraint: Sequence[Mapping[str, Any]] | None = None,
    device: str = "cpu",
    critic_path: str | None = None,
    tabular_q=None,
    tokens_path: str | None = None,
    gpt_cfg: Mapping[str, Any] | None = None,
) -> BeamPlanner:
    """Validate the config, load the checkpoints (checking they fit ``tokens``) and build the planner.

    Every failure happens here, before any rollout: bad keys (ConfigError naming ``planner.<key>``),
    a plan longer than the GPT's context, a missing circuit or one whose window is too short, and
    checkpoints trained on other data or, given ``gpt_cfg``, with another architecture (CheckpointError
    from load_checked_gpt / load_circuit; ``tokens_path`` names the token file in those messages).
    """
    from trifle.data.circuit_windows import circuit_num_cats
    from trifle.models.circuits import load_circuit
    from trifle.models.gpt_checkpoint import load_checked_gpt

    settings = validate_config(planner_cfg)
    dim = tokens.transition_dim
    needs_circuit = settings.method in TRIFLE_METHODS
    check_circuit(settings, circuit_window=circuit_window, has_circuit=circuit_path is not None)
    check_critic(settings, has_critic=bool(critic_path))
    model, _ = load_checked_gpt(
        gpt_path, tokens=tokens, tokens_path=tokens_path, gpt_cfg=gpt_cfg, device=device
    )
    check_context(
        settings,
        block_size=model.cfg.block_size,
        transition_dim=dim,
        obs_dim=tokens.obs_dim,
        gpt_name=f"the GPT {gpt_path}",
    )
    circuit = None
    if needs_circuit:
        circuit = load_circuit(
            circuit_path,
            backend="torch" if torch.device(device).type == "cpu" else "auto",
            device=device,
            expect_num_vars=circuit_window * dim,
            expect_num_cats=circuit_num_cats(tokens.vocab_size, circuit_window),
        )
    critic = None
    if settings.terminal_value == "critic":
        from trifle.models.iql_training import load_critic

        critic, _ = load_critic(
            critic_path,
            expect={"obs_dim": tokens.obs_dim, "act_dim": tokens.act_dim, "discount": float(discount)},
            device=device,
        )
        check_critic_fits(
            critic, tokens.discretizer, obs_dim=tokens.obs_dim, act_dim=tokens.act_dim, name=str(critic_path)
        )
    return make_planner(
        planner_cfg,
        model=model,
        discretizer=tokens.discretizer,
        obs_dim=tokens.obs_dim,
        act_dim=tokens.act_dim,
        discount=discount,
        circuit=circuit,
        circuit_window=circuit_window,
        constraint=constraint,
        device=device,
        critic=critic,
        tabular_q=tabular_q,
    )


def beam_policies(cfg: Mapping[str, Any], device: str) -> list[tuple[None, BeamPlanner]]:
    """The registry's policy function of the beam planners (tt, trifle-s, trifle-m and their constrained
    variants): one planner, no conditioning target, from ``paths.tokens``, ``paths.gpt``, (Trifle)
    ``paths.pc`` and (``terminal_value: critic``, TT(+Q)) ``paths.critic``."""
    from trifle.data.tokens import load_tokens

    planner, paths = cfg["planner"], cfg["paths"]
    settings = validate_config(planner)
    critic_path = paths.get("critic") if settings.terminal_value == "critic" else None
    check_critic(settings, has_critic=bool(critic_path))  # before any file is read
    if settings.needs_tabular_q and not paths.get("labeled"):
        check_tabular_q(settings, None, act_dim=1)
    tokens = load_tokens(paths["tokens"])
    check_env_dims(cfg["task"]["env"], tokens.obs_dim, tokens.act_dim, paths["tokens"])
    tabular_q = None
    if settings.needs_tabular_q:
        from trifle.data.labels import load_labeled
        from trifle.models.tabular_q import TabularQ

        labeled = load_labeled(paths["labeled"])
        tabular_q = TabularQ.fit(labeled, cfg["task"]["labels"]["discount"], source=str(paths["labeled"]))
    policy = build_planner(
        planner,
        gpt_path=paths["gpt"],
        circuit_path=paths.get("pc") if planner["method"] in TRIFLE_METHODS else None,
        tokens=tokens,
        circuit_window=cfg["task"]["pc_window"],
        discount=cfg["task"]["labels"]["discount"],
        constraint=cfg["task"]["action_constraint"],
        device=device,
        critic_path=critic_path,
        tabular_q=tabular_q,
        tokens_path=paths["tokens"],
        gpt_cfg=cfg.get("gpt"),
    )
    return [(None, policy)]


def check_env_dims(env_name: str, obs_dim: int, act_dim: int, path: str) -> None:
    """A model trained on another Gym-MuJoCo environment's data must not be rolled out in this one."""
    from trifle.envs.mujoco import MUJOCO_ENVS, VectorMujocoEnv
    from trifle.errors import CheckpointError

    if env_name not in MUJOCO_ENVS:
        return
    env = VectorMujocoEnv(env_name, 1, 0)
    env.close()
    if (obs_dim, act_dim) != (env.obs_dim, env.act_dim):
        raise CheckpointError(
            f"{path}: data has obs_dim={obs_dim}, act_dim={act_dim}, but task.env="
            f"{env_name!r} has obs_dim={env.obs_dim}, act_dim={env.act_dim}"
        )
