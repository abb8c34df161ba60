"""Importing Trajectory Transformer checkpoints: TT's file format in, TT's logits out.

The files are written here exactly as TT writes them (scripts/train.py, trajectory/utils/config.py): a
``Config`` pickled under TT's module path (a throwaway ``trajectory`` package lives in ``sys.modules`` only
while pickling, so the bytes name TT's classes and the importer never sees them), and ``torch.save`` of a
state dict with TT's parameter names. The logits are compared with a reference forward pass written from
TT's architecture (trajectory/models/transformers.py, ein.py), independent of trifle's model: explicit
masked attention, per-column embedding offsets, the EinLinear head.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trifle.data.discretize import fit_quantile, fit_tt_quantile
from trifle.errors import CheckpointError
from trifle.models.gpt import KVCache
from trifle.models.gpt_training import load_gpt
from trifle.models.tt_import import (
    import_tt_checkpoint,
    main,
    write_imported_checkpoint,
)

OBS, ACT, V, E, H, L = 3, 2, 7, 16, 2, 2
D = OBS + ACT + 2
BLOCK = 3 * D - 1  # TT: subsampled_sequence_length * transition_dim - 1


# --- TT's file format ---------------------------------------------------------------------------


@contextmanager
def tt_modules() -> Iterator[dict[str, type]]:
    """Stand-ins for TT's classes, registered under TT's module paths only inside the block."""

    class Config(Mapping):
        """Like TT's: a Mapping over the kwargs, whose instance state is exactly ``_class`` and ``_dict``."""

        def __init__(self, _class, **kwargs):
            self._class = _class
            self._dict = dict(kwargs)

        def __getitem__(self, key):
            return self._dict[key]

        def __iter__(self):
            return iter(self._dict)

        def __len__(self):
            return len(self._dict)

    class GPT:
        pass

    class ConditionalGPT:
        pass

    class DiscretizedDataset:
        pass

    leaves = {
        "trajectory.utils.config": {"Config": Config},
        "trajectory.models.transformers": {"GPT": GPT, "ConditionalGPT": ConditionalGPT},
        "trajectory.datasets.sequence": {"DiscretizedDataset": DiscretizedDataset},
    }
    names = ["trajectory", "trajectory.utils", "trajectory.models", "trajectory.datasets", *leaves]
    assert not any(n in sys.modules for n in names)
    classes = {}
    try:
        for name in names:
            module = types.ModuleType(name)
            for cls_name, cls in leaves.get(name, {}).items():
                cls.__module__, cls.__qualname__ = name, cls_name
                setattr(module, cls_name, cls)
                classes[cls_name] = cls
            sys.modules[name] = module
        yield classes
    finally:
        for name in names:
            sys.modules.pop(name, None)


def model_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=V,
        block_size=BLOCK,
        n_layer=L,
        n_head=H,
        n_embd=E,
        observation_dim=OBS,
        action_dim=ACT,
        transition_dim=D,
        action_weight=5,
        reward_weight=1,
        value_weight=1,
        embd_pdrop=0.1,
        resid_pdrop=0.1,
        attn_pdrop=0.1,
    )
    return {**kwargs, **overrides}


def data_kwargs() -> dict:
    return dict(
        env="hopper-medium-v2",
        N=V,
        penalty=-100,
        sequence_length=3,
        step=1,
        discount=0.99,
        discretizer="QuantileDiscretizer",
    )


def tt_mask(block: int, value_masked: bool = True) -> torch.Tensor:
    mask = torch.tril(torch.ones(block, block))
    if value_masked:
        for col in range(D - 1, block, D):
            mask[:, col] = 0.0
    return mask.view(1, 1, block, block)


