"""Trajectory-Transformer-style GPT over discretized transitions, with a KV cache for beam search.

A trajectory is flattened into tokens ``s^1..s^n a^1..a^m r V s^1 ...``; every transition has
``D = obs_dim + act_dim + 2`` tokens and each token value lies in ``0..vocab_size-1``, plus one stop
token (``vocab_size``) that pads transitions after a terminal state. As in TT:

* each column (position within a transition) has its own embedding table: token ``v`` in column
  ``c`` looks up row ``c * vocab_size + v``; the stop token shares one extra row;
* each column has its own output head (TT's EinLinear) giving ``vocab_size + 1`` logits for the
  token that *follows* it, so the head of column ``c`` predicts a token of column ``c + 1``;
* the loss weights targets by their column: actions ``action_weight`` (5 in TT), reward
  ``reward_weight``, value ``value_weight``, states 1.

How the model reads value tokens is ``value_inputs`` (docs/gpt.md#value-inputs):

* ``"unattended"`` is TT's model: value tokens are embedded and predicted, but TT's attention mask hides
  every value token's key from every query (its own included), so a value token reaches nothing but the
  residual stream of its own position, whose head predicts the next transition's first state token;
* ``"read"``: value tokens are inputs like any other token (attended by everything after them);
* ``"masked"``: every value token is read through one shared embedding row, so the model predicts V_t but
  never conditions on any V. A planner never has true past values to feed: TT writes a placeholder (the
  top bin) into the executed transitions of its prefix, and a ``read`` model trained on true values reads
  the placeholder as "the return from here is maximal" (it has learned V_{t-1} = r_t + gamma V_t).
  Masking makes training see exactly what planning feeds. The stop token stays readable.

Unlike TT (no cache: every sampled token re-runs the whole context), ``forward`` accepts and returns
a :class:`KVCache`, so extending ``B`` beams by one token costs one token's forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trifle.errors import ConfigError
from trifle.models.gpt_settings import VALUE_INPUTS


@dataclass
class GPTConfig:
    """Everything needed to rebuild the model; stored in checkpoints as a plain dict."""

    obs_dim: int
    act_dim: int
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    action_weight: float = 5.0
    reward_weight: float = 1.0
    value_weight: float = 1.0
    # "read": value tokens are inputs like any other; "masked": outputs only; "unattended": TT's mask, no
    # position attends to a value token (see module docstring). The default is "read" so that checkpoints
    # written before the option existed load as they were trained.
    value_inputs: str = "read"

    def __post_init__(self) -> None:
        for key in ("obs_dim", "act_dim", "vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd: {self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        for key in ("action_weight", "reward_weight", "value_weight"):
            if not float(getattr(self, key)) >= 0.0:
                raise ConfigError(f"{key}: expected a non-negative loss weight, got {getattr(self, key)!r}")
        if self.value_inputs not in VALUE_INPUTS:
            raise ConfigError(f"value_inputs: expected one of {VALUE_INPUTS}, got {self.value_inputs!r}")

    @property
    def transition_dim(self) -> int:
        """Tokens per transition: state dims, action dims, reward, value."""
        return self.obs_dim + self.act_dim + 2

    @property
    def stop_token(self) -> int:
        """Token value that marks 'the episode has terminated' (pads after a terminal transition)."""
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Per-layer attention keys and values of the tokens seen so far.

    Storage is preallocated ``[B, n_head, capacity, head_dim]`` per layer and filled up to ``length``,
    so feeding one token writes one slot instead of copying the whole cache (concatenation made
    planning quadratic in the context). Caches returned by ``forward`` share storage with the cache
    passed in, but remain immutable in effect: tokens are only ever written past the end of the cache
    that is extended, and a second extension of the same cache (a branch) copies first.
    """

    def __init__(
        self,
        keys: list[torch.Tensor] | None = None,
        values: list[torch.Tensor] | None = None,
        length: int | None = None,
        _frontier: list[int] | None = None,
    ):
        self.keys = list(keys or [])
        self.values = list(values or [])
        self._length = (self.keys[0].size(2) if self.keys else 0) if length is None else int(length)
        # Highest position written into the shared storage, shared by every cache that uses it.
        self._frontier = _frontier if _frontier is not None else [self._length]

    @property
    def length(self) -> int:
        """Number of cached tokens (the absolute position of the next token)."""
        return self._length

    @property
    def batch_size(self) -> int:
        return self.keys[0].size(0) if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].size(2) if self.keys else 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer ``i``'s cached keys and values, ``[B, n_head, length, head_dim]``."""
        return self.keys[i][:, :, : self._length], self.values[i][:, :, : self._length]

    def writable(self, extra: int) -> bool:
        """Whether ``extra`` tokens can be written in place (no other cache has written past us)."""
        return bool(self.keys) and self._frontier[0] == self._length and self._length + extra <= self.capacity

    def extended(self, extra: int) -> KVCache:
        """The cache that will hold ``extra`` more tokens, sharing this cache's storage."""
        self._frontier[0] = self._length + extra
        return KVCache(self.keys, self.values, self._length + extra, self._frontier)

    def _map(self, fn) -> KVCache:
        return KVCache([fn(k) for k in self.keys], [fn(v) for v in self.values], self._length)

    def with_capacity(self, capacity: int) -> KVCache:
        """A private copy whose storage holds at least ``capacity`` tokens."""

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(t.size(0), t.size(1), max(capacity, self._length), t.size(3))
            out[:, :, : self._length] = t[:, :, : self._length]
            return out

        return self._map(grow)

    def select(self, batch_indices: torch.Tensor) -> KVCache:
        """Keep (and reorder, or duplicate) beams: row ``i`` of the result is old row ``batch_indices[i]``."""
        n = self._length

        def pick(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(len(batch_indices), t.size(1), t.size(2), t.size(3))
            out[:, :, :n] = t[:, :, :n].index_select(0, batch_indices.to(t.device))
            return out

        return self._map(pick)

    def repeat_interleave(self, n: int) -> KVCache:
        """Expand each beam into ``n`` consecutive copies, matching ``x.repeat_interleave(n, dim=0)``."""
        length = self._length

        def repeat(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(t.size(0), n, t.size(1), t.size(2), t.size(3))
            out[:, :, :, :length] = t[:, None, :, :length]  # one broadcast copy of the filled part
            return out.view(t.size(0) * n, t.size(1), t.size(2), t.size(3))

        return self._map(repeat)

    def truncate(self, length: int) -> KVCache:
        """Forget every token from position ``length`` on (e.g. to re-sample the tail of a plan)."""
        return KVCache(self.keys, self.values, min(int(length), self._length), self._frontier)


def init_gpt2_weights(model: nn.Module, blocks: nn.ModuleList) -> None:
    """GPT-2 init (N(0, 0.02), zero biases); residual projections scaled by 1/sqrt(2 n_layer)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    for block in blocks:
        for proj in (block.attn.proj, block.mlp[2]):
            nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(blocks)))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        slot: tuple[torch.Tensor, torch.Tensor, int] | None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``slot`` = (key storage, value storage, number of cached tokens): this call's keys and values
        are written into the storage after the cached ones, and attention reads the filled part.

        ``allowed`` (``[T, n_cached + T]`` bool), when given, replaces the causal mask: query ``i`` may
        attend to key ``j`` where it is true (the ``unattended`` value inputs pass one).
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if slot is not None:
            k_store, v_store, n_cached = slot
            k_store[:, :, n_cached : n_cached + T] = k
            v_store[:, :, n_cached : n_cached + T] = v
            k, v = k_store[:, :, : n_cached + T], v_store[:, :, : n_cached + T]
        n_past = k.size(2) - T
        dropout = self.dropout if self.training else 0.0
        if allowed is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        elif n_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:
            # A single new token may attend to every key: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # Query i sits at absolute position n_past + i and may see every key up to there.
            allowed = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(diagonal=n_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        slot: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), slot, allowed)
        return x + self.mlp(self.ln2(x))


class TrajectoryGPT(nn.Module):
    """GPT with per-column token embeddings and per-column output heads (see module docstring)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, V = cfg.transition_dim, cfg.vocab_size
        self.tok_emb = nn.Embedding(V * D + 1, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # TT's EinLinear: one [n_embd -> V + 1] linear map per column.
        self.head_weight = nn.Parameter(torch.empty(D, cfg.n_embd, V + 1))
        self.head_bias = nn.Parameter(torch.zeros(D, V + 1))
        weights = torch.ones(D)
        weights[cfg.obs_dim : cfg.obs_dim + cfg.act_dim] = cfg.action_weight
        weights[-2], weights[-1] = cfg.reward_weight, cfg.value_weight
        self.register_buffer("column_weights", weights, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_gpt2_weights(self, self.blocks)
        nn.init.normal_(self.head_weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _columns(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        return (torch.arange(start, start + length, device=device)) % self.cfg.transition_dim

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, start: int | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits ``[B, T, vocab_size + 1]`` for the token after each position of ``idx [B, T]``.

        ``start`` is the absolute position of ``idx[:, 0]`` in the sequence (which must begin at a
        transition boundary); it fixes each token's column and positional embedding. With a cache
        the tokens before ``start`` are the cached ones, so ``start`` defaults to ``cache.length``
        and must equal it. Pass ``KVCache()`` to start caching; with ``cache=None`` none is built.
        """
        B, T = idx.shape
        past_len = cache.length if cache is not None else 0
        start = past_len if start is None else int(start)
        if cache is not None and start != past_len:
            raise ValueError(f"start={start} but the cache holds {past_len} tokens; they must agree")
        if start + T > self.cfg.block_size:
            raise ValueError(f"positions {start}..{start + T - 1} exceed block_size {self.cfg.block_size}")
        V, D = self.cfg.vocab_size, self.cfg.transition_dim
        columns = self._columns(start, T, idx.device)
        if self.cfg.value_inputs == "masked":
            # Every value token reads the value column's first row: one "value unknown" embedding.
            idx = torch.where((columns == D - 1) & (idx != V), 0, idx)
        emb_idx = torch.where(idx == V, V * D, idx + columns * V)
        x = self.drop(self.tok_emb(emb_idx) + self.pos_emb[:, start : start + T])
        allowed = self._unattended_mask(start, past_len, T, idx.device)
        if cache is not None:
            cache = self._room(cache, B, T, x.dtype)
        for i, block in enumerate(self.blocks):
            slot = (cache.keys[i], cache.values[i], past_len) if cache is not None else None
            x = block(x, slot, allowed)
        logits = self._heads(self.ln_f(x), start)
        return logits, (cache.extended(T) if cache is not None else None)

    def _unattended_mask(
        self, start: int, past_len: int, T: int, device: torch.device
    ) -> torch.Tensor | None:
        """With ``value_inputs="unattended"``, the ``[T, past_len + T]`` attention mask of TT: causal, and
        no query sees a value token's key (TT zeroes the value columns of its causal mask). None otherwise.

        Keys are the cached tokens then this call's, at absolute positions ``start - past_len`` on.
        """
        if self.cfg.value_inputs != "unattended":
            return None
        D = self.cfg.transition_dim
        if past_len == 0 and start % D == D - 1:
            # The first query would see no key at all (TT's sequences start at a transition boundary).
            raise ValueError(
                f"start={start} is a value position: with value_inputs='unattended' a sequence without a "
                "cache must not begin with a value token"
            )
        key_columns = self._columns(start - past_len, past_len + T, device)
        causal = torch.ones(T, past_len + T, dtype=torch.bool, device=device).tril(diagonal=past_len)
        return causal & (key_columns != D - 1)

    def _room(self, cache: KVCache, batch: int, extra: int, dtype: torch.dtype) -> KVCache:
        """A cache whose storage can take ``extra`` more tokens in place (allocating or copying if not)."""
        if cache.writable(extra):
            return cache
        if cache.keys:
            return cache.with_capacity(self.cfg.block_size)
        head_dim = self.cfg.n_embd // self.cfg.n_head
        shape = (batch, self.cfg.n_head, self.cfg.block_size, head_dim)
        device = self.pos_emb.device
        keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.blocks]
        values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.blocks]
        return KVCache(keys, values, 0)

    def _heads(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply column ``(start + t) % D``'s output head to position ``t`` of ``x [B, T, n_embd]``."""
        B, T, E = x.shape
        D, V = self.cfg.transition_dim, self.cfg.vocab_size
        if start % D == 0 and T % D == 0:
            # Whole transitions (training, evaluation): one batched matmul over the D columns.
            per_column = x.view(B * T // D, D, E).transpose(0, 1)
            out = torch.baddbmm(self.head_bias[:, None, :], per_column, self.head_weight)
            return out.transpose(0, 1).reshape(B, T, V + 1)
        # Partial transitions (incremental decoding): one strided slice per column present.
        logits = x.new_empty(B, T, V + 1)
        for offset in range(min(T, D)):
            c = (start + offset) % D
            logits[:, offset::D] = x[:, offset::D] @ self.head_weight[c] + self.head_bias[c]
        return logits

    def target_weights(self, length: int, start: int = 0) -> torch.Tensor:
        """Loss weight of the target at each of ``length`` positions: the weight of the *next* column."""
        return self.column_weights[self._columns(start + 1, length, self.column_weights.device)]

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """Column-weighted cross-entropy, averaged over valid targets (``mask`` 1).

        TT divides the masked sum by all positions; dividing by the valid count instead keeps the
        loss scale independent of how much padding a batch happens to contain.
        """
        logits, _ = self(idx, start=start)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        weights = self.target_weights(idx.size(1), start)
        mask = mask.to(ce.dtype)
        return (ce * weights * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def log_likelihood(
        self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, start: int = 0
    ) -> tuple[float, float]:
        """Unweighted ``(sum of log p(target) over valid targets, number of valid targets)``."""
        logits, _ = self(idx, start=start)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = mask.to(logp.dtype)
        return float((logp * mask).sum()), float(mask.sum())

    def mean_log_likelihood(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> float:
        """Mean log-likelihood per valid token in nats, in eval mode (no dropout), over all batches."""
        was_training = self.training
        self.eval()
        device = self.head_bias.device
        total, count = 0.0, 0.0
        try:
            for x, y, mask in batches:
                s, n = self.log_likelihood(x.to(device), y.to(device), mask.to(device))
                total, count = total + s, count + n
        finally:
            self.train(was_training)
        return total / count if count else float("nan")

    @torch.no_grad()
    def log_prob_next(
        self, idx: torch.Tensor, cache: KVCache | None = None, start: int | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Feed ``idx`` and return log-probabilities ``[B, vocab_size + 1]`` of the token after it.

        The planner's inner step: ``logp, cache = model.log_prob_next(tok[:, None], cache)``.
        """
        logits, cache = self(idx, cache, start)
        return torch.log_softmax(logits[:, -1].float(), dim=-1), cache
