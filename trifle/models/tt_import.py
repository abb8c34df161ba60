"""Import Trajectory Transformer's pretrained GPT checkpoints into :class:`TrajectoryGPT`.

TT (github.com/jannerm/trajectory-transformer) saves a trained GPT as a directory
(``logs/<dataset>/gpt/pretrained/`` for the released models) holding:

* ``model_config.pkl``: a pickled ``trajectory.utils.config.Config``, whose instance state is
  ``{"_class": <the class trajectory.models.transformers.GPT>, "_dict": {GPT kwargs}}``;
* ``data_config.pkl``: the same class, ``_class`` naming ``trajectory.datasets.sequence.DiscretizedDataset``
  and ``_dict`` its kwargs (``env``, ``N``, ``penalty``, ``sequence_length``, ``step``, ``discount``,
  ``discretizer``);
* ``state_<epoch>.pt``: ``torch.save(model.state_dict())``; TT's loader takes the largest epoch for
  ``epoch="latest"``.

The pickles are read without importing TT (which is not installed, and whose import pulls in gym, d4rl and
mujoco): a restricted unpickler maps TT's config class onto a small stand-in, the two class references onto
their dotted names, and refuses every other global, so a foreign or malicious pickle cannot run code.
The state dict is read with ``torch.load(weights_only=True)``.

The model is rebuilt exactly (same logits; ``tests/test_tt_import.py`` checks this against an independent
re-implementation of TT's forward pass): TT's attention masks the key of every value token, which is
``value_inputs="unattended"``; TT's head has no bias (ours is set to zero); TT's ``block_size`` is
``10 * D - 1`` for its 10-transition windows and is kept as it is. Nothing about the discretization is stored
in a TT checkpoint: TT refits its quantile bins on the D4RL dataset at load time (docs/gpt.md, "Importing
Trajectory Transformer checkpoints", says what trifle's tokens share with them); the tokens stage rebuilds
TT's bins with ``task.discretizer.quantile: tt`` (:func:`trifle.data.discretize.fit_tt_quantile`).

Command line: ``python -m trifle.models.tt_import SRC_DIR OUT.pt [--epoch N]`` writes a trifle GPT
checkpoint (format ``trifle-gpt/1``, readable by ``load_gpt``) with TT's configs under ``"source"``.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.errors import CheckpointError, ConfigError, TrifleError
from trifle.models.gpt import GPTConfig, TrajectoryGPT
from trifle.models.gpt_training import CHECKPOINT_FORMAT
from trifle.models.training_common import cpu_state
from trifle.models.training_loop import save_final

#: Where TT's classes live, as its pickles name them (module, qualified name).
TT_CONFIG_CLASS = ("trajectory.utils.config", "Config")
TT_GPT_CLASS = "trajectory.models.transformers.GPT"
TT_DATASET_CLASS = "trajectory.datasets.sequence.DiscretizedDataset"

#: The GPT kwargs TT's train script pickles (scripts/train.py), all of which the model needs.
TT_MODEL_KEYS = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "observation_dim",
    "action_dim",
    "transition_dim",
    "action_weight",
    "reward_weight",
    "value_weight",
    "embd_pdrop",
    "resid_pdrop",
    "attn_pdrop",
)

_STATE_FILE = re.compile(r"state_(\d+)\.pt")
# NumPy's scalar reconstructor (numpy.core.multiarray.scalar in 1.x, numpy._core in 2.x), found without
# touching the deprecated module path.
_NP_SCALAR = np.float64(0).__reduce__()[0]


class _TTConfig:
    """Stand-in for ``trajectory.utils.config.Config``: keeps the pickled ``_class`` and ``_dict``.

    TT's class is a Mapping that builds the class from the kwargs; here only the data is wanted, and
    unpickling must never construct anything (``__setstate__`` just stores the state).
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"Config state is a {type(state).__name__}, expected a dict")
        self.state = state