def tt_state(seed: int = 0, value_masked: bool = True, **shapes) -> OrderedDict:
    """A TT GPT state dict with random weights, in TT's key names and layouts."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = OrderedDict()
    state["tok_emb.weight"] = rand(V * D + 1, E, scale=1.0)
    state["pos_emb"] = rand(1, BLOCK, E, scale=0.5)
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            state[f"{p}{ln}.weight"] = 1.0 + rand(E, scale=0.2)
            state[f"{p}{ln}.bias"] = rand(E, scale=0.2)
        for name in ("key", "query", "value"):
            state[f"{p}attn.{name}.weight"] = rand(E, E)
            state[f"{p}attn.{name}.bias"] = rand(E, scale=0.1)
        state[f"{p}attn.mask"] = tt_mask(BLOCK, value_masked)
        state[f"{p}attn.proj.weight"] = rand(E, E)
        state[f"{p}attn.proj.bias"] = rand(E, scale=0.1)
        state[f"{p}mlp.0.weight"] = rand(4 * E, E)
        state[f"{p}mlp.0.bias"] = rand(4 * E, scale=0.1)
        state[f"{p}mlp.2.weight"] = rand(E, 4 * E, scale=0.15)
        state[f"{p}mlp.2.bias"] = rand(E, scale=0.1)
    state["ln_f.weight"] = 1.0 + rand(E, scale=0.2)
    state["ln_f.bias"] = rand(E, scale=0.2)
    state["head.weight"] = rand(D, V + 1, E)
    for key, shape in shapes.items():
        state[key.replace("__", ".")] = rand(*shape)
    return state


def write_tt_dir(directory: Path, *, epochs=(0,), model=None, data=None, state=None, gpt_class="GPT") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with tt_modules() as cls:
        config = cls["Config"]
        model_cfg = config(cls[gpt_class], **(model or model_kwargs()))
        data_cfg = config(cls["DiscretizedDataset"], **(data or data_kwargs()))
        # TT ran Python 3.8, whose default pickle protocol is 4.
        (directory / "model_config.pkl").write_bytes(pickle.dumps(model_cfg, protocol=4))
        (directory / "data_config.pkl").write_bytes(pickle.dumps(data_cfg, protocol=4))
    for epoch in epochs:
        torch.save(state if state is not None else tt_state(seed=epoch), directory / f"state_{epoch}.pt")
    return directory


# --- An independent TT forward pass ----------------------------------------------------------------


def tt_reference_logits(state: Mapping[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """TT's GPT.forward in eval mode, in float64, straight from its description."""
    s = {k: v.double() for k, v in state.items()}
    b, t = idx.shape
    cols = torch.arange(t) % D
    # offset_tokens: column c's tokens live at c * V; the stop token (V) has one shared row, V * D.
    emb = torch.where(idx == V, torch.full_like(idx, V * D), idx + cols * V)
    x = s["tok_emb.weight"][emb] + s["pos_emb"][0, :t]
    hd = E // H
    for i in range(L):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (E,), s[f"{p}ln1.weight"], s[f"{p}ln1.bias"], eps=1e-5)

        def heads(name, h=h, p=p):
            out = h @ s[f"{p}attn.{name}.weight"].T + s[f"{p}attn.{name}.bias"]
            return out.view(b, t, H, hd).transpose(1, 2)

        q, k, v = heads("query"), heads("key"), heads("value")
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(s[f"{p}attn.mask"][:, :, :t, :t] == 0, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, E)
        x = x + y @ s[f"{p}attn.proj.weight"].T + s[f"{p}attn.proj.bias"]
        h = F.layer_norm(x, (E,), s[f"{p}ln2.weight"], s[f"{p}ln2.bias"], eps=1e-5)
        h = F.gelu(h @ s[f"{p}mlp.0.weight"].T + s[f"{p}mlp.0.bias"])
        x = x + h @ s[f"{p}mlp.2.weight"].T + s[f"{p}mlp.2.bias"]
    x = F.layer_norm(x, (E,), s["ln_f.weight"], s["ln_f.bias"], eps=1e-5)
    # EinLinear: weight [D, V + 1, E]; position t uses column t % D's map, no bias.
    return torch.einsum("tvi,bti->btv", s["head.weight"][cols], x)


def random_idx(batch: int = 3, length: int = BLOCK, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (batch, length), generator=g)
    idx[0, 2 * D :] = V  # stop tokens after a terminal transition
    return idx


# --- Exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_masked", [True, False])
def test_imported_logits_match_tts_forward(tmp_path, value_masked):
    state = tt_state(value_masked=value_masked)
    model, info = import_tt_checkpoint(write_tt_dir(tmp_path / "tt", state=state))
    assert info["value_inputs"] == ("unattended" if value_masked else "read")
    assert model.cfg.value_inputs == info["value_inputs"] and not model.training
    idx = random_idx()
    expected = tt_reference_logits(state, idx)
    with torch.no_grad():
        logits, _ = model(idx)
    assert logits.shape == (3, BLOCK, V + 1)
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.5  # the weights are far from an init, so a wrong mapping would show


