"""Per-token sampling helpers of the planners: valid categories, TT's filters, seeded draws, expectations.

Every column of a transition shares one vocabulary of ``vocab_size`` tokens plus the stop token, but a
column may use fewer bins (Taxi's action column has 6 of 100). Sampling must never produce a token the
discretizer cannot decode, so each column gets a mask of the tokens it may take:

* observation, reward and value columns: their bins, plus the stop token (the GPT predicts the end of
  an episode by emitting stop tokens, and a plan may legitimately run past a terminal state);
* action columns: their bins only. An action must be executable, so the stop token is never sampled.

All functions work on log-probabilities / logits of shape ``[B, vocab_size + 1]`` (or a slice of it),
with excluded tokens set to ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

NEG_INF = float("-inf")


def column_masks(num_bins: Sequence[int], vocab_size: int, obs_dim: int, act_dim: int) -> torch.Tensor:
    """Boolean ``[D, vocab_size + 1]``: which tokens each column may take (see the module docstring)."""
    dim = len(num_bins)
    if dim != obs_dim + act_dim + 2:
        raise ValueError(
            f"num_bins has {dim} columns, expected obs_dim + act_dim + 2 = {obs_dim + act_dim + 2}"
        )
    tokens = torch.arange(vocab_size + 1)
    mask = tokens[None, :] < torch.as_tensor(np.asarray(num_bins), dtype=torch.long)[:, None]
    is_action = torch.zeros(dim, dtype=torch.bool)
    is_action[obs_dim : obs_dim + act_dim] = True
    mask[:, vocab_size] = ~is_action
    return mask


def restrict(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the logits of tokens outside ``mask`` ([V] or [B, V]) to ``-inf``."""
    return logits.masked_fill(~mask.to(logits.device), NEG_INF)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept, as in TT's top_k_logits)."""
    k = min(int(k), logits.size(-1))
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_cdf(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """TT's ``filter_cdf``: drop the least likely tokens whose cumulative probability stays below ``threshold``.

    With the probabilities sorted ascending, every token up to the last one whose running sum is still
    below ``threshold`` is dropped, together with every token of equal or smaller probability. Unlike
    TT, which would then set *every* token to -1000 when the distribution is flat (and so sample
    uniformly, excluded tokens included), the most likely token(s) of a row are always kept.
    """
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = probs.sort(dim=-1).values
    below = sorted_probs.cumsum(dim=-1) < threshold
    # Probability of the last sorted token still below the threshold (or -1: drop nothing).
    last = torch.where(below, torch.arange(probs.size(-1), device=probs.device), -1).amax(
        dim=-1, keepdim=True
    )
    cut = torch.where(last >= 0, sorted_probs.gather(-1, last.clamp_min(0)), -1.0)
    drop = (probs <= cut) & (probs < probs.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, NEG_INF)


def filter_support(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least ``ratio`` times the row's most likely token's.

    The behaviour-support rule of discrete BCQ (Fujimoto, Conti, Ghavamzadeh & Pineau 2019, "Benchmarking
    batch deep RL algorithms", threshold tau = 0.3): an action the data's policy rarely takes in a state
    has few, unrepresentative value labels (in Q-learning data, exploration steps whose labels come
    from whatever the learner did later), so a planner that trusts its predicted value is misled.
    Relative to the mode, so it adapts to how deterministic the behaviour is in each state, unlike a
    fixed top-k or TT's cumulative-mass cut.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logits.masked_fill(logp < logp.amax(dim=-1, keepdim=True) + math.log(ratio), NEG_INF)


def filter_logits(logits: torch.Tensor, *, k: int | None = None, cdf: float | None = None) -> torch.Tensor:
    """TT's order: the cdf filter first, then top-k; ``None`` disables either."""
    if cdf is not None:
        logits = filter_cdf(logits, cdf)
    if k is not None:
        logits = top_k(logits, k)
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row ``[B]`` from ``softmax(logits)``, drawn with ``generator`` (reproducible)."""
    probs = torch.softmax(logits.double(), dim=-1)
    if bool(torch.isnan(probs).any()):
        raise ValueError("sample: a row has no token left to sample (all logits are -inf)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def bin_values(values: np.ndarray, length: int) -> torch.Tensor:
    """Representative value of every token ``0..length-1`` of a column; tokens past its bins count as 0.

    The stop / pad token means "the episode is over": no more reward and no value, hence 0. This is the
    convention of TT's ``value_fn`` (it drops the termination probability) and of the circuit queries.
    """
    out = torch.zeros(length, dtype=torch.float64)
    n = min(len(values), length)
    out[:n] = torch.as_tensor(np.asarray(values[:n], np.float64))
    return out


def expectation(logp: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """E[value] under ``exp(logp)`` ``[B, L]`` with per-token ``values`` ``[L]``, in float64."""
    return logp.double().exp() @ values.to(logp.device)
