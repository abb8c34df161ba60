"""``trifle-dt``: DT-based Trifle (docs/paper.md#gpt, docs/paper.md#dt-baseline; docs/dt.md#dt-based-trifle).

The paper combines the circuit's correction with DT's action distribution p_DT(a_t | context), with
neither rejection sampling nor beam search (Appx F.1): DT is the proposal, and s-Trifle's per-dimension
correction reweights it. On the toy tasks DT's action head is a softmax over the task's ``num_actions``
categories, which are exactly the circuit's action tokens (one categorical action column), so

    p(a | context) ∝ p_DT(a | R, s, ...) · p_PC(G_t in the top ``top_ratio`` mass | s_t, a_t = a)

with s-Trifle's own correction target G_t (``correction_target``), threshold rule (``value_threshold``)
and ``top_ratio``, computed by the very object s-Trifle uses (:class:`~trifle.planning.planners.
CircuitProposal`); the action is then drawn from it, or its argmax taken, per DT's ``sample`` setting.
Every DT conditioning target gives one policy, rolled out on the same episodes, as for ``dt``.

Continuous actions (Gym-MuJoCo) are refused: DT's head there is a deterministic tanh regression
trained with a squared error, which is no distribution over the circuit's action bins to correct
(docs/dt.md#dt-based-trifle says why the obvious Gaussian reading was not adopted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trifle.data.discretize import Discretizer
from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models.dt import DecisionTransformer
from trifle.planning.circuit_queries import CorrectionTarget, WindowLayout
from trifle.planning.dt_policy import DTPolicy
from trifle.planning.dt_targets import dt_target_returns
from trifle.planning.dt_trifle_settings import DTTrifleSettings, validate_settings
from trifle.planning.planners import CircuitProposal

# The settings (DTTrifleSettings, validate_settings; KEYS and validate_planner too) are defined in the
# torch-free dt_trifle_settings, which the method registry's config check imports.


def check_task(task: Mapping[str, Any]) -> None:
    """DT-based Trifle corrects a categorical action distribution: refuse continuous-action tasks."""
    if task["discretizer"]["actions"] != "categorical":
        raise ConfigError(
            f"task={task['name']}: DT-based Trifle (planner trifle-dt) needs DT's action distribution "
            f"to be categorical over the circuit's action tokens, but this task's actions are continuous "
            f"(task.discretizer.actions={task['discretizer']['actions']}): DT's head there is a "
            "deterministic tanh regression trained with a squared error, which gives no distribution over "
            "the circuit's action bins to correct (docs/dt.md#dt-based-trifle); use trifle-dt on the "
            "discrete-action tasks (Taxi, FrozenLake)"
        )
    discount = task["labels"]["discount"]
    if not (isinstance(discount, (int, float)) and 0.0 <= float(discount) <= 1.0):
        raise ConfigError(f"task.labels.discount: expected a number in [0, 1], got {discount!r}")


@dataclass
class DTCorrection:
    """s-Trifle's correction of one action dimension, applied to DT's distribution over its categories.

    ``token_of_category[k]`` is the circuit's action token of DT's category k (a permutation: DT's k-th
    logit is the raw action k, the token is the action column's encoding of it). ``obs_columns`` encode
    raw observations into the circuit's state evidence.
    """

    circuit: Any
    layout: WindowLayout
    target: CorrectionTarget
    top_ratio: float
    value_threshold: str
    obs_columns: list
    obs_names: list[str]
    token_of_category: torch.Tensor

    @classmethod
    def build(
        cls,
        circuit,
        discretizer: Discretizer,
        *,
        obs_dim: int,
        num_actions: int,
        circuit_window: int,
        discount: float,
        settings: DTTrifleSettings,
        source: str = "the token file",
    ) -> DTCorrection:
        """The correction for DT's ``num_actions`` categories, from the task's discretizer (checked: one
        categorical action column holding exactly DT's categories ``0..num_actions-1``)."""
        column = discretizer.columns[obs_dim]
        if len(discretizer.columns) != obs_dim + 3 or column.kind != "categorical":
            raise CheckpointError(
                f"{source}: DT-based Trifle needs one categorical action column after {obs_dim} observation "
                f"columns; found columns {discretizer.names} (action kind {column.kind!r})"
            )
        try:
            tokens = column.encode(np.arange(num_actions), discretizer.names[obs_dim])
        except DataError as exc:
            raise CheckpointError(
                f"{source}: DT's actions 0..{num_actions - 1} are not its action categories ({exc})"
            ) from exc
        if column.num_bins != num_actions or len(set(tokens.tolist())) != num_actions:
            raise CheckpointError(
                f"{source}: the action column has categories {column.values.tolist()}, DT predicts "
                f"{num_actions} actions 0..{num_actions - 1}: they must be the same set"
            )
        layout = WindowLayout(obs_dim, 1, circuit_window, circuit.num_cats)
        if settings.correction_target == "return":
            target = CorrectionTarget.return_to_go(layout, discretizer, discount)
        else:
            target = CorrectionTarget.value(layout.value_var(0), int(discretizer.num_bins[-1]))
        return cls(
            circuit=circuit,
            layout=layout,
            target=target,
            top_ratio=settings.top_ratio,
            value_threshold=settings.value_threshold,
            obs_columns=discretizer.columns[:obs_dim],
            obs_names=discretizer.names[:obs_dim],
            token_of_category=torch.as_tensor(tokens, dtype=torch.long),
        )

    def obs_tokens(self, obs: np.ndarray) -> np.ndarray:
        """``[B, obs_dim]`` raw observations -> the circuit's state tokens."""
        obs = np.asarray(obs, np.float64).reshape(-1, len(self.obs_columns))
        columns = zip(self.obs_columns, self.obs_names, strict=True)
        return np.stack([c.encode(obs[:, j], name) for j, (c, name) in enumerate(columns)], axis=1)

    def log_scores(self, obs_tok: torch.Tensor) -> torch.Tensor:
        """log p_PC(G_t in kept | s_t, a_t = c) ``[B, n]`` for every action token c (token order), given
        the state tokens ``[B, obs_dim]``: :class:`CircuitProposal`'s correction of the first action
        dimension, read off as its logits for a flat proposal. A state where every action scores 0 gets
        0 everywhere (no correction)."""
        proposal = CircuitProposal(
            self.circuit,
            self.layout,
            obs_tok,
            self.top_ratio,
            self.target,
            soft=None,
            value_threshold=self.value_threshold,
        )
        proposal.begin(torch.arange(len(obs_tok), device=obs_tok.device))
        flat = torch.zeros(
            len(obs_tok), len(self.token_of_category), dtype=torch.float64, device=obs_tok.device
        )
        return proposal.logits(0, flat)

    def log_probs(
        self, obs: np.ndarray, dt_logits: torch.Tensor, memo: dict[tuple, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """log p(a | ...) ``[B, num_actions]`` (float64, normalised), in DT's category order: DT's
        softmax times the circuit's score p_PC(G in kept | s, a), renormalised.

        The score depends on the state alone (the circuit sees s_t only, as in s-Trifle), so ``memo``
        (a dict, optional) keeps each distinct state's scores: the circuit is asked once per state.
        As in :meth:`CircuitProposal.logits`, a row whose every DT-supported action scores 0 keeps DT's
        distribution.
        """
        device = self.token_of_category.device
        if len(dt_logits) == 0:
            return torch.log_softmax(dt_logits.double(), dim=-1).cpu()
        obs_tok = torch.as_tensor(self.obs_tokens(obs), dtype=torch.long, device=device)
        if memo is None:
            scores = self.log_scores(obs_tok)
        else:
            keys = [tuple(row) for row in obs_tok.tolist()]
            new = [k for k in dict.fromkeys(keys) if k not in memo]
            if new:
                fresh = self.log_scores(torch.tensor(new, dtype=torch.long, device=device))
                memo.update(zip(new, fresh, strict=True))
            scores = torch.stack([memo[k] for k in keys])
        logp = torch.log_softmax(dt_logits.double().to(device), dim=-1)
        corrected = logp + scores[:, self.token_of_category]
        dead = ~torch.isfinite(corrected).any(dim=-1, keepdim=True)
        return torch.log_softmax(torch.where(dead, logp, corrected), dim=-1).cpu()

    def to(self, device: str | torch.device) -> DTCorrection:
        self.token_of_category = self.token_of_category.to(device)
        return self


class DTTriflePolicy(DTPolicy):
    """DT's policy whose categorical action distribution is corrected by the circuit before the action
    is drawn (``sample``: with each environment's own generator, as DT) or its argmax taken."""

    def __init__(
        self,
        model: DecisionTransformer,
        checkpoint_meta: Mapping[str, Any],
        target_return: float,
        device: str | torch.device = "cpu",
        *,
        sample: bool,
        correction: DTCorrection,
    ) -> None:
        super().__init__(model, checkpoint_meta, target_return, device, sample=sample)
        if not self.cfg.discrete:
            raise ConfigError(
                "DT-based Trifle: the DT has a continuous action head; no distribution to correct"
            )
        if len(correction.token_of_category) != self.cfg.num_actions:
            raise ConfigError(
                f"DT-based Trifle: the correction covers {len(correction.token_of_category)} actions, the DT "
                f"predicts {self.cfg.num_actions}"
            )
        self.correction = correction
        self._scores: dict[tuple, torch.Tensor] = {}  # the circuit's scores of each state seen

    def reset(self, num_envs: int, seed: int) -> None:
        """DT's reset; the memo of the circuit's scores starts empty, so a rollout never depends on
        which states earlier rollouts (e.g. other targets) queried together."""
        super().reset(num_envs, seed)
        self._scores = {}

    def action_log_probs(self, obs: np.ndarray, dt_logits: torch.Tensor) -> torch.Tensor:
        """The corrected distribution the policy acts from, for DT's ``[B, num_actions]`` logits."""
        return self.correction.log_probs(obs, dt_logits, self._scores)

    def _choose(self, ids: np.ndarray, obs: np.ndarray, out: torch.Tensor) -> np.ndarray:
        return super()._choose(ids, obs, self.action_log_probs(obs, out))


def dt_trifle_policies(cfg: Mapping[str, Any], device: str) -> list[tuple[float, DTTriflePolicy]]:
    """The registry's policy function of ``trifle-dt``: one policy per DT conditioning target, sharing
    the DT ``paths.dt``, the circuit ``paths.pc`` and the discretizer of ``paths.tokens`` (loaded once).

    Every setting is checked before anything is loaded (ConfigError naming ``planner.<key>``, or the
    task when its actions are continuous); a DT or circuit that does not fit the token file is a
    CheckpointError naming the file.
    """
    from trifle.data.circuit_windows import circuit_num_cats
    from trifle.data.tokens import load_tokens
    from trifle.models.circuits import load_circuit
    from trifle.models.dt_training import load_dt

    settings = validate_settings(cfg["planner"])
    targets = dt_target_returns(cfg)
    task, paths = cfg["task"], cfg["paths"]
    check_task(task)
    window = task["pc_window"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"task.pc_window: expected an integer >= 1, got {window!r}")
    for key in ("tokens", "dt", "pc"):
        if not paths.get(key):
            raise ConfigError(f"paths.{key}: DT-based Trifle needs it (registry needs: tokens, dt, pc)")

    tokens = load_tokens(paths["tokens"])
    num_actions = int(tokens.discretizer.num_bins[tokens.obs_dim])
    expect = {"obs_dim": tokens.obs_dim, "act_dim": tokens.act_dim, "num_actions": num_actions}
    model, meta = load_dt(paths["dt"], expect=expect, device=device)
    data = meta.get("data", {})
    rows, episodes = len(tokens.tokens), len(tokens.episode_starts)
    if (data.get("rows"), data.get("episodes")) != (rows, episodes):
        raise CheckpointError(
            f"{paths['dt']}: trained on {data.get('rows')} steps in {data.get('episodes')} episodes, but "
            f"{paths['tokens']} holds {rows} steps in {episodes} episodes: other data"
        )
    dim = tokens.transition_dim
    circuit = load_circuit(
        paths["pc"],
        backend="torch" if torch.device(device).type == "cpu" else "auto",
        device=device,
        expect_num_vars=window * dim,
        expect_num_cats=circuit_num_cats(tokens.vocab_size, window),
    )
    correction = DTCorrection.build(
        circuit,
        tokens.discretizer,
        obs_dim=tokens.obs_dim,
        num_actions=num_actions,
        circuit_window=window,
        discount=float(task["labels"]["discount"]),
        settings=settings,
        source=str(paths["tokens"]),
    ).to(device)
    return [
        (t, DTTriflePolicy(model, meta, t, device, sample=settings.sample, correction=correction))
        for t in targets
    ]