class _TTUnpickler(pickle.Unpickler):
    """Resolves TT's config class and the two class references it names; refuses every other global.

    A class reference (``_class``) becomes its dotted name: the GPT is rebuilt here, never TT's class.
    NumPy scalars are allowed too, in case a config value was one (they only hold a number).
    """

    _SAFE = {
        TT_CONFIG_CLASS: _TTConfig,
        tuple(TT_GPT_CLASS.rsplit(".", 1)): TT_GPT_CLASS,
        tuple(TT_DATASET_CLASS.rsplit(".", 1)): TT_DATASET_CLASS,
        ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
        ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._SAFE[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: refusing to unpickle {module}.{name}; a Trajectory Transformer config holds "
                f"only {'.'.join(TT_CONFIG_CLASS)} naming {TT_GPT_CLASS} or {TT_DATASET_CLASS}"
            ) from None


def _plain(value: Any) -> Any:
    """NumPy scalars as Python numbers, so the configs can be stored in a JSON-like checkpoint entry."""
    return value.item() if isinstance(value, np.generic) else value


def read_tt_config(path: str | Path, expected_class: str) -> dict[str, Any]:
    """The kwargs dict of one of TT's pickled ``Config`` objects, whose ``_class`` must be ``expected_class``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; expected Trajectory Transformer's {path.name}")
    try:
        with open(path, "rb") as fh:
            obj = _TTUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or foreign bytes: pickle raises many types
        raise CheckpointError(
            f"{path}: not a readable Trajectory Transformer config pickle ({type(exc).__name__}: {exc})"
        ) from exc
    state = obj.state if isinstance(obj, _TTConfig) else None
    if not isinstance(state, dict) or not isinstance(state.get("_dict"), dict):
        raise CheckpointError(
            f"{path}: expected a pickled {'.'.join(TT_CONFIG_CLASS)} with a '_dict' of kwargs"
        )
    if state.get("_class") != expected_class:
        raise CheckpointError(f"{path}: the config is for {state.get('_class')!r}, expected {expected_class}")
    return {str(k): _plain(v) for k, v in state["_dict"].items()}


def find_state_file(directory: str | Path, epoch: int | str = "latest") -> tuple[Path, int]:
    """``state_<epoch>.pt`` in ``directory``; ``"latest"`` is the largest epoch there, as TT's loader picks."""
    directory = Path(directory)
    epochs = sorted(
        int(m.group(1)) for p in directory.glob("state_*.pt") if (m := _STATE_FILE.fullmatch(p.name))
    )
    if epoch == "latest":
        if not epochs:
            raise CheckpointError(
                f"{directory}: no state_<epoch>.pt file; expected a Trajectory Transformer GPT"
            )
        epoch = epochs[-1]
    try:
        epoch = int(epoch)
    except (TypeError, ValueError):
        raise ConfigError(f"epoch: expected an integer or 'latest', got {epoch!r}") from None
    path = directory / f"state_{epoch}.pt"
    if not path.is_file():
        have = ", ".join(map(str, epochs)) or "none"
        raise CheckpointError(f"{path}: epoch {epoch} not found; epochs in {directory}: {have}")
    return path, epoch


def gpt_config_from_tt(model_cfg: Mapping[str, Any], source: Path) -> GPTConfig:
    """Our :class:`GPTConfig` for TT's GPT kwargs (``value_inputs`` is fixed later from the stored mask)."""
    missing = [k for k in TT_MODEL_KEYS if k not in model_cfg]
    if missing:
        raise CheckpointError(f"{source}: missing GPT setting(s) {', '.join(missing)}")
    obs, act, dim = model_cfg["observation_dim"], model_cfg["action_dim"], model_cfg["transition_dim"]
    if dim != obs + act + 2:
        raise CheckpointError(
            f"{source}: transition_dim={dim}, expected observation_dim + action_dim + 2 = {obs + act + 2}"
        )
    # One dropout rate here, three in TT; they only matter for further training (TT's are all 0.1).
    dropout = max(float(model_cfg[k]) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop"))
    try:
        return GPTConfig(
            obs_dim=obs,
            act_dim=act,
            vocab_size=model_cfg["vocab_size"],
            block_size=model_cfg["block_size"],
            n_layer=model_cfg["n_layer"],
            n_head=model_cfg["n_head"],
            n_embd=model_cfg["n_embd"],
            dropout=dropout,
            action_weight=float(model_cfg["action_weight"]),
            reward_weight=float(model_cfg["reward_weight"]),
            value_weight=float(model_cfg["value_weight"]),
            value_inputs="unattended",
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def tt_attention_mask(block_size: int, transition_dim: int, value_masked: bool = True) -> torch.Tensor:
    """The ``[1, 1, block, block]`` mask TT builds: causal, and (``value_masked``) the value columns zeroed."""
    mask = torch.tril(torch.ones(block_size, block_size))
    if value_masked:
        mask[:, transition_dim - 1 :: transition_dim] = 0
    return mask.view(1, 1, block_size, block_size)


def _value_inputs_from_masks(state: Mapping[str, torch.Tensor], cfg: GPTConfig, source: Path) -> str:
    """Which of our value-input modes computes what TT's stored attention masks do.

    TT's mask is a buffer saved with the weights and restored by ``load_state_dict``, so the stored one
    is what the checkpoint computes: the current source's mask (value keys hidden) is ``unattended``; a
    plain causal mask (no value masking) is ``read``. Anything else cannot be expressed and is refused.
    """
    masks = [state[f"blocks.{i}.attn.mask"] for i in range(cfg.n_layer) if f"blocks.{i}.attn.mask" in state]
    if not masks:
        return "unattended"  # not stored: TT's source builds the value-masked one
    found = set()
    for i, mask in enumerate(masks):
        mask = mask.float()
        if torch.equal(mask, tt_attention_mask(cfg.block_size, cfg.transition_dim, True)):
            found.add("unattended")
        elif torch.equal(mask, tt_attention_mask(cfg.block_size, cfg.transition_dim, False)):
            found.add("read")
        else:
            raise CheckpointError(
                f"{source}: blocks.{i}.attn.mask is neither TT's value-masked causal mask nor a causal "
                f"mask of block_size {cfg.block_size}; this attention pattern cannot be imported"
            )
    if len(found) > 1:
        raise CheckpointError(f"{source}: the layers' attention masks differ (some hide value tokens)")
    return found.pop()


def convert_state_dict(
    state: Mapping[str, torch.Tensor], cfg: GPTConfig, source: Path
) -> dict[str, torch.Tensor]:
    """TT's parameter names and layouts -> ours, every shape checked first.

    Mapping (E = n_embd, D = transition_dim, V = vocab_size, i = layer):

    * ``tok_emb.weight [V*D+1, E]``, ``pos_emb [1, block, E]``, ``ln_f.*``: same names;
    * ``blocks.i.ln1.*``, ``blocks.i.ln2.*``, ``blocks.i.attn.proj.*``, ``blocks.i.mlp.{0,2}.*``: same names;
    * ``blocks.i.attn.{query,key,value}.{weight,bias}`` -> ``blocks.i.attn.qkv.*``, concatenated in that
      order (our fused projection splits its output as q, k, v);
    * ``head.weight [D, V+1, E]`` (EinLinear) -> ``head_weight [D, E, V+1]`` (transposed);
      ``head_bias`` is zero (TT's head has none);
    * ``blocks.i.attn.mask``: not a parameter; read by :func:`_value_inputs_from_masks`.

    A missing, unexpected or misshapen entry is a CheckpointError with one line per problem.
    """
    E, D, V, B = cfg.n_embd, cfg.transition_dim, cfg.vocab_size, cfg.block_size
    expected: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (V * D + 1, E),
        "pos_emb": (1, B, E),
        "ln_f.weight": (E,),
        "ln_f.bias": (E,),
        "head.weight": (D, V + 1, E),
    }
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            expected[f"{p}{ln}.weight"] = expected[f"{p}{ln}.bias"] = (E,)
        for name in ("key", "query", "value", "proj"):
            expected[f"{p}attn.{name}.weight"] = (E, E)
            expected[f"{p}attn.{name}.bias"] = (E,)
        expected[f"{p}attn.mask"] = (1, 1, B, B)
        expected[f"{p}mlp.0.weight"], expected[f"{p}mlp.0.bias"] = (4 * E, E), (4 * E,)
        expected[f"{p}mlp.2.weight"], expected[f"{p}mlp.2.bias"] = (E, 4 * E), (E,)
    problems = []
    for key, shape in expected.items():
        if key not in state:
            if not key.endswith("attn.mask"):
                problems.append(f"{key}: missing, expected shape {list(shape)}")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, found {list(state[key].shape)}")
    problems += [
        f"{key}: unexpected entry (shape {list(state[key].shape)})" for key in state if key not in expected
    ]
    if problems:
        raise CheckpointError(f"{source}: weights do not match model_config.pkl:\n  " + "\n  ".join(problems))
    out = {k: v for k, v in state.items() if not k.startswith("blocks.") and k != "head.weight"}
    out["head_weight"] = state["head.weight"].transpose(1, 2)
    out["head_bias"] = torch.zeros(D, V + 1, dtype=state["head.weight"].dtype)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for suffix in ("weight", "bias"):
            for ln in ("ln1", "ln2"):
                out[f"{p}{ln}.{suffix}"] = state[f"{p}{ln}.{suffix}"]
            out[f"{p}attn.qkv.{suffix}"] = torch.cat(
                [state[f"{p}attn.{n}.{suffix}"] for n in ("query", "key", "value")]
            )
            out[f"{p}attn.proj.{suffix}"] = state[f"{p}attn.proj.{suffix}"]
            out[f"{p}mlp.0.{suffix}"] = state[f"{p}mlp.0.{suffix}"]
            out[f"{p}mlp.2.{suffix}"] = state[f"{p}mlp.2.{suffix}"]
    return {k: v.float().contiguous() for k, v in out.items()}


def import_tt_checkpoint(
    directory: str | Path, epoch: int | str = "latest"
) -> tuple[TrajectoryGPT, dict[str, Any]]:
    """Rebuild TT's GPT saved in ``directory`` as an eval-mode :class:`TrajectoryGPT` on the CPU.

    Returns the model and ``info``: ``epoch``, ``state_file``, ``model_config`` and ``data_config`` (TT's
    pickled kwargs, as plain values), ``value_inputs`` (from the stored attention masks) and ``notes``
    (what a user of the model must know: TT's block size, its discretization settings).
    Every problem is a CheckpointError naming the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: not a directory; expected a Trajectory Transformer GPT directory"
        )
    model_path, data_path = directory / "model_config.pkl", directory / "data_config.pkl"
    model_cfg = read_tt_config(model_path, TT_GPT_CLASS)
    data_cfg = read_tt_config(data_path, TT_DATASET_CLASS)
    state_path, epoch = find_state_file(directory, epoch)
    cfg = gpt_config_from_tt(model_cfg, model_path)
    if "N" in data_cfg and data_cfg["N"] != cfg.vocab_size:
        raise CheckpointError(
            f"{data_path}: N={data_cfg['N']}, but model_config.pkl has vocab_size={cfg.vocab_size}"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(
            f"{state_path}: cannot read TT's state dict ({type(exc).__name__}: {first})"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{state_path}: expected a state dict of tensors (TT's model.state_dict())")
    params = convert_state_dict(state, cfg, state_path)
    cfg.value_inputs = _value_inputs_from_masks(state, cfg, state_path)
    model = TrajectoryGPT(cfg)
    model.load_state_dict(params)
    notes = []
    D = cfg.transition_dim
    if cfg.block_size % D:
        notes.append(
            f"block_size {cfg.block_size} = {cfg.block_size // D} transitions + {cfg.block_size % D} tokens "
            "(TT: windows of sequence_length transitions minus the last value token); kept as trained"
        )
    if data_cfg.get("step", 1) != 1:
        notes.append(f"step={data_cfg['step']}: TT trained on every {data_cfg['step']}-th transition")
    info = {
        "format": "trajectory-transformer",
        "directory": str(directory),
        "epoch": epoch,
        "state_file": str(state_path),
        "model_config": model_cfg,
        "data_config": data_cfg,
        "value_inputs": cfg.value_inputs,
        "notes": notes,
    }
    return model.eval(), info


def write_imported_checkpoint(model: TrajectoryGPT, info: Mapping[str, Any], out_path: str | Path) -> None:
    """Save an imported model as a trifle GPT checkpoint (``load_gpt`` reads it), atomically.

    It carries no ``data`` fingerprint: TT's training tokens are not trifle's token file, so
    ``load_checked_gpt`` checks its shapes only; ``source`` keeps TT's configs and the epoch.
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": model.cfg.to_dict(),
        "train_config": None,
        "seed": None,
        "state_dict": cpu_state(model),
        "metrics": {},
        "source": dict(info),
    }
    save_final(out_path, checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trifle.models.tt_import",
        description="Convert a Trajectory Transformer GPT directory (model_config.pkl, data_config.pkl, "
        "state_<epoch>.pt) into a trifle GPT checkpoint.",
    )
    parser.add_argument("source", type=Path, help="TT's directory, e.g. logs/hopper-medium-v2/gpt/pretrained")
    parser.add_argument("out", type=Path, help="the trifle checkpoint to write (.pt)")
    parser.add_argument("--epoch", default="latest", help="state_<epoch>.pt to read (default: the latest)")
    args = parser.parse_args(argv)
    try:
        model, info = import_tt_checkpoint(args.source, args.epoch)
        write_imported_checkpoint(model, info, args.out)
    except TrifleError as err:
        print(f"trifle tt_import: error: {err}", file=sys.stderr)
        return 1
    cfg = model.cfg
    print(
        f"trifle tt_import: wrote {args.out} (epoch {info['epoch']}; obs {cfg.obs_dim}, act {cfg.act_dim}, "
        f"vocab {cfg.vocab_size}, block {cfg.block_size}, {cfg.n_layer} layers, value_inputs={cfg.value_inputs})"
    )
    for note in info["notes"]:
        print(f"trifle tt_import: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