@pytest.mark.parametrize("chunk", [1, 3, D])
def test_imported_logits_match_with_the_kv_cache(tmp_path, chunk):
    state = tt_state(seed=3)
    model, _ = import_tt_checkpoint(write_tt_dir(tmp_path / "tt", state=state))
    idx = random_idx(seed=4)
    expected = tt_reference_logits(state, idx)
    cache, parts = KVCache(), []
    with torch.no_grad():
        for start in range(0, BLOCK, chunk):
            logits, cache = model(idx[:, start : start + chunk], cache)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1).double(), expected, atol=1e-5, rtol=1e-5)
    # A cache extended by a branch, then selected, still agrees (the planner's use).
    with torch.no_grad():
        _, prefix = model(idx[:, : D + 2], KVCache())
        picked = prefix.select(torch.tensor([2, 0]))
        logits, _ = model(idx[[2, 0], D + 2 :], picked)
    torch.testing.assert_close(logits.double(), expected[[2, 0], D + 2 :], atol=1e-5, rtol=1e-5)


def test_tts_mask_lets_a_value_token_reach_only_its_own_position(tmp_path):
    """What TT's mask does: no query attends to a value token's key, so changing a value token changes the
    logits at its own position (through the residual stream: the head that predicts the next state's first
    token) and nowhere else. Our ``read`` mode would change every later position."""
    state = tt_state(seed=5)
    model, _ = import_tt_checkpoint(write_tt_dir(tmp_path / "tt", state=state))
    idx = random_idx(batch=1, seed=6)
    other = idx.clone()
    other[0, D - 1] = (idx[0, D - 1] + 3) % V  # the first transition's value token
    with torch.no_grad():
        changed = (model(idx)[0] - model(other)[0]).abs().amax(-1)[0]
    assert changed[D - 1] > 1e-3
    assert torch.all(torch.cat([changed[: D - 1], changed[D:]]) == 0)
    ref = (tt_reference_logits(state, idx) - tt_reference_logits(state, other)).abs().amax(-1)[0]
    assert torch.all(torch.cat([ref[: D - 1], ref[D:]]) == 0)


def test_unattended_forward_refuses_a_sequence_starting_at_a_value_token(tmp_path):
    model, _ = import_tt_checkpoint(write_tt_dir(tmp_path / "tt"))
    with pytest.raises(ValueError, match="value position"):
        model(random_idx(length=2), start=D - 1)


def test_info_epochs_and_the_written_checkpoint(tmp_path, capsys):
    src = write_tt_dir(tmp_path / "tt", epochs=(0, 5, 12))
    model, info = import_tt_checkpoint(src)
    assert info["epoch"] == 12 and info["state_file"].endswith("state_12.pt")
    assert info["model_config"]["n_embd"] == E and info["data_config"]["discount"] == 0.99
    assert any("block_size" in note for note in info["notes"])
    early, info5 = import_tt_checkpoint(src, epoch=5)
    assert info5["epoch"] == 5
    torch.testing.assert_close(early.tok_emb.weight, tt_state(seed=5)["tok_emb.weight"])
    cfg = model.cfg
    assert (cfg.obs_dim, cfg.act_dim, cfg.vocab_size, cfg.block_size) == (OBS, ACT, V, BLOCK)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.action_weight) == (L, H, E, 5.0)

    out = tmp_path / "gpt.pt"
    write_imported_checkpoint(model, info, out)
    loaded, ckpt = load_gpt(out, expect={"obs_dim": OBS, "act_dim": ACT, "vocab_size": V})
    assert ckpt["source"]["epoch"] == 12 and "data" not in ckpt
    idx = random_idx()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0])

    cli_out = tmp_path / "cli.pt"
    assert main([str(src), str(cli_out), "--epoch", "5"]) == 0
    assert "value_inputs=unattended" in capsys.readouterr().out
    assert load_gpt(cli_out)[1]["source"]["epoch"] == 5


