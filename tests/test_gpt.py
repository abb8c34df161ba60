"""Trajectory GPT: KV-cache equivalence, loss weights, training determinism, resume, checkpoint errors."""

import math

import numpy as np
import pytest
import torch

from trifle.errors import CheckpointError, ConfigError
from trifle.models import training_loop
from trifle.models.gpt import GPTConfig, KVCache, TrajectoryGPT
from trifle.models.gpt_training import load_gpt, resolve_config, train_gpt
from trifle.models.training_common import batch_indices, learning_rate

OBS, ACT, VOCAB = 3, 2, 11
D = OBS + ACT + 2


def tiny_model(seed: int = 0, **overrides) -> TrajectoryGPT:
    cfg = dict(obs_dim=OBS, act_dim=ACT, vocab_size=VOCAB, block_size=4 * D, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(seed)
    return TrajectoryGPT(GPTConfig(**{**cfg, **overrides})).eval()


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (batch, length), generator=g)
    idx[:, -D:] = VOCAB  # a padded transition of stop tokens, as after a terminal state
    return idx


def test_cached_token_by_token_matches_full_forward():
    model = tiny_model()
    idx = random_tokens(2, 4 * D)
    full, _ = model(idx)
    logits, cache = model(idx[:, :5], KVCache())
    steps = [logits]
    for t in range(5, idx.size(1)):
        logits, cache = model(idx[:, t : t + 1], cache, start=t)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == idx.size(1)


def test_cache_chunks_and_truncate_match_full_forward():
    model = tiny_model()
    idx = random_tokens(3, 3 * D, seed=1)
    full, _ = model(idx)
    _, cache = model(idx[:, : D + 2], KVCache())
    chunk, cache = model(idx[:, D + 2 : 2 * D + 1], cache)  # several new tokens at once, mid-transition
    torch.testing.assert_close(chunk, full[:, D + 2 : 2 * D + 1], atol=1e-5, rtol=0)
    # Forget the last few tokens and re-feed a different tail: only the kept prefix may matter.
    other = idx.clone()
    other[:, D:] = random_tokens(3, 3 * D, seed=2)[:, D:]
    tail, _ = model(other[:, D:], cache.truncate(D))
    torch.testing.assert_close(tail, model(other)[0][:, D:], atol=1e-5, rtol=0)


def test_branching_from_one_cache_does_not_corrupt_either_branch():
    """Caches share preallocated storage; extending the same cache twice must copy, not overwrite."""
    model = tiny_model()
    a, b = random_tokens(2, 2 * D, seed=3), random_tokens(2, 2 * D, seed=4)
    b[:, :D] = a[:, :D]
    _, root = model(a[:, :D], KVCache())
    first, cache_a = model(a[:, D:], root)
    second, cache_b = model(b[:, D:], root)  # a second branch from the same root
    torch.testing.assert_close(first, model(a)[0][:, D:], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, model(b)[0][:, D:], atol=1e-5, rtol=0)
    # The first branch is still intact after the second wrote its own tokens.
    nxt = random_tokens(2, 1, seed=5)[:, :1] % VOCAB
    again, _ = model(nxt, cache_a)
    full = model(torch.cat([a, nxt], dim=1))[0]
    torch.testing.assert_close(again[:, 0], full[:, a.size(1)], atol=1e-5, rtol=0)


def test_beam_select_and_repeat_interleave_keep_cache_consistent():
    """Mimic beam search: expand beams, extend each, keep the best ones, continue token by token."""
    model = tiny_model()
    prefix = random_tokens(2, D + 3, seed=3)
    _, cache = model(prefix, KVCache())
    seqs = prefix.repeat_interleave(3, dim=0)
    cache = cache.repeat_interleave(3)
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        if step == 3:  # keep beams 5, 0, 0, 2 (reorder, drop and duplicate)
            keep = torch.tensor([5, 0, 0, 2])
            seqs, cache = seqs[keep], cache.select(keep)
        new = torch.randint(0, VOCAB + 1, (seqs.size(0), 1), generator=g)
        logits, cache = model(new, cache, start=seqs.size(1))
        seqs = torch.cat([seqs, new], dim=1)
        torch.testing.assert_close(logits[:, -1], model(seqs)[0][:, -1], atol=1e-5, rtol=0)
    assert cache.batch_size == 4 and cache.length == seqs.size(1)
    logp, _ = model.log_prob_next(seqs[:, -1:], cache.truncate(seqs.size(1) - 1))
    torch.testing.assert_close(logp, torch.log_softmax(model(seqs)[0][:, -1], dim=-1), atol=1e-5, rtol=0)


