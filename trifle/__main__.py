"""Command line: ``python -m trifle <stage> key=value ...`` runs one stage with Hydra overrides.

Also ``python -m trifle sync`` (pull pinned artifacts from DVC and mark them up to date for
Snakemake) and ``python -m trifle show [overrides]`` (print the resolved config).

The flags people bring from Hydra work where they make sense: ``<stage> --help`` lists the config keys the
stage reads with their values and meanings (trifle.cli_help), ``--cfg`` prints the stage's config slice
(``--cfg all``: the whole config) and runs nothing, and ``-m``/``--multirun`` is refused with one line
pointing at the workflow config, where sweeps are declared (Snakemake runs them, not this command).

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
from dataclasses import dataclass, field

from trifle.config import STAGE_KEYS
from trifle.errors import ConfigError, TrifleError

# The stages are the modules of trifle.stages, each with its config keys in trifle.config.STAGE_KEYS.
STAGES = tuple(STAGE_KEYS)
COMMANDS = (*STAGES, "show", "sync")
DEBUG_ENV = "TRIFLE_DEBUG"
# Hydra's flags, taken out of the arguments before argparse sees the rest (`--cfg` takes an optional
# job/hydra/all, which argparse cannot tell from an override that follows it).
HELP_FLAGS = ("-h", "--help")
CFG_FLAGS = ("-c", "--cfg")
CFG_WHATS = ("job", "hydra", "all")
MULTIRUN_FLAGS = ("-m", "--multirun")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other mistake on this command line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (`python -m trifle --help` lists the commands)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trifle",
        usage="python -m trifle [-h] COMMAND [key=value ...] [-c/--cfg [all]]",
        description="Run one trifle stage with Hydra overrides, e.g. `python -m trifle train_gpt task=taxi-stochastic gpt.steps=100`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="a stage (below), or show/sync")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides key=value (for sync: extra `dvc pull` arguments)"
    )
    # Documented here; _Flags takes them out of the arguments first.
    parser.add_argument(
        "-h", "--help", action="store_true", help="this help; after a stage, the stage's keys"
    )
    parser.add_argument(
        "-c",
        "--cfg",
        nargs="?",
        metavar="all",
        help="print the config slice the stage reads as YAML and run nothing (`--cfg all`: the whole config)",
    )
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="not supported: sweeps are declared in the workflow config and run by Snakemake",
    )
    return parser


@dataclass
class _Flags:
    """Hydra's flags found anywhere among the arguments, and the arguments left for argparse."""

    rest: list[str] = field(default_factory=list)
    help: bool = False
    cfg: str | None = None  # job (the stage's slice), all, or hydra (refused)
    multirun: bool = False

    @classmethod
    def split(cls, argv: Sequence[str]) -> _Flags:
        flags, args, i = cls(), list(argv), 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                flags.rest += args[i:]
                break
            if arg in HELP_FLAGS:
                flags.help = True
            elif arg in MULTIRUN_FLAGS:
                flags.multirun = True
            elif arg in CFG_FLAGS:
                # Hydra's `--cfg job|hydra|all`; bare `--cfg` is the job's config.
                takes = i + 1 < len(args) and args[i + 1] in CFG_WHATS
                flags.cfg = args[i + 1] if takes else "job"
                i += takes
            elif arg.startswith("--cfg="):
                flags.cfg = arg.partition("=")[2]
            else:
                flags.rest.append(arg)
            i += 1
        return flags


