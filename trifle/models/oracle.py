"""Exact tabular "oracle" models of a token dataset: empirical counts in place of the GPT and the circuit.

The planners (trifle.planning) only ask the GPT for next-token distributions and the circuit for
conditionals, so models that answer those questions with the *data's own* empirical distribution test
the planners' semantics apart from learning: whatever a planner does with them is what it would do with
perfectly trained models of this dataset.

:class:`TabularGPT` (duck type of :class:`~trifle.models.gpt.TrajectoryGPT` as the planners use it)
    Next-token distribution = empirical conditional counts of the GPT's training stream (episodes'
    transitions ``s^1..s^n a^1..a^m r V``; after a terminal transition, a transition of stop tokens
    and another after it; a timed-out episode's last transition has no successor) given

    * for an action, reward or value token: the tokens of the current transition so far;
    * for an observation token: the current transition's observation tokens so far and the previous
      transition's tokens ``(s, a, r, V)`` (Markov in the previous transition; after a terminal
      transition, and after a transition of stop tokens, the next tokens are stop).

    **Back-off for unseen contexts.** The context is read as a sequence (current transition's tokens so
    far, then, for an observation token, the previous transition's ``s..., a..., r, V``) and, if the data
    never contains it, its *last* token is dropped until a context the data contains remains (for an
    observation: the previous V first, then r, the actions, the previous observation, then the current
    observation tokens from the last one; in the limit the column's marginal). Without a previous
    transition (the window starts at the current one) an observation token is predicted from the
    current observation tokens alone, over all transitions (episode starts included).
    **Smoothing**: ``p(tok | ctx) = (n(ctx, tok) + α / (vocab_size + 1)) / (n(ctx) + α)``, ``α = smoothing``
    (default 1e-6), so no row of log-probabilities is ever all -inf (e.g. the action after a predicted
    stop token, which the data never shows, is then uniform) while seen contexts keep their counts up to
    a relative 1e-6. ``smoothing=0`` gives the raw counts (tokens never seen in a context get -inf).

    The "KV cache" is a :class:`TokenCache` that keeps the tokens of the previous and current
    transitions; ``log_prob_next`` accepts it, ``None``, or an empty
    :class:`~trifle.models.gpt.KVCache` (as ``GPTStream`` passes when it (re)starts a cache).

:class:`EmpiricalCircuit` (duck type of the circuits' ``conditional`` / ``num_vars`` / ``num_cats``)
    The empirical distribution of the circuit's training windows (trifle.data.circuit_windows: K
    consecutive transitions, pad category ``vocab_size`` after a terminal when K > 1). With the same
    semantics as :meth:`TorchCircuit.conditional <trifle.models.circuits.TorchCircuit.conditional>`:
    targets are treated as missing; a window's weight is 1 if it matches every observed (not missing)
    variable, times ``soft[v, w_v]`` over every missing variable v (targets included) when soft
    evidence is given; ``p(X_t = c | evidence)`` = weighted count of windows with ``w_t = c`` /
    total weight. **Zero evidence** (no window matches): by default the evidence is *backed off*, the
    observed variable where the best-matching windows first diverge becoming "not pad" (so a planned
    action the data never takes after the plan so far becomes "the data's own action", as m-Trifle's
    survival form itself does with a circuit that gives no answer); ``zero_evidence="uniform"`` answers
    ``f``, uniform over the target's categories seen in the data, and ``"zeros"`` an all-zero row (what
    trifle.planning.circuit_queries reads as "no answer"). Never NaN. An optional ``pseudocount`` α
    blends every answer with ``f``: ``(mass_c + α f_c) / (total + α)``. Windows are indexed by the
    first transition's observation tokens, so a query with ``s_0`` observed (every planner query) only
    scans the windows of its state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from trifle.data.circuit_windows import circuit_num_cats, token_windows
from trifle.data.tokens import TokenData
from trifle.errors import DataError
from trifle.models.gpt import GPTConfig

__all__ = ["ZERO_EVIDENCE", "EmpiricalCircuit", "PrefixCounts", "TabularGPT", "TokenCache", "select_episodes"]


# ----------------------------------------------------------------------------------------------- GPT
class PrefixCounts:
    """Counts of the token that follows every prefix of a set of token sequences (a prefix tree).

    ``seqs [M, L]`` (tokens in ``0..radix-1``), ``lengths [M]`` (row m uses ``seqs[m, :lengths[m]]``)
    and ``targets [M]``. Node ``(d, i)`` is a distinct prefix of length d; its counts are those of the
    targets of the rows that start with it. :meth:`lookup` finds the longest stored prefix of a query.
    """

    def __init__(self, seqs: np.ndarray, lengths: np.ndarray, targets: np.ndarray, radix: int):
        seqs = np.asarray(seqs, np.int64).reshape(len(targets), -1)
        lengths, targets = np.asarray(lengths, np.int64), np.asarray(targets, np.int64)
        self.radix = int(radix)
        self.children: list[np.ndarray] = []  # depth d >= 1: sorted keys parent * radix + token
        self.counts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        node = np.zeros(len(targets), np.int64)
        self.counts.append(self._csr(node, targets, 1))
        active = np.ones(len(targets), bool)
        for d in range(1, seqs.shape[1] + 1):
            active &= lengths >= d
            if not active.any():
                break
            key = node[active] * self.radix + seqs[active, d - 1]
            uniq, inverse = np.unique(key, return_inverse=True)
            self.children.append(uniq)
            node = np.full(len(targets), -1, np.int64)
            node[active] = inverse.reshape(-1)
            self.counts.append(self._csr(node[active], targets[active], len(uniq)))

    def _csr(self, node: np.ndarray, targets: np.ndarray, num_nodes: int):
        """(ptr [n+1], tokens, counts, totals [n]) of the targets of each node."""
        uniq, cnt = np.unique(node * self.radix + targets, return_counts=True)
        owner = uniq // self.radix
        ptr = np.searchsorted(owner, np.arange(num_nodes + 1))
        totals = np.bincount(node, minlength=num_nodes).astype(np.float64)
        return ptr, uniq % self.radix, cnt.astype(np.float64), totals

    def lookup(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(depth [B], node [B]) of the longest stored prefix of each query row ``seqs [B, L]``."""
        b, length = seqs.shape
        node, depth = np.zeros(b, np.int64), np.zeros(b, np.int64)
        alive = np.ones(b, bool)
        for d in range(1, min(length, len(self.children)) + 1):
            keys = self.children[d - 1]
            key = node * self.radix + seqs[:, d - 1]
            pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            alive &= keys[pos] == key
            if not alive.any():
                break
            node, depth = np.where(alive, pos, node), np.where(alive, d, depth)
        return depth, node

    def probs(self, seqs: np.ndarray, smoothing: float) -> np.ndarray:
        """``[B, radix]`` next-token probabilities after each row of ``seqs`` (back-off + smoothing)."""
        depth, node = self.lookup(np.asarray(seqs, np.int64))
        b = len(depth)
        counts = np.zeros((b, self.radix))
        totals = np.zeros(b)
        for d in np.unique(depth):
            rows = np.flatnonzero(depth == d)
            ptr, tokens, cnt, tot = self.counts[d]
            nodes = node[rows]
            start, stop = ptr[nodes], ptr[nodes + 1]
            lens = stop - start
            rep = np.repeat(rows, lens)
            flat = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(start, lens)
            counts[rep, tokens[flat]] = cnt[flat]
            totals[rows] = tot[nodes]
        counts += smoothing / self.radix
        totals += smoothing
        empty = totals <= 0  # no data at all (and no smoothing): uniform
        counts[empty], totals[empty] = 1.0, float(self.radix)
        return counts / totals[:, None]


