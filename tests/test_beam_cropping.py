"""Beam search past the GPT's block (TT's context cropping) and action columns with constrained masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trifle.models.gpt import GPTConfig, KVCache, TrajectoryGPT
from trifle.planning import beam
from trifle.planning.beam import BeamSettings, GPTStream, TokenSpec, beam_search, crop_offset, gpt_value
from trifle.planning.sampling import bin_values, column_masks, filter_cdf, sample, top_k

OBS, ACT, VOCAB = 2, 2, 6
D = OBS + ACT + 2
INF = math.inf


def _gpt(block_size: int, seed: int = 0) -> TrajectoryGPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        obs_dim=OBS, act_dim=ACT, vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=16
    )
    return TrajectoryGPT(cfg).eval()


def _spec(masks: torch.Tensor | None = None, action_bins: tuple[int, ...] = ()) -> TokenSpec:
    values = bin_values(np.linspace(-1.0, 1.0, VOCAB), VOCAB + 1)
    return TokenSpec(
        obs_dim=OBS,
        act_dim=ACT,
        masks=column_masks([VOCAB] * D, VOCAB, OBS, ACT) if masks is None else masks,
        reward_values=values,
        value_values=values,
        action_bins=action_bins,
    )


def _tokens(rows: int, length: int, seed: int) -> torch.Tensor:
    """Random tokens, stop token included (it is a legal input in every column)."""
    return torch.randint(0, VOCAB + 1, (rows, length), generator=torch.Generator().manual_seed(seed))


def _tt_window(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """TT's crop, written out independently: drop ceil((L - block) / D) whole transitions from the front."""
    excess = tokens.size(1) - block_size
    return tokens[:, math.ceil(excess / D) * D :] if excess > 0 else tokens


