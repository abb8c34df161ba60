"""Command line: ``python -m trifle <stage> key=value ...`` runs one stage with Hydra overrides.

Also ``python -m trifle sync`` (pull pinned artifacts from DVC and mark them up to date for
Snakemake) and ``python -m trifle show [overrides]`` (print the resolved config).

A user mistake (a TrifleError) is one line on stderr and exit status 1; with ``TRIFLE_DEBUG=1`` in the
environment it is raised instead, with its full traceback. SIGTERM (a cancelled Snakemake or cluster
job) unwinds like Ctrl-C, so temporary files are removed and no provenance is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence

from trifle.config import STAGE_KEYS
from trifle.errors import TrifleError

# The stages are the modules of trifle.stages, each with its config keys in trifle.config.STAGE_KEYS.
STAGES = tuple(STAGE_KEYS)
DEBUG_ENV = "TRIFLE_DEBUG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trifle",
        description="Run one trifle stage with Hydra overrides, e.g. `python -m trifle train_gpt task=taxi-stochastic gpt.steps=100`.",
    )
    parser.add_argument("command", choices=[*STAGES, "show", "sync"], help="stage to run, or show/sync")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides key=value (for sync: extra `dvc pull` arguments)"
    )
    return parser


def run_stage(stage: str, overrides: Sequence[str]) -> None:
    """Compose the config, check the outputs can be written, set threads, run the stage, save provenance
    beside its output."""
    import torch

    from trifle.config import compose, stage_inputs, stage_outputs
    from trifle.runinfo import check_inputs, prepare_outputs, write_run_info

    cfg = compose(overrides)
    prepare_outputs(stage_outputs(cfg, stage))
    inputs = check_inputs(stage_inputs(cfg, stage))
    torch.set_num_threads(cfg["threads"])
    module = importlib.import_module(f"trifle.stages.{stage}")
    started = time.perf_counter()
    output = module.run(cfg)
    info = write_run_info(output, stage=stage, cfg=cfg, seconds=time.perf_counter() - started, inputs=inputs)
    print(f"trifle {stage}: wrote {output} ({info.name})")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: Python's default ends the process at once, skipping the clean-up of half-written
    outputs (trifle.io.atomic_path) that a KeyboardInterrupt runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "sync":
            from trifle.sync import sync

            sync(args.overrides)
        elif args.command == "show":
            import yaml

            from trifle.config import compose

            print(yaml.safe_dump(compose(args.overrides), sort_keys=False))
        else:
            run_stage(args.command, args.overrides)
    except TrifleError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"trifle {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"trifle {args.command}: error: interrupted ({err or 'Ctrl-C'})", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