def test_forward_rejects_inconsistent_positions():
    model = tiny_model()
    _, cache = model(random_tokens(1, 5), KVCache())
    with pytest.raises(ValueError, match="start"):
        model(random_tokens(1, 1), cache, start=3)
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(1, 4 * D + 1))


def test_start_offset_sets_columns_and_positions():
    """Without a cache, ``start`` must still pick the right per-column embeddings and heads."""
    model = tiny_model(n_layer=1)
    model.blocks = torch.nn.ModuleList()  # no attention: each logit depends on its own token only
    idx = random_tokens(1, 2 * D, seed=5)
    full, _ = model(idx)
    shifted, _ = model(idx[:, 3:], start=3)
    torch.testing.assert_close(shifted, full[:, 3:], atol=1e-6, rtol=0)
    assert not torch.allclose(model(idx[:, 3:])[0], full[:, 3:])


def test_loss_weights_by_hand():
    """Fix the logits through the head bias, then compare with a cross-entropy computed in numpy."""
    model = tiny_model(action_weight=5.0, reward_weight=2.0, value_weight=0.5)
    with torch.no_grad():
        model.head_weight.zero_()
        bias = torch.arange(D * (VOCAB + 1), dtype=torch.float32).view(D, VOCAB + 1).sin() * 3
        model.head_bias.copy_(bias)
    idx = random_tokens(2, 2 * D, seed=6)
    targets = random_tokens(2, 2 * D, seed=7)
    mask = torch.ones(2, 2 * D)
    mask[0, 4:9] = 0
    b = bias.numpy().astype(np.float64)
    column_weight = [1.0] * OBS + [5.0] * ACT + [2.0, 0.5]
    total, count = 0.0, 0.0
    for i in range(2):
        for j in range(2 * D):
            row = b[j % D]  # logits of the head of this input position's column
            ce = math.log(np.exp(row).sum()) - row[targets[i, j]]
            total += column_weight[(j + 1) % D] * ce * float(mask[i, j])
            count += float(mask[i, j])
    assert model.loss(idx, targets, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_uniform_logits_give_known_loss_and_likelihood():
    model = tiny_model()
    with torch.no_grad():
        model.head_weight.zero_()
        model.head_bias.zero_()
    idx = random_tokens(1, D)
    mask = torch.ones(1, D)
    # Targets of one full transition: D-1 weights of columns 1.. plus column 0's (a state, weight 1).
    mean_weight = (OBS * 1.0 + ACT * 5.0 + 1.0 + 1.0) / D
    assert model.loss(idx, idx, mask).item() == pytest.approx(mean_weight * math.log(VOCAB + 1), rel=1e-6)
    ll = model.mean_log_likelihood([(idx, idx, mask), (idx, idx, mask * 0)])
    assert ll == pytest.approx(-math.log(VOCAB + 1), rel=1e-6)


def test_gpt_config_validation():
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig(obs_dim=1, act_dim=1, vocab_size=5, block_size=8, n_head=3, n_embd=16)
    with pytest.raises(ConfigError, match="act_dim"):
        GPTConfig(obs_dim=1, act_dim=0, vocab_size=5, block_size=8)


# ----------------------------------------------------------------------------------------------
# Training


def toy_data(seed: int = 0):
    """Six episodes of 12 transitions with a learnable pattern; terminal and timeout endings mixed."""
    rng = np.random.default_rng(seed)
    rows = 72
    tokens = (np.arange(rows)[:, None] + np.arange(D)[None, :]) % VOCAB
    tokens = np.where(rng.random((rows, D)) < 0.2, rng.integers(0, VOCAB, (rows, D)), tokens)
    return {
        "tokens": tokens.astype(np.int64),
        "episode_starts": np.arange(0, rows, 12),
        "episode_terminal": np.array([True, False] * 3),
        "obs_dim": OBS,
        "act_dim": ACT,
        "vocab_size": VOCAB,
    }


TINY_CFG = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "seq_transitions": 2,
    "batch_size": 8,
    "steps": 4,
    "warmup_steps": 2,
    "valid_fraction": 0.34,
    "eval_every": 2,
    "eval_windows": 16,
    "checkpoint_every": 2,
}