def _direct_logp(model: TrajectoryGPT, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(_tt_window(tokens, model.cfg.block_size))
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


class LegacyStream:
    """GPTStream as it was before cropping, to show that sequences within the block are unaffected."""

    def __init__(self, model, prefix, use_cache):
        self.model, self.use_cache, self.tokens = model, use_cache, prefix
        with torch.no_grad():
            if use_cache:
                self.logp, self.cache = model.log_prob_next(prefix, KVCache())
            else:
                self.logp, self.cache = self._full(), None

    def _full(self):
        logits, _ = self.model(self.tokens)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def feed(self, token):
        token = token.view(-1, 1).to(self.tokens)
        self.tokens = torch.cat([self.tokens, token], dim=1)
        with torch.no_grad():
            if self.use_cache:
                self.logp, self.cache = self.model.log_prob_next(token, self.cache)
            else:
                self.logp = self._full()

    def select(self, rows):
        self.tokens, self.logp = self.tokens[rows], self.logp[rows]
        if self.cache is not None:
            self.cache = self.cache.select(rows)

    def repeat_interleave(self, n):
        self.tokens = self.tokens.repeat_interleave(n, dim=0)
        self.logp = self.logp.repeat_interleave(n, dim=0)
        if self.cache is not None:
            self.cache = self.cache.repeat_interleave(n)


# ----------------------------------------------------------------------------- the stream
def test_crop_offset_drops_as_few_whole_transitions_as_fit():
    assert [crop_offset(n, 30, 6) for n in (1, 30, 31, 36, 37, 42, 43)] == [0, 0, 6, 6, 12, 12, 18]
    assert [crop_offset(n, 29, 6) for n in (29, 30, 35, 36)] == [0, 6, 6, 12]  # TT's seq * D - 1 blocks


@pytest.mark.parametrize("block_size", [3 * D, 3 * D - 1])
@pytest.mark.parametrize("prefix_len", [1, 4 * D + 3])  # within the block, and longer than it
def test_cached_stream_matches_uncached_and_tt_window_token_by_token(block_size, prefix_len):
    model = _gpt(block_size)
    total = 10 * D
    feed = _tokens(3, total, seed=1)
    reference = feed[:, :prefix_len]
    cached, uncached = GPTStream(model, reference, True), GPTStream(model, reference, False)
    for step, t in enumerate(range(prefix_len, total + 1)):
        if step % 7 == 3:  # beam selection: reorder and duplicate rows
            rows = torch.tensor([2, 0, 0])
            reference = reference[rows]
            for stream in (cached, uncached):
                stream.select(rows)
        if step % 11 == 5:  # expansion followed by a selection
            rows = torch.tensor([1, 2, 5])
            reference = reference.repeat_interleave(2, dim=0)[rows]
            for stream in (cached, uncached):
                stream.repeat_interleave(2)
                stream.select(rows)
        direct = _direct_logp(model, reference)
        torch.testing.assert_close(cached.logp, uncached.logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(uncached.logp, direct, atol=1e-5, rtol=0)
        assert torch.equal(cached.tokens, reference) and torch.equal(uncached.tokens, reference)
        assert torch.equal(cached.window, _tt_window(reference, block_size))
        assert cached.cache.length == cached.window.size(1) <= block_size
        if t < total:
            token = feed[:, t]
            reference = torch.cat([reference, token[:, None]], dim=1)
            for stream in (cached, uncached):
                stream.feed(token)
    assert cached.offset > 0 and cached.rebuilds > 0


def test_a_block_shorter_than_a_transition_cannot_be_cropped():
    model = _gpt(D - 2)
    with pytest.raises(ValueError, match="shorter than a transition"):
        GPTStream(model, _tokens(1, D, seed=0), use_cache=True)


def test_rebuilds_once_per_transition_past_the_block():
    """Context 5, horizon 15, block 10 transitions: the plan's 20 D - 1 tokens overflow the block at
    tokens 10 D, 11 D, ..., 19 D (each a transition's first token): 10 rebuilds."""
    model = _gpt(10 * D)
    context = 5 * D + OBS  # five transitions and the current observation
    plan = 15 * D - 1 - OBS  # the last step feeds neither value nor next observation
    tokens = _tokens(2, context + plan, seed=2)
    stream = GPTStream(model, tokens[:, :context], use_cache=True)
    rebuilt_at = []
    for t in range(context, context + plan):
        before = stream.rebuilds
        stream.feed(tokens[:, t])
        if stream.rebuilds > before:
            rebuilt_at.append(t)
    assert rebuilt_at == [k * D for k in range(10, 20)]
    assert stream.rebuilds == 10


# ----------------------------------------------------------------------------- beam search
def _spy_streams(monkeypatch) -> list[GPTStream]:
    streams = []

    class Spy(GPTStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(self)

    monkeypatch.setattr(beam, "GPTStream", Spy)
    return streams


@pytest.mark.parametrize("context", [5, 12])  # the second prefix alone is longer than the block
def test_beam_search_past_the_block_cached_equals_uncached(monkeypatch, context):
    model, spec = _gpt(10 * D), _spec()
    prefix = _tokens(3, context * D + OBS, seed=3)
    streams = _spy_streams(monkeypatch)
    got = {}
    for use_cache in (True, False):
        cfg = BeamSettings(3, 15, 2, k_obs=2, k_act=None, cdf_act=0.3, discount=0.9, use_cache=use_cache)
        got[use_cache] = beam_search(model, prefix, spec, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(got[True], got[False])
    assert streams[0].rebuilds == (10 if context == 5 else 14)
    assert streams[0].tokens.size(1) == (context + 15) * D - 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_sequences_within_the_block_are_unaffected(monkeypatch, use_cache):
    model, spec = _gpt(6 * D), _spec()
    prefix = _tokens(2, 2 * D + OBS, seed=4)
    cfg = BeamSettings(3, 4, 3, k_obs=None, k_act=None, cdf_act=None, discount=0.9, use_cache=use_cache)
    streams = _spy_streams(monkeypatch)
    new = beam_search(model, prefix, spec, cfg, torch.Generator().manual_seed(1))
    assert streams[0].offset == 0 and streams[0].rebuilds == 0
    monkeypatch.setattr(beam, "GPTStream", LegacyStream)
    old = beam_search(model, prefix, spec, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(new, old)
    # Token by token, the log-probs are bitwise those of the old stream.
    tokens = _tokens(2, 6 * D, seed=5)
    stream, legacy = GPTStream(model, tokens[:, :3], use_cache), LegacyStream(model, tokens[:, :3], use_cache)
    for t in range(3, tokens.size(1)):
        stream.feed(tokens[:, t])
        legacy.feed(tokens[:, t])
        assert torch.equal(stream.logp, legacy.logp)


# ----------------------------------------------------------------------------- constrained action masks
ALLOWED = [1, 3]  # of action 0's five bins 0..4


def _constrained_spec(action_bins: tuple[int, ...] = (5, 4)) -> TokenSpec:
    masks = column_masks([VOCAB, VOCAB, 5, 4, VOCAB, VOCAB], VOCAB, OBS, ACT)
    masks[OBS, [0, 2, 4]] = False
    return _spec(masks, action_bins)


def _biased_gpt() -> TrajectoryGPT:
    """The head that predicts action 0 strongly favours the disallowed bins 0, 2, 4."""
    model = _gpt(4 * D)
    with torch.no_grad():
        model.head_bias[OBS - 1, [0, 2, 4]] = 6.0
    return model


class RecordingProposal:
    """Returns flat logits over *all* bins (disallowed ones included) and records what it was shown."""

    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}
        self.chosen_tokens: dict[int, torch.Tensor] = {}

    def begin(self, env_of_row):
        pass

    def logits(self, dim, logp):
        self.seen[dim] = logp.clone()
        return torch.zeros_like(logp)

    def chosen(self, dim, tokens):
        self.chosen_tokens[dim] = tokens.clone()


def _run_recording_actions(cfg: BeamSettings, proposal=None) -> torch.Tensor:
    """Every sampled action [N, act_dim] of every step, as seen by the value hook."""
    seen, tt_value = [], gpt_value(cfg.discount)

    def value(step, env_of_row, actions, rewards):
        seen.append(actions[:, -1].clone())
        return tt_value(step, env_of_row, actions, rewards)

    prefix = _tokens(8, D + OBS, seed=6)
    beam_search(
        _biased_gpt(),
        prefix,
        _constrained_spec(),
        cfg,
        torch.Generator().manual_seed(0),
        proposal=proposal,
        value_fn=value,
    )
    return torch.cat(seen)


@pytest.mark.parametrize(
    ("k_act", "cdf_act"),
    [(None, None), (None, 0.6), (1, None), (2, 0.3)],
    ids=["plain", "cdf", "top1", "both"],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_disallowed_action_bins_are_never_sampled(k_act, cdf_act, use_cache):
    cfg = BeamSettings(8, 3, 8, k_obs=None, k_act=k_act, cdf_act=cdf_act, discount=0.9, use_cache=use_cache)
    actions = _run_recording_actions(cfg)
    assert actions.size(0) >= 1500  # 8 envs x 64 candidates x 3 steps
    assert set(actions[:, 0].tolist()) <= set(ALLOWED)
    assert set(actions[:, 1].tolist()) <= {0, 1, 2, 3}
    if k_act is None and cdf_act is None:
        assert set(actions[:, 0].tolist()) == set(ALLOWED)  # both allowed bins do get sampled


def test_proposal_sees_minus_inf_at_disallowed_bins_and_cannot_re_allow_them():
    cfg = BeamSettings(8, 2, 8, k_obs=None, k_act=None, cdf_act=None, discount=0.9)
    hook = RecordingProposal()
    actions = _run_recording_actions(cfg, proposal=hook)
    first = hook.seen[0]
    assert first.shape == (8 * 64, 5) and hook.seen[1].shape == (8 * 64, 4)
    assert torch.isneginf(first[:, [0, 2, 4]]).all() and torch.isfinite(first[:, ALLOWED]).all()
    assert torch.isfinite(hook.seen[1]).all()
    assert set(hook.chosen_tokens[0].tolist()) == set(ALLOWED)  # the hook's flat logits were masked again
    assert set(actions[:, 0].tolist()) <= set(ALLOWED)


def test_filters_and_sampling_keep_minus_inf_bins_out():
    logits = torch.tensor([[-INF, 0.3, -INF, 0.7, -INF], [-INF, 0.5, -INF, 0.5, -INF]]).log()
    logits[:, [0, 2, 4]] = -INF
    assert torch.isfinite(filter_cdf(logits, 0.5)).tolist() == [
        [False, False, False, True, False],
        [False, True, False, True, False],  # a flat row keeps its maxima
    ]
    assert torch.isfinite(filter_cdf(logits, 0.2))[0].tolist() == [False, True, False, True, False]
    assert torch.isfinite(top_k(logits, 4)).tolist() == torch.isfinite(logits).tolist()
    g = torch.Generator().manual_seed(0)
    for filtered in (logits, filter_cdf(logits, 0.2), top_k(logits, 3)):
        draws = sample(filtered.repeat(2000, 1), g)
        assert set(draws.tolist()) == set(ALLOWED)


def test_action_bins_default_and_checks():
    assert _spec().action_bins == (VOCAB, VOCAB)
    assert _spec(column_masks([4, 4, 3, 2, 4, 4], VOCAB, OBS, ACT)).action_bins == (3, 2)
    assert _constrained_spec(()).action_bins == (4, 4)  # last allowed bin + 1
    masks = _constrained_spec().masks
    with pytest.raises(ValueError, match="act_dim"):
        _spec(masks, (5,))
    with pytest.raises(ValueError, match=r"tokens >= action_bins\[0\]"):
        _spec(masks, (3, 4))
    stop = masks.clone()
    stop[OBS + 1, VOCAB] = True
    with pytest.raises(ValueError, match="or stop"):
        _spec(stop, (5, 4))
    empty = masks.clone()
    empty[OBS, :] = False
    with pytest.raises(ValueError, match="allows none"):
        _spec(empty, (5, 4))
