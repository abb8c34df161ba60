"""Stage `import_gpt`: a released Trajectory Transformer GPT as a task's GPT (workflow `protocol: pretrained`).

The model is TT's (trifle.models.tt_import); what this stage adds is the check that it can be used with
this task's tokens (same dimensions and vocabulary, TT's bins, TT's discount and termination penalty) and
a metrics file like a training's, with the model's log-likelihood on the token file's training and
held-out episodes (trifle's split for `gpt.valid_fraction` and the seed; TT itself trained on every
episode, so the held-out figure is no generalisation measure here, only a check that tokens and model
agree: a model given other bins scores far lower).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trifle.data.tokens import load_tokens, require_quantile_rule
from trifle.data.windows import TransitionWindows, split_episodes
from trifle.errors import CheckpointError
from trifle.models.metrics import write_model_metrics
from trifle.models.training_common import eval_subset
from trifle.models.tt_import import import_tt_checkpoint, write_imported_checkpoint


def check_labels(info: dict[str, Any], labels: dict[str, Any], source: str) -> None:
    """TT's value labels must be the task's: the same discount and termination penalty."""
    data_cfg = info["data_config"]
    for tt_key, key in (("discount", "discount"), ("penalty", "termination_penalty")):
        if tt_key in data_cfg and data_cfg[tt_key] != labels[key]:
            raise CheckpointError(
                f"{source}: TT's data_config has {tt_key}={data_cfg[tt_key]!r} but the task has "
                f"task.labels.{key}={labels[key]!r}; the value tokens would not mean the same"
            )


def run(cfg: dict[str, Any]) -> Path:
    start = time.perf_counter()
    paths = cfg["paths"]
    data = load_tokens(paths["tokens"])
    require_quantile_rule(data, "tt", paths["tokens"], "a GPT imported from Trajectory Transformer")
    model, info = import_tt_checkpoint(paths["released_gpt"])
    source = str(paths["released_gpt"])
    got = {"obs_dim": model.cfg.obs_dim, "act_dim": model.cfg.act_dim, "vocab_size": model.cfg.vocab_size}
    want = {"obs_dim": data.obs_dim, "act_dim": data.act_dim, "vocab_size": data.vocab_size}
    for key in got:
        if got[key] != want[key]:
            raise CheckpointError(
                f"{source}: TT's model has {key}={got[key]}, the task's tokens ({paths['tokens']}) {want[key]}"
            )
    check_labels(info, cfg["task"]["labels"], source)
    out = Path(paths["gpt"])
    write_imported_checkpoint(model, info, out)

    gpt = cfg["gpt"]
    train_ids, valid_ids = split_episodes(
        data.episode_starts, len(data.tokens), gpt["valid_fraction"], cfg["seed"]
    )
    transitions = model.cfg.block_size // data.transition_dim
    scores = {}
    for name, ids in (("train_ll_per_token", train_ids), ("heldout_ll_per_token", valid_ids)):
        windows = TransitionWindows(
            data.tokens, data.episode_starts, data.episode_terminal, transitions, model.cfg.stop_token, ids
        )
        scores[name] = model.mean_log_likelihood(
            windows.iter_batches(eval_subset(len(windows), gpt["eval_windows"]), 256)
        )
    metrics = {
        **scores,
        "seconds": time.perf_counter() - start,
        "num_params": model.num_params(),
        "source": {k: info[k] for k in ("format", "directory", "epoch", "value_inputs", "notes")},
        "model_config": info["model_config"],
        "data_config": info["data_config"],
    }
    write_model_metrics(
        cfg,
        "gpt",
        metrics,
        train_ll=scores["train_ll_per_token"],
        heldout_ll=scores["heldout_ll_per_token"],
        released=True,
    )
    return out