def run(tmp_path, name: str, cfg=None, seed: int = 0, **kw):
    out = tmp_path / name
    metrics = train_gpt(cfg or TINY_CFG, **toy_data(), seed=seed, out_path=out, progress=False, **kw)
    return out, metrics


def assert_same_weights(path_a, path_b):
    a, b = load_gpt(path_a)[0].state_dict(), load_gpt(path_b)[0].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_is_deterministic_and_writes_checkpoint(tmp_path):
    out_a, metrics = run(tmp_path, "a.pt")
    out_b, metrics_b = run(tmp_path, "b.pt")
    assert_same_weights(out_a, out_b)
    assert metrics["history"] == metrics_b["history"]
    for key in ("train_loss", "train_ll_per_token", "heldout_ll_per_token", "steps", "seconds", "num_params"):
        assert key in metrics
    assert metrics["steps"] == 4 and metrics["heldout_ll_per_token"] < 0
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    model, ckpt = load_gpt(out_a, expect={"obs_dim": OBS, "act_dim": ACT, "vocab_size": VOCAB})
    assert not model.training and model.cfg.block_size == 2 * D
    assert ckpt["metrics"]["num_params"] == model.num_params()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no partial or temp files left
    out_c, _ = run(tmp_path, "c.pt", seed=1)
    assert not torch.equal(load_gpt(out_a)[0].head_weight, load_gpt(out_c)[0].head_weight)


def test_training_reduces_loss(tmp_path):
    cfg = {**TINY_CFG, "steps": 60, "learning_rate": 3e-3, "eval_every": 0, "checkpoint_every": 0}
    _, metrics = run(tmp_path, "g.pt", cfg)
    assert metrics["heldout_ll_per_token"] > -math.log(VOCAB + 1) + 0.3


def test_resume_after_stop_is_bit_identical(tmp_path):
    out_full, full = run(tmp_path, "full.pt")
    out, first = run(tmp_path, "resumed.pt", stop_after=2)
    assert first["completed"] is False and first["steps"] == 2
    assert (tmp_path / "resumed.pt.partial.pt").exists() and not out.exists()
    _, resumed = run(tmp_path, "resumed.pt")
    assert_same_weights(out_full, out)
    assert resumed["history"] == full["history"] and resumed["train_loss"] == full["train_loss"]
    assert not (tmp_path / "resumed.pt.partial.pt").exists()


def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch):
    out_full, _ = run(tmp_path, "full.pt", {**TINY_CFG, "steps": 5})
    real = training_loop.learning_rate

    def crash_at_step_3(cfg, step, total):
        if step == 3:
            raise KeyboardInterrupt
        return real(cfg, step, total)

    monkeypatch.setattr(training_loop, "learning_rate", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed.pt", {**TINY_CFG, "steps": 5})
    monkeypatch.setattr(training_loop, "learning_rate", real)
    assert torch.load(tmp_path / "crashed.pt.partial.pt", weights_only=True)["step"] == 2
    out, _ = run(tmp_path, "crashed.pt", {**TINY_CFG, "steps": 5, "checkpoint_every": 3})
    assert_same_weights(out_full, out)


def test_incompatible_partial_checkpoint_is_refused(tmp_path):
    run(tmp_path, "g.pt", stop_after=1)
    with pytest.raises(CheckpointError, match=r"g\.pt\.partial\.pt.*cfg\.learning_rate"):
        run(tmp_path, "g.pt", {**TINY_CFG, "learning_rate": 1e-3})
    with pytest.raises(CheckpointError, match="seed"):
        run(tmp_path, "g.pt", seed=5)
    (tmp_path / "g.pt.partial.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        run(tmp_path, "g.pt")


def test_load_gpt_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_gpt(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_gpt(tmp_path / "junk.pt")
    out, _ = run(tmp_path, "g.pt", {**TINY_CFG, "steps": 1})
    with pytest.raises(CheckpointError, match=r"vocab_size expected 100, found 11"):
        load_gpt(out, expect={"obs_dim": OBS, "vocab_size": 100})
    with pytest.raises(CheckpointError, match="horizon"):
        load_gpt(out, expect={"horizon": 5})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"n_head": 3}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"dropout": True}, "dropout"),
        ({"betas": [0.9]}, "betas"),
        ({"valid_fraction": 0.0}, "valid_fraction"),
        ({"epochs": 2}, "epochs"),
        ({"steps": None}, "steps"),
        ({"action_weight": -5}, "action_weight"),
        ({"n_layers": 2}, "n_layers"),
    ],
)
def test_bad_config_raises_config_error_naming_key(override, key):
    with pytest.raises(ConfigError, match=key):
        resolve_config({**TINY_CFG, **override})