# --- Error lines ---------------------------------------------------------------------------------


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        fn(*args, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("missing", ["model_config.pkl", "data_config.pkl"])
def test_missing_config_file_is_named(tmp_path, missing):
    src = write_tt_dir(tmp_path / "tt")
    (src / missing).unlink()
    message = _error(import_tt_checkpoint, src)
    assert message == f"{src / missing}: file not found; expected Trajectory Transformer's {missing}"


def test_missing_state_file_and_directory(tmp_path):
    src = write_tt_dir(tmp_path / "tt")
    (src / "state_0.pt").unlink()
    assert "no state_<epoch>.pt file" in _error(import_tt_checkpoint, src)
    assert "not a directory" in _error(import_tt_checkpoint, tmp_path / "nowhere")


def test_epoch_not_found_lists_the_epochs(tmp_path):
    src = write_tt_dir(tmp_path / "tt", epochs=(0, 5))
    message = _error(import_tt_checkpoint, src, epoch=7)
    assert message == f"{src / 'state_7.pt'}: epoch 7 not found; epochs in {src}: 0, 5"


def test_a_pickle_naming_another_class_is_refused_without_running_it(tmp_path):
    src = write_tt_dir(tmp_path / "tt")
    (src / "model_config.pkl").write_bytes(pickle.dumps({"payload": print}, protocol=4))
    message = _error(import_tt_checkpoint, src)
    assert message.startswith(f"{src / 'model_config.pkl'}: refusing to unpickle builtins.print;")
    assert "\n" not in message
    # TT's goal-conditioned GPT is a different architecture: its class is refused too.
    write_tt_dir(src, gpt_class="ConditionalGPT")
    assert "refusing to unpickle trajectory.models.transformers.ConditionalGPT" in _error(
        import_tt_checkpoint, src
    )


def test_the_configs_must_be_the_model_and_the_data_config(tmp_path):
    src = write_tt_dir(tmp_path / "tt")
    (src / "data_config.pkl").write_bytes((src / "model_config.pkl").read_bytes())
    message = _error(import_tt_checkpoint, src)
    assert "config is for 'trajectory.models.transformers.GPT', expected" in message
    (src / "model_config.pkl").write_bytes(b"not a pickle")
    assert "not a readable Trajectory Transformer config pickle" in _error(import_tt_checkpoint, src)


def test_shape_mismatches_get_one_line_each(tmp_path):
    state = tt_state()
    state["blocks.1.attn.key.weight"] = torch.zeros(E, E // 2)
    state["head.weight"] = torch.zeros(D, V, E)
    del state["ln_f.bias"]
    state["head.bias"] = torch.zeros(D, V + 1)
    src = write_tt_dir(tmp_path / "tt", state=state)
    lines = _error(import_tt_checkpoint, src).splitlines()
    assert lines[0] == f"{src / 'state_0.pt'}: weights do not match model_config.pkl:"
    assert sorted(line.strip() for line in lines[1:]) == [
        f"blocks.1.attn.key.weight: expected shape [{E}, {E}], found [{E}, {E // 2}]",
        f"head.bias: unexpected entry (shape [{D}, {V + 1}])",
        f"head.weight: expected shape [{D}, {V + 1}, {E}], found [{D}, {V}, {E}]",
        f"ln_f.bias: missing, expected shape [{E}]",
    ]


def test_inconsistent_configs_and_foreign_masks_are_refused(tmp_path):
    src = write_tt_dir(tmp_path / "a", model=model_kwargs(transition_dim=D + 1))
    assert "transition_dim=8, expected observation_dim + action_dim + 2 = 7" in _error(
        import_tt_checkpoint, src
    )
    src = write_tt_dir(tmp_path / "b", data={**data_kwargs(), "N": V + 1})
    assert f"N={V + 1}, but model_config.pkl has vocab_size={V}" in _error(import_tt_checkpoint, src)
    state = tt_state()
    state["blocks.0.attn.mask"] = torch.ones(1, 1, BLOCK, BLOCK)
    src = write_tt_dir(tmp_path / "c", state=state)
    assert "blocks.0.attn.mask is neither" in _error(import_tt_checkpoint, src)


# --- Discretization ------------------------------------------------------------------------------


def tt_quantile_tokens(data: np.ndarray, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TT's QuantileDiscretizer rule for one column, from its description: thresholds every
    ceil(len/N)-th sorted value then the maximum; a value's token is the index of the last threshold at
    or below it (0 below all, the threshold count above all), clipped to N - 1. Also the midpoints."""
    thresholds = np.concatenate([np.sort(data)[:: math.ceil(len(data) / n)], [data.max()]])
    tokens = []
    for value in x:
        at_or_below = [i for i, t in enumerate(thresholds) if value >= t]
        if not at_or_below:
            token = 0
        elif len(at_or_below) == len(thresholds):
            token = len(thresholds)
        else:
            token = at_or_below[-1]
        tokens.append(min(token, n - 1))
    return np.array(tokens), (thresholds[:-1] + thresholds[1:]) / 2


@pytest.mark.parametrize(
    ("size", "n_bins", "ties"), [(700, 7, False), (703, 7, True), (1000, 10, True), (40, 10, False)]
)
def test_fit_tt_quantile_reproduces_tts_tokens_and_values(size, n_bins, ties):
    rng = np.random.default_rng(size)
    data = rng.normal(size=size)
    if ties:  # repeated values: tied thresholds leave empty bins in TT, merged bins in fit_quantile
        data[: size // 3] = np.round(data[: size // 3], 1)
        data[-5:] = -100.0
    bins = fit_tt_quantile(data, n_bins)
    assert bins.num_bins == n_bins
    probe = np.concatenate([data, rng.normal(size=50) * 3, [data.min() - 1, data.max(), data.max() + 1]])
    expected, midpoints = tt_quantile_tokens(data, probe, n_bins)
    np.testing.assert_array_equal(bins.encode(probe, "c"), expected)
    used = np.unique(expected[expected < len(midpoints)])
    np.testing.assert_allclose(bins.values[used], midpoints[used])


def test_trifles_quantile_bins_are_close_to_tts_but_not_equal():
    """The evidence behind docs/gpt.md. TT's edge j is the sorted value at j ceil(n / N), trifle's at
    ceil(j n / N) (in floating point): edge j moves by less than j values. With n >= N^2 that is less than
    a bin, so tokens differ by at most one, for fewer than N^2 / 2 values; none for some n, a few rounding
    cases when N divides n. With fewer values TT's thresholds run out before N bins and the tokens drift."""
    rng = np.random.default_rng(0)
    differ = {}
    for size in (1999, 2000, 10050):
        data = rng.normal(size=size)
        ours = fit_quantile(data, 100).encode(data, "c")
        tts, _ = tt_quantile_tokens(data, data, 100)
        assert np.abs(ours - tts).max() <= 1
        differ[size] = int((ours != tts).sum())
    assert differ[1999] == 0 and 0 < differ[2000] <= 99 and 1000 < differ[10050] < 100 * 99 / 2
    data = rng.normal(size=1003)  # TT: 11 values a bin, so 92 thresholds and 91 bins + the maximum's token
    tts, _ = tt_quantile_tokens(data, data, 100)
    assert len(np.unique(tts)) < 95 and np.abs(fit_quantile(data, 100).encode(data, "c") - tts).max() > 1


def test_tokens_with_the_tt_rule_are_tts_tokens_fitted_without_the_last_row():
    """`task.discretizer.quantile: tt`: every quantile column binned by TT's rule, fitted as TT fits it, on
    qlearning_dataset_with_timeouts' rows (all but the dataset's last); categorical columns unchanged."""
    from trifle.data.labels import LabeledTrajectories
    from trifle.data.tokens import tokenize

    rng = np.random.default_rng(3)
    n, obs, act = 1003, 2, 1
    labeled = LabeledTrajectories(
        observations=rng.normal(size=(n, obs)).astype(np.float32),
        actions=rng.integers(0, 3, size=(n, act)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        values=rng.normal(size=n).astype(np.float32),
        episode_starts=np.array([0, 500], np.int64),
        episode_terminal=np.array([True, False]),
    )
    labeled.observations[-1] = 50.0  # the last row: outside TT's fit, so above every threshold
    cfg = {"observations": "quantile", "actions": "categorical", "rewards": "quantile", "values": "quantile"}
    data = tokenize(labeled, {**cfg, "n_bins": 10, "quantile": "tt"})
    table = np.column_stack([labeled.observations, labeled.actions, labeled.rewards, labeled.values])
    for j in (0, 1, 3, 4):
        expected, _ = tt_quantile_tokens(table[:-1, j].astype(np.float64), table[:, j].astype(np.float64), 10)
        np.testing.assert_array_equal(data.tokens[:, j], expected)
    np.testing.assert_array_equal(data.tokens[:, 2], table[:, 2].astype(int))
    assert data.tokens[-1, 0] == 9  # the unseen maximum takes the top token, as in TT
    ours = tokenize(labeled, {**cfg, "n_bins": 10, "quantile": "trifle"})
    assert (ours.tokens != data.tokens).any()
