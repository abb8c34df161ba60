"""A trained GPT checked against what its user asks of it: the config's architecture and the token file.

A planner reads the GPT with a token file's discretizer and, in the workflow, with the config the GPT was
trained with. A checkpoint of another architecture (``gpt.n_layer=4`` asked, two layers trained) or of
other data would otherwise be evaluated silently, so every consumer loads it through
:func:`load_checked_gpt`, and the checks are made once, the same way, before any rollout. They live here,
not in the trainer's module, so that changing them does not retrain every GPT (trifle.fingerprint).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trifle.data.tokens import TokenData
from trifle.errors import CheckpointError
from trifle.models.gpt import TrajectoryGPT
from trifle.models.gpt_settings import resolve_config
from trifle.models.gpt_training import data_fingerprint, load_gpt

#: The ``gpt.*`` keys that shape the trained network (the others only steer its training).
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "seq_transitions", "value_inputs")


def load_checked_gpt(
    path: str | Path,
    *,
    tokens: TokenData,
    tokens_path: str | Path | None = None,
    gpt_cfg: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[TrajectoryGPT, dict[str, Any]]:
    """:func:`load_gpt` for use with ``tokens``: the checkpoint must have been trained on exactly these
    tokens (its stored data hash) and, given ``gpt_cfg`` (the ``gpt`` config section), with its
    architecture. A CheckpointError names the checkpoint, the key or the token file, and both values.

    A checkpoint without a data hash (built by hand, not by ``train_gpt``) is only checked for its shape.
    An imported one (``source``: Trajectory Transformer's, trifle.models.tt_import) has the architecture it
    was released with, which no ``gpt`` config describes: it too is checked for its shape only.
    """
    expect = {"obs_dim": tokens.obs_dim, "act_dim": tokens.act_dim, "vocab_size": tokens.vocab_size}
    model, ckpt = load_gpt(path, expect=expect, device=device)
    if gpt_cfg is not None and ckpt.get("source") is None:
        requested = resolve_config(gpt_cfg)
        cfg = model.cfg
        trained = {
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "seq_transitions": cfg.block_size // tokens.transition_dim,
            "value_inputs": cfg.value_inputs,
        }
        for key in ARCHITECTURE_KEYS:
            if trained[key] != requested[key]:
                raise CheckpointError(
                    f"{path}: trained with gpt.{key}={trained[key]!r}, but the config asks for "
                    f"gpt.{key}={requested[key]!r}; expected the settings the checkpoint was trained with"
                )
    data = ckpt.get("data")
    if data is not None:
        found = data_fingerprint(tokens.tokens, tokens.episode_starts, tokens.episode_terminal)
        if data.get("sha256") != found["sha256"]:
            where = tokens_path if tokens_path is not None else "the given token file"
            raise CheckpointError(
                f"{path}: trained on other data than {where} ({data.get('rows')} rows in "
                f"{data.get('episodes')} episodes, sha256 {str(data.get('sha256'))[:12]}; the token file: "
                f"{found['rows']} rows in {found['episodes']} episodes, sha256 {found['sha256'][:12]}); "
                "expected the tokens the GPT was trained on"
            )
    return model, ckpt