def test_epochs_set_number_of_steps(tmp_path):
    cfg = {**TINY_CFG, "steps": None, "epochs": 1, "eval_every": 0, "checkpoint_every": 0}
    _, metrics = run(tmp_path, "g.pt", cfg)
    assert metrics["steps"] == math.ceil(metrics["num_train_windows"] / TINY_CFG["batch_size"])


def test_batches_walk_through_epoch_permutations():
    seen = np.concatenate([batch_indices(seed=0, step=s, batch_size=3, num_windows=10) for s in range(10)])
    for epoch in range(3):
        assert sorted(seen[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:20])
    assert np.array_equal(batch_indices(0, 7, 3, 10), batch_indices(0, 7, 3, 10))


def test_learning_rate_warmup_then_cosine_to_floor():
    cfg = resolve_config({**TINY_CFG, "learning_rate": 1.0, "warmup_steps": 4, "min_lr_fraction": 0.1})
    assert [learning_rate(cfg, s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4, 20) == pytest.approx(1.0)
    assert learning_rate(cfg, 12, 20) == pytest.approx(0.55)
    assert learning_rate(cfg, 20, 20) == pytest.approx(0.1)


@pytest.mark.gpu
def test_cached_generation_matches_on_cuda():
    model = tiny_model().cuda()
    idx = random_tokens(2, 2 * D).cuda()
    full, _ = model(idx)
    logits, cache = model(idx[:, :3], KVCache())
    steps = [logits]
    for t in range(3, idx.size(1)):
        logits, cache = model(idx[:, t : t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_masked_value_inputs_make_predictions_blind_to_every_value_token():
    """Planning feeds a placeholder where training had true values; a masked model cannot tell them apart."""
    masked, read = tiny_model(value_inputs="masked"), tiny_model(value_inputs="read")
    idx = torch.randint(0, VOCAB, (2, 4 * D), generator=torch.Generator().manual_seed(3))  # no stop tokens
    placeholder = idx.clone()
    placeholder[:, D - 1 :: D] = VOCAB - 1  # the top bin, as a planner's prefix holds
    torch.testing.assert_close(masked(placeholder)[0], masked(idx)[0], atol=0, rtol=0)
    assert not torch.allclose(read(placeholder)[0], read(idx)[0])
    # The cached path agrees, and a state token still matters.
    logits, cache = masked(placeholder[:, : D + 1], KVCache())
    tail, _ = masked(idx[:, D + 1 :], cache)
    torch.testing.assert_close(torch.cat([logits, tail], 1), masked(idx)[0], atol=1e-5, rtol=0)
    other = idx.clone()
    other[:, 0] = (other[:, 0] + 1) % VOCAB
    assert not torch.allclose(masked(other)[0], masked(idx)[0])


def test_value_inputs_setting_is_validated_and_stored():
    with pytest.raises(ConfigError, match="value_inputs"):
        GPTConfig(obs_dim=1, act_dim=1, vocab_size=3, block_size=4, value_inputs="hidden")
    with pytest.raises(ConfigError, match="gpt.value_inputs"):
        resolve_config({"value_inputs": "hidden", "steps": 1})
    assert resolve_config({"value_inputs": "masked", "steps": 1})["value_inputs"] == "masked"