def run_stage(stage: str, overrides: Sequence[str]) -> None:
    """Compose the config, check the outputs can be written, set threads, run the stage, save provenance
    beside its output."""
    import torch

    from trifle.config import compose, stage_inputs, stage_outputs
    from trifle.runinfo import check_inputs, git_revision, prepare_outputs, write_run_info

    cfg = compose(overrides)
    prepare_outputs(stage_outputs(cfg, stage))
    inputs = check_inputs(stage_inputs(cfg, stage))
    torch.set_num_threads(cfg["threads"])
    module = importlib.import_module(f"trifle.stages.{stage}")
    code = git_revision()  # the code the stage starts with: the tree may change during a long training
    started = time.perf_counter()
    output = module.run(cfg)
    seconds = time.perf_counter() - started
    info = write_run_info(output, stage=stage, cfg=cfg, seconds=seconds, inputs=inputs, git=code)
    print(f"trifle {stage}: wrote {output} ({info.name})")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: Python's default ends the process at once, skipping the clean-up of half-written
    outputs (trifle.io.atomic_path) that a KeyboardInterrupt runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _emit(text: str) -> None:
    """Print a help or config text; a reader that stops early (``| head``) is not an error, and stdout then
    points at /dev/null so the interpreter's final flush does not fail on the closed pipe either."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def show_config(command: str, overrides: Sequence[str], what: str = "all") -> None:
    """``show`` and ``--cfg``: the resolved config as YAML. After a stage, ``--cfg`` (Hydra's ``job``)
    prints only the slice the stage reads, the part the workflow compares to decide a rerun;
    ``--cfg all`` prints the whole config, paths included, as ``show`` does."""
    import yaml

    from trifle.config import compose, stage_slice

    if what == "hydra":
        raise ConfigError(
            "--cfg hydra: trifle composes with Hydra's compose API and has no hydra node to show; "
            "--cfg prints the config slice a stage reads, --cfg all the whole config"
        )
    if what not in CFG_WHATS:
        raise ConfigError(f"--cfg={what}: expected --cfg (the stage's slice) or --cfg all (the whole config)")
    if command == "sync":
        raise ConfigError("--cfg prints a stage's config, or with show the whole config; sync has none")
    cfg = compose(overrides)
    if command in STAGE_KEYS and what == "job":
        cfg = stage_slice(cfg, command)
    note = (
        f"# {command} reads no config key but its paths; --cfg all prints the whole config\n"
        if not cfg
        else ""
    )
    _emit(note + yaml.safe_dump(cfg, sort_keys=False))


def _print_help(parser: argparse.ArgumentParser) -> None:
    """The top-level help, with each command's one line (read from the stage modules only when asked)."""
    from trifle.cli_help import command_summaries

    summaries = command_summaries()
    width = max(map(len, summaries)) + 4
    commands = "\n".join(f"  {name.ljust(width)}{text}" for name, text in summaries.items())
    parser.epilog = (
        f"commands:\n{commands}\n\n"
        "`python -m trifle <stage> --help` lists the config keys a stage reads with their values and\n"
        "meanings; overrides given with it change the values shown (`python -m trifle train_gpt gpt=paper\n"
        "--help`). Sweeps (-m/--multirun) are declared in the workflow config and run by Snakemake."
    )
    parser.print_help()


def _unknown_command(command: str) -> ConfigError:
    hint = "; the command comes first, then the overrides" if "=" in command else ""
    return ConfigError(f"unknown command '{command}'; expected one of: {', '.join(COMMANDS)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    flags = _Flags.split(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(flags.rest)
    command = args.command
    if flags.multirun:
        from trifle.cli_help import multirun_message

        print(f"trifle{f' {command}' if command else ''}: error: {multirun_message()}", file=sys.stderr)
        return 2
    if flags.help and command in (None, "show", "sync"):
        _print_help(parser)
        return 0
    if command is None:
        parser.error("a command is required: a stage, show or sync")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if command not in COMMANDS:
            raise _unknown_command(command)
        if flags.help:
            from trifle.cli_help import stage_help

            _emit(stage_help(command, args.overrides))
        elif flags.cfg is not None:
            show_config(command, args.overrides, flags.cfg)
        elif command == "sync":
            from trifle.sync import sync

            sync(args.overrides)
        elif command == "show":
            show_config(command, args.overrides)
        else:
            run_stage(command, args.overrides)
    except TrifleError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"trifle {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"trifle {command}: error: interrupted ({err or 'Ctrl-C'})", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