class TokenCache:
    """The oracle GPT's cache: the fed tokens of the previous and current transitions (the model is
    Markov in the previous transition, so nothing else is needed). ``tokens [B, n]`` hold the absolute
    positions ``offset .. offset + n - 1``; ``offset`` is a multiple of the transition size."""

    def __init__(self, tokens: torch.Tensor, offset: int = 0):
        self.tokens, self.offset = tokens, int(offset)

    @property
    def length(self) -> int:
        """Absolute position of the next token."""
        return self.offset + self.tokens.size(1)

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def trimmed(self, transition_dim: int) -> TokenCache:
        keep_from = max(self.offset, (self.length // transition_dim - 1) * transition_dim)
        return TokenCache(self.tokens[:, keep_from - self.offset :], keep_from)

    def select(self, rows: torch.Tensor) -> TokenCache:
        return TokenCache(self.tokens[rows.to(self.tokens.device)], self.offset)

    def repeat_interleave(self, n: int) -> TokenCache:
        return TokenCache(self.tokens.repeat_interleave(n, dim=0), self.offset)


class TabularGPT(nn.Module):
    """Empirical next-token model of a token dataset, usable wherever the planners take a TrajectoryGPT.

    See the module docstring for the contexts, the back-off and the smoothing. ``cfg`` is a
    :class:`~trifle.models.gpt.GPTConfig` (only ``obs_dim``, ``act_dim``, ``vocab_size``,
    ``block_size``, ``transition_dim`` and ``stop_token`` mean anything); ``block_size`` defaults to 10
    transitions and only matters for the planners' context checks and cropping (the model itself needs
    just the previous transition).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        episode_starts: np.ndarray,
        episode_terminal: np.ndarray,
        *,
        obs_dim: int,
        act_dim: int,
        vocab_size: int,
        smoothing: float = 1e-6,
        block_size: int | None = None,
    ):
        super().__init__()
        dim = obs_dim + act_dim + 2
        self.cfg = GPTConfig(
            obs_dim=int(obs_dim),
            act_dim=int(act_dim),
            vocab_size=int(vocab_size),
            block_size=int(block_size or 10 * dim),
            dropout=0.0,
        )
        if not float(smoothing) >= 0.0:
            raise ValueError(f"smoothing: expected a number >= 0, got {smoothing!r}")
        self.smoothing = float(smoothing)
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != dim:
            raise DataError(f"tokens: expected shape [N, {dim}], got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise DataError(f"tokens: expected values in [0, {vocab_size}) (the stop token is added here)")
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)
        self.columns = self._fit(tokens, np.asarray(episode_starts, np.int64), np.asarray(episode_terminal))

    @classmethod
    def from_tokens(
        cls,
        data: TokenData,
        *,
        episode_ids: Sequence[int] | np.ndarray | None = None,
        smoothing: float = 1e-6,
        block_size: int | None = None,
    ) -> TabularGPT:
        """The oracle GPT of a token file's episodes (all of them, or ``episode_ids``)."""
        tokens, starts, terminal = select_episodes(data, episode_ids)
        return cls(
            tokens,
            starts,
            terminal,
            obs_dim=data.obs_dim,
            act_dim=data.act_dim,
            vocab_size=data.vocab_size,
            smoothing=smoothing,
            block_size=block_size,
        )

    def _fit(self, tokens: np.ndarray, starts: np.ndarray, terminal: np.ndarray) -> list[PrefixCounts]:
        cfg = self.cfg
        dim, stop, radix, n_obs = cfg.transition_dim, cfg.stop_token, cfg.vocab_size + 1, cfg.obs_dim
        num_rows = len(tokens)
        ends = np.append(starts[1:], num_rows)
        first = np.zeros(num_rows, bool)
        first[starts] = True
        stop_row = np.full((1, dim), stop, np.int64)
        last_terminal = ends[np.asarray(terminal, bool)] - 1  # last rows followed by stop transitions
        n_stop = len(last_terminal)
        # Every transition of the stream: data rows, then one stop transition per terminal episode.
        current = np.concatenate([tokens, np.repeat(stop_row, n_stop, 0)])
        # Its predecessor (if any): the previous data row, the terminal row before a stop transition.
        prev_index = np.arange(num_rows) - 1
        previous = np.concatenate([tokens[np.maximum(prev_index, 0)], tokens[last_terminal]])
        has_prev = np.concatenate([~first, np.ones(n_stop, bool)])
        # A stop transition also follows a stop transition (the stream stays stopped).
        current = np.concatenate([current, np.repeat(stop_row, n_stop, 0)])
        previous = np.concatenate([previous, np.repeat(stop_row, n_stop, 0)])
        has_prev = np.concatenate([has_prev, np.ones(n_stop, bool)])
        columns = []
        for c in range(dim):
            if c < n_obs:
                seqs = np.concatenate([current[:, :c], previous], axis=1)
                lengths = c + dim * has_prev
            else:
                seqs, lengths = current[:, :c], np.full(len(current), c)
            columns.append(PrefixCounts(seqs, lengths, current[:, c], radix))
        return columns

    # ------------------------------------------------------------------------------ model interface
    def _context(self, seq: np.ndarray, offset: int, position: int) -> tuple[int, np.ndarray]:
        """(column, context rows) of the token at absolute ``position`` given ``seq`` from ``offset``."""
        dim = self.cfg.transition_dim
        column, begin = position % dim, position - position % dim
        context = seq[:, begin - offset : position - offset]
        if column < self.cfg.obs_dim and begin - dim >= offset:
            context = np.concatenate([context, seq[:, begin - dim - offset : begin - offset]], axis=1)
        return column, context

    def _run(self, idx: torch.Tensor, cache, start: int | None, last_only: bool):
        if idx.dim() != 2:
            raise ValueError(f"idx: expected [B, T] tokens, got shape {tuple(idx.shape)}")
        batch, length = idx.shape
        dim = self.cfg.transition_dim
        if cache is not None and not isinstance(cache, TokenCache) and getattr(cache, "length", 0) != 0:
            raise TypeError(f"cache: expected a TokenCache or an empty KVCache, got {type(cache).__name__}")
        if isinstance(cache, TokenCache):
            past, offset = cache.tokens.to(idx.device), cache.offset
        else:
            past, offset = idx.new_zeros(batch, 0), 0 if cache is not None else int(start or 0)
        past_len = offset + past.size(1)
        start = past_len if start is None else int(start)
        if start != past_len:
            raise ValueError(f"start={start} but the cache holds {past_len} tokens; they must agree")
        if offset % dim:
            raise ValueError(f"start={start}: an uncached sequence must begin at a transition boundary")
        seq = torch.cat([past, idx.long()], dim=1)
        array = seq.cpu().numpy()
        positions = range(start + length - 1 if last_only else start, start + length)
        out = []
        for p in positions:
            column, context = self._context(array, offset, p + 1)
            probs = self.columns[column].probs(context, self.smoothing)
            out.append(torch.from_numpy(np.log(probs)).float())
        logp = torch.stack(out, dim=1).to(idx.device)
        new_cache = TokenCache(seq, offset).trimmed(dim) if cache is not None else None
        return logp, new_cache

    def forward(self, idx: torch.Tensor, cache=None, start: int | None = None):
        """Log-probabilities (as logits) ``[B, T, vocab_size + 1]`` of the token after each position."""
        with np.errstate(divide="ignore"):
            return self._run(idx, cache, start, last_only=False)

    @torch.no_grad()
    def log_prob_next(self, idx: torch.Tensor, cache=None, start: int | None = None):
        """Feed ``idx [B, T]`` and return ``(logp [B, vocab_size + 1] of the next token, cache)``."""
        with np.errstate(divide="ignore"):
            logp, cache = self._run(idx, cache, start, last_only=True)
        return logp[:, -1], cache

    def num_params(self) -> int:
        return 0


def select_episodes(
    data: TokenData, episode_ids: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, episode_starts, episode_terminal) of the chosen episodes (all when ``None``), re-indexed."""
    if episode_ids is None:
        return data.tokens, data.episode_starts, data.episode_terminal
    ends = np.append(data.episode_starts[1:], len(data.tokens))
    ids = np.asarray(episode_ids, np.int64)
    pieces = [data.tokens[data.episode_starts[e] : ends[e]] for e in ids]
    lengths = np.array([len(p) for p in pieces], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.concatenate(pieces), starts, np.asarray(data.episode_terminal)[ids]


# ------------------------------------------------------------------------------------------- circuit
ZERO_EVIDENCE = ("backoff", "uniform", "zeros")


class EmpiricalCircuit:
    """The empirical distribution of K-transition windows, answering the circuits' ``conditional``.

    ``windows [M, K * D]`` are category ids in ``0..num_cats-1``; the first ``obs_dim`` variables (the
    first transition's observation) index them; ``pad`` is the "episode over" category (None for K = 1).
    See the module docstring for the exact semantics; ``zero_evidence`` says what a query whose
    evidence has weight 0 in the data returns (``pseudocount`` > 0 replaces all three by ``f``):

    * ``"backoff"`` (default): find the windows that match the longest stretch of the hard evidence in
      variable order (window order is time order) and relax the observed variable where they first
      diverge to the soft evidence "not pad" (it was observed to have a real value, which the data
      never shows after this history); repeat until some window matches. So a planned action the data
      never takes after the plan so far becomes "the data's own action at that step", exactly the
      replacement m-Trifle's survival form makes when a circuit gives no answer, and a first-step
      candidate the data never takes in s_0 gets p(. | s_0). A trained circuit behaves alike: an
      observation all its components find equally unlikely barely moves the posterior. If the soft
      evidence alone rules out every window, ``f``.
    * ``"uniform"``: ``f``, uniform over the target's seen categories.
    * ``"zeros"``: an all-zero row, which ``trifle.planning.circuit_queries`` reads as "no answer"
      (m-Trifle's survival form then uses the data's own action); the trifle-s proposal needs finite
      scores for every candidate, so this mode is for tests of that handling, not for planning.
    """

    #: Largest number of (query row, window) pairs times variables processed at once.
    MAX_PAIR_ELEMENTS = 1 << 22

    def __init__(
        self,
        windows,
        *,
        num_cats: int,
        obs_dim: int,
        pad: int | None = None,
        pseudocount: float = 0.0,
        zero_evidence: str = "backoff",
    ):
        w = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        if w.dim() != 2 or w.size(0) == 0:
            raise DataError(f"windows: expected a non-empty [M, num_vars] array, got shape {tuple(w.shape)}")
        if int(w.min()) < 0 or int(w.max()) >= num_cats:
            raise DataError(f"windows: expected category ids in [0, {num_cats})")
        if not float(pseudocount) >= 0.0:
            raise ValueError(f"pseudocount: expected a number >= 0, got {pseudocount!r}")
        if zero_evidence not in ZERO_EVIDENCE:
            raise ValueError(f"zero_evidence: expected one of {ZERO_EVIDENCE}, got {zero_evidence!r}")
        if pad is not None and not 0 <= pad < num_cats:
            raise ValueError(f"pad: expected a category in [0, {num_cats}) or None, got {pad!r}")
        self.num_cats, self.obs_dim, self.pad = int(num_cats), int(obs_dim), pad
        self.pseudocount, self.zero_evidence = float(pseudocount), zero_evidence
        self.num_vars = w.size(1)
        keys = w[:, : self.obs_dim].numpy()
        order = np.lexsort(keys.T[::-1]) if self.obs_dim else np.arange(len(keys))
        self.windows = w[torch.from_numpy(order)]
        sorted_keys = keys[order]
        change = np.flatnonzero(np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        stops = np.append(starts[1:], len(order))
        self.index = {
            tuple(int(v) for v in sorted_keys[s]): (int(s), int(e - s))
            for s, e in zip(starts, stops, strict=True)
        }
        seen = torch.zeros(self.num_vars, self.num_cats, dtype=torch.float64)
        seen.scatter_(1, self.windows.T.contiguous(), 1.0)
        self.seen = seen
        self.backoffs = 0  # rows answered by back-off so far (a diagnostic)

    @classmethod
    def from_tokens(
        cls,
        data: TokenData,
        *,
        window: int,
        episode_ids: Sequence[int] | np.ndarray | None = None,
        pseudocount: float = 0.0,
        zero_evidence: str = "backoff",
    ) -> EmpiricalCircuit:
        """The oracle circuit of a token file, with the windows ``train_pc`` builds (pad = vocab_size)."""
        ids = np.arange(len(data.episode_starts)) if episode_ids is None else np.asarray(episode_ids)
        rows = token_windows(data, window=window, episode_ids=ids)
        return cls(
            rows,
            num_cats=circuit_num_cats(data.vocab_size, window),
            obs_dim=data.obs_dim,
            pad=data.vocab_size if window > 1 else None,
            pseudocount=pseudocount,
            zero_evidence=zero_evidence,
        )

    @property
    def num_windows(self) -> int:
        return self.windows.size(0)

    def to(self, device) -> EmpiricalCircuit:
        """Queries run on the CPU whatever the device; answers come back on the query's device."""
        return self

    def eval(self) -> EmpiricalCircuit:
        return self

    # ------------------------------------------------------------------------------------- queries
    def conditional(
        self, x: torch.Tensor, missing, target_vars: Sequence[int], soft_evidence=None
    ) -> torch.Tensor:
        """``p(X_t = c | evidence)`` ``[B, T, C]`` (float64, on ``x``'s device) for each target t."""
        device = x.device
        nv, nc = self.num_vars, self.num_cats
        targets = [int(t) for t in target_vars]
        if not targets or any(t < 0 or t >= nv for t in targets):
            raise ValueError(f"target_vars: expected a non-empty list of ids in [0, {nv}), got {targets}")
        if x.dim() != 2 or x.size(1) != nv or x.dtype.is_floating_point:
            raise DataError(f"x: expected integer category ids [batch, {nv}], got {tuple(x.shape)}")
        x = x.detach().long().cpu()
        b = x.size(0)
        if missing is None:
            miss = torch.zeros(b, nv, dtype=torch.bool)
        else:
            miss = torch.as_tensor(missing, dtype=torch.bool).cpu()
            miss = (miss.unsqueeze(0) if miss.dim() == 1 else miss).expand(b, nv).clone()
        miss[:, targets] = True
        soft = None
        if soft_evidence is not None:
            soft = torch.as_tensor(soft_evidence).detach().cpu().double()
            if soft.shape not in ((b, nv, nc), (nv, nc)):
                raise DataError(
                    f"soft_evidence: expected shape {(b, nv, nc)} or {(nv, nc)}, got {tuple(soft.shape)}"
                )
            if bool((soft < 0).any()):
                raise DataError("soft_evidence: weights must be non-negative")
        x = torch.where(miss, torch.zeros_like(x), x)
        if bool(((x < 0) | (x >= nc)).any()):
            raise DataError(f"x: observed category ids must lie in [0, {nc})")
        mass, total = self._counts(x, miss, soft, targets)
        fallback = self._fallback(soft, targets, b)
        alpha = self.pseudocount
        out = (mass + alpha * fallback) / (total + alpha).clamp_min(1e-300)[:, None, None]
        empty = (total + alpha) <= 0
        if bool(empty.any()):
            out[empty] = self._empty(x, miss, soft, targets, empty, fallback)
        return out.to(device)

    def _empty(self, x, miss, soft, targets, empty, fallback) -> torch.Tensor:
        """Answers of the rows whose evidence has weight 0 (``zero_evidence``)."""
        rows = empty.nonzero().squeeze(1)
        if self.zero_evidence == "zeros":
            return torch.zeros_like(fallback[rows])
        if self.zero_evidence == "uniform":
            return fallback[rows]
        self.backoffs += len(rows)
        out = fallback[rows].clone()
        for i, r in enumerate(rows.tolist()):
            row_soft = None if soft is None else (soft if soft.dim() == 2 else soft[r])
            answer = self._backoff(x[r], miss[r], row_soft, targets)
            if answer is not None:
                out[i] = answer
        return out

    def _backoff(self, x, miss, soft, targets) -> torch.Tensor | None:
        """``zero_evidence="backoff"`` for one row: relax, one at a time, the observed variable at which
        the windows matching the longest stretch of the evidence (in variable order) first diverge, to
        "not pad"; None if the soft evidence alone rules out every candidate window."""
        nv, nc = self.num_vars, self.num_cats
        miss = miss.clone()
        soft = torch.ones(nv, nc, dtype=torch.float64) if soft is None else soft.clone()
        var = torch.arange(nv)
        while True:
            start, count = self._candidates(x[None], miss[None])
            if count[0] == 0:  # the first state never occurs: every window is a candidate
                start[0], count[0] = 0, self.num_windows
            wins = self.windows[int(start[0]) : int(start[0] + count[0])]
            weight = torch.where(miss, soft[var, wins], torch.ones(1, dtype=torch.float64)).prod(dim=1)
            mismatch = (wins != x) & ~miss
            first = torch.where(mismatch.any(dim=1), mismatch.float().argmax(dim=1), nv)
            usable = weight > 0
            full = usable & (first == nv)
            if full.any():
                mass = torch.zeros(len(targets), nc, dtype=torch.float64)
                for i, t in enumerate(targets):
                    mass[i].index_add_(0, wins[full, t], weight[full])
                return mass / weight[full].sum()
            if not usable.any():
                return None
            j = int(first[usable].max())
            miss[j] = True
            soft[j] = 1.0
            if self.pad is not None:
                soft[j, self.pad] = 0.0

    def _fallback(self, soft, targets, b) -> torch.Tensor:
        """``f`` [B, T, C]: uniform over the target's seen categories (times its soft evidence if any)."""
        fallback = self.seen[targets].unsqueeze(0).expand(b, -1, -1).clone()
        if soft is not None:
            restricted = fallback * (soft[targets] if soft.dim() == 2 else soft[:, targets])
            fallback = torch.where(restricted.sum(-1, keepdim=True) > 0, restricted, fallback)
        return fallback / fallback.sum(-1, keepdim=True)

    def _candidates(self, x: torch.Tensor, miss: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(first window, number of windows) each row scans: those of its first state if observed."""
        b = x.size(0)
        start, count = np.zeros(b, np.int64), np.full(b, self.num_windows, np.int64)
        if self.obs_dim == 0:
            return start, count
        keyed = (~miss[:, : self.obs_dim]).all(dim=1).numpy()
        keys = x[:, : self.obs_dim].numpy()
        found: dict[tuple[int, ...], tuple[int, int]] = {}
        for r in np.flatnonzero(keyed):
            key = tuple(int(v) for v in keys[r])
            if key not in found:
                found[key] = self.index.get(key, (0, 0))
            start[r], count[r] = found[key]
        return start, count

    def _counts(self, x, miss, soft, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(mass [B, T, C], total [B]): weighted counts of the windows consistent with each row."""
        b = x.size(0)
        mass = torch.zeros(b, len(targets), self.num_cats, dtype=torch.float64)
        total = torch.zeros(b, dtype=torch.float64)
        start, count = self._candidates(x, miss)
        limit = max(1, self.MAX_PAIR_ELEMENTS // self.num_vars)
        lo = 0
        while lo < b:  # chunks of rows holding at most `limit` (row, window) pairs (at least one row)
            hi, pairs = lo + 1, int(count[lo])
            while hi < b and pairs + int(count[hi]) <= limit:
                pairs, hi = pairs + int(count[hi]), hi + 1
            self._accumulate(x, miss, soft, targets, start, count, lo, hi, mass, total)
            lo = hi
        return mass, total

    def _accumulate(self, x, miss, soft, targets, start, count, lo, hi, mass, total) -> None:
        counts = torch.from_numpy(count[lo:hi])
        if int(counts.sum()) == 0:
            return
        rows = torch.arange(lo, hi).repeat_interleave(counts)
        first = torch.from_numpy(start[lo:hi]).repeat_interleave(counts)
        within = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        wins = self.windows[first + within]  # [P, V]
        match = ((wins == x[rows]) | miss[rows]).all(dim=1)
        rows, wins = rows[match], wins[match]
        if not len(rows):
            return
        weight = torch.ones(len(rows), dtype=torch.float64)
        if soft is not None:
            var = torch.arange(self.num_vars)
            per_var = soft[var, wins] if soft.dim() == 2 else soft[rows[:, None], var[None, :], wins]
            weight = torch.where(miss[rows], per_var, torch.ones_like(per_var)).prod(dim=1)
        total.index_add_(0, rows, weight)
        for i, t in enumerate(targets):
            mass[:, i].index_put_((rows, wins[:, t]), weight, accumulate=True)
