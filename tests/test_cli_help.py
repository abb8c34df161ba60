"""The commands people guess: ``<stage> --help``, Hydra's ``--cfg`` and ``-m``, and bad input around them.

A stage's help lists the keys it reads with the values of the composition the same command line would
run, and each key's meaning from the comments of the YAML files; the comments must come from the files
Hydra actually composes, so the file order the help computes is checked against Hydra's result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from trifle.__main__ import main
from trifle.cli_help import (
    CONF_DIR,
    composition_files,
    format_value,
    key_comments,
    parse_comments,
    stage_leaves,
)
from trifle.config import COMPOSE_CACHE_ENV, COMPOSE_MODE_ENV, STAGE_KEYS, available, compose, stage_slice

REPO = Path(__file__).resolve().parents[1]


def _default_choice(group: str) -> str:
    """The group's file in the default composition, as config.yaml's defaults list names it."""
    entries = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    return next(e[group] for e in entries if isinstance(e, dict) and group in e)


def _help(capsys, *args: str) -> list[str]:
    assert main([*args, "--help"]) == 0
    return capsys.readouterr().out.splitlines()


def _row(lines: list[str], key: str) -> str:
    """A key's row, its wrapped meaning joined to it."""
    for i, line in enumerate(lines):
        if line.startswith(f"  {key}="):
            rest = []
            for more in lines[i + 1 :]:
                if not more.startswith(" " * 20) or more.strip().startswith(("other choices",)):
                    break
                rest.append(more.strip())
            return " ".join(" ".join([line, *rest]).split())
    raise AssertionError(f"{key} is not listed:\n" + "\n".join(lines))


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (COMPOSE_CACHE_ENV, COMPOSE_MODE_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "trifle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# --- <stage> --help ---------------------------------------------------------------------------------


def test_stage_help_lists_the_default_values_and_the_yaml_comments(capsys):
    lines = _help(capsys, "train_gpt")
    cfg = compose([])
    gpt_file = CONF_DIR / "gpt" / f"{_default_choice('gpt')}.yaml"
    # n_layer carries no comment of its own: its row is the key and the default composition's value.
    assert _row(lines, "gpt.n_layer") == f"gpt.n_layer={cfg['gpt']['n_layer']}"
    # A comment at the end of the key's line, and a comment block above a key (first sentence).
    assert "epochs: null  # alternative to steps" in gpt_file.read_text()
    assert (
        _row(lines, "gpt.epochs") == "gpt.epochs=null alternative to steps: passes over the training windows"
    )
    assert "# Value tokens are outputs only" in gpt_file.read_text()
    assert _row(lines, "gpt.value_inputs").startswith(
        'gpt.value_inputs=masked Value tokens are outputs only ("masked"'
    )
    # The root config's comments too.
    assert _row(lines, "seed") == "seed=0 " + (
        "Seed of the model-training stages (datasets have their own seed under task.dataset.seed, so that "
        "every training seed sees the same data)."
    )
    # The file's header describes the group's file, not its first key.
    header = gpt_file.read_text().splitlines()[0].lstrip("# ")
    assert _row(lines, "gpt").startswith(f"gpt={gpt_file.stem} {header}")
    # Every key of the stage's slice is listed, expanded to its leaves; nothing else is.
    rows = [line for line in lines if line.startswith("  ") and not line.startswith("   ")]
    listed = [row.split("=")[0].strip() for row in rows if "=" in row]
    leaves = [key for key, _ in stage_leaves(cfg, "train_gpt")]
    assert {"gpt.n_layer", "gpt.betas", "task.name", "seed", "device"} <= set(leaves)
    assert [key for key in listed if not key.startswith("paths.") and key not in ("task", "gpt")] == leaves


def test_overrides_on_the_same_line_change_the_values_shown(capsys):
    paper = compose(["gpt=paper"])["gpt"]
    assert paper["n_layer"] != compose([])["gpt"]["n_layer"]
    lines = _help(capsys, "train_gpt", "gpt=paper")
    assert _row(lines, "gpt.n_layer") == f"gpt.n_layer={paper['n_layer']}"
    assert _row(lines, "gpt.steps") == f"gpt.steps={paper['steps']}"
    assert _row(lines, "gpt").startswith("gpt=paper Trajectory Transformer's training settings")
    lines = _help(capsys, "train_gpt", "task=taxi-stochastic", "gpt.n_layer=7", "seed=3")
    assert _row(lines, "gpt.n_layer") == "gpt.n_layer=7"
    assert _row(lines, "task.name") == "task.name=taxi-stochastic"
    assert _row(lines, "seed").startswith("seed=3 Seed of")


def test_every_stage_has_a_help(capsys):
    for stage in STAGE_KEYS:
        lines = _help(capsys, stage)
        assert lines[0].startswith(f"usage: python -m trifle {stage} ")
        for key, value in stage_leaves(compose([]), stage):
            assert _row(lines, key).startswith(f"{key}={format_value(value)}")


def test_the_registry_is_left_out_as_from_the_slice(capsys):
    lines = _help(capsys, "evaluate", "planner=trifle-s")
    assert not any(line.strip().startswith("planner.registry") for line in lines)
    assert _row(lines, "planner.name") == (
        "planner.name=trifle-s the method's name in results (results/eval/<task>/<name>/), the same as this file's."
    )


def test_meanings_come_from_the_files_the_composition_reads():
    comments = key_comments(["task=hopper-medium-v2"])
    # Two levels of a task file's defaults: hopper-medium-v2 -> _hopper -> _mujoco, and _d4rl beside.
    assert comments["task.action_constraint"][1].name == "_hopper.yaml"
    assert comments["task.labels.termination_penalty"][1].name == "_mujoco.yaml"
    assert comments["task.dataset.name"][1].name == "_d4rl.yaml"
    assert comments["seed"][1].name == "config.yaml"
    # A key several files comment takes the comment of the last one: trifle-s.yaml's over tt.yaml's.
    planner = key_comments(["planner=trifle-s"])
    assert "registry" in parse_comments((CONF_DIR / "planner" / "tt.yaml").read_text()).keys
    assert planner["planner.registry"] == (
        "Registry: inherited from its defaults, except these.",
        CONF_DIR / "planner" / "trifle-s.yaml",
    )
    assert planner["planner.use_cache"][1].name == "tt.yaml"
    taxi = key_comments(["task=taxi-stochastic"])
    assert taxi["task.dt_target_returns"][0].startswith("Decision Transformer's conditioning returns (paper")
    assert "task.action_constraint" not in key_comments(["~task"])


def _merge(into: dict, more: dict) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@pytest.mark.parametrize(
    "group_overrides",
    [[f"task={t}"] for t in available("task")]
    + [["task=taxi-stochastic", f"planner={p}"] for p in available("planner")]
    + [["gpt=paper", "pc=paper", "eval=paper"]],
    ids=" ".join,
)
def test_the_file_order_reproduces_hydras_composition(group_overrides):
    """Merging the files in the order the help reads them gives Hydra's config: the comments are read
    from the files that set the values, in the order that decides which value wins."""
    from omegaconf import OmegaConf

    merged: dict = {}
    for path, package in composition_files(group_overrides):
        data = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
        for part in reversed(package.split(".") if package else []):
            data = {part: data}
        _merge(merged, data)
    assert OmegaConf.to_container(OmegaConf.create(merged), resolve=True) == compose(group_overrides)


def test_the_comment_parser():
    text = textwrap.dedent(
        """\
        # The file's header.
        # name: the method's name.
        name: x
        defaults_like: 1
        # Above a section.
        section:
          # Above a nested key,
          # on two lines.
          inner: 'a # b'  # at the end of its line
          # A comment the blank line separates from the key.

          plain: 2
          flow: [1,
            {odd: 3}]
          after_flow: 4  # counted at the right depth
        items:
          # a list item's comment
          - nested: 5
        text: |
          not: a key
        last: 6 # end
        """
    )
    parsed = parse_comments(text)
    assert parsed.header == "The file's header."
    assert parsed.keys == {
        "name": "the method's name.",
        "section": "Above a section.",
        "section.inner": "Above a nested key, on two lines. at the end of its line",
        "section.after_flow": "counted at the right depth",
        "last": "end",
    }


# --- --cfg ------------------------------------------------------------------------------------------


def test_cfg_prints_the_stage_slice_and_runs_nothing(tmp_path):
    result = _run("train_gpt", "task=taxi-stochastic", "--cfg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == stage_slice(compose(["task=taxi-stochastic"]), "train_gpt")
    assert list(tmp_path.iterdir()) == []


def test_cfg_all_prints_what_show_prints(capsys):
    overrides = ["task=taxi-stochastic", "planner=trifle-m", "seed=2"]
    assert main(["show", *overrides]) == 0
    shown = capsys.readouterr().out
    assert yaml.safe_load(shown) == compose(overrides)
    for args in (["evaluate", *overrides, "--cfg", "all"], ["evaluate", "--cfg=all", *overrides]):
        assert main(args) == 0
        assert capsys.readouterr().out == shown
    # `all` after --cfg is its argument; an override after it is not.
    assert main(["evaluate", "--cfg", *overrides]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == stage_slice(compose(overrides), "evaluate")


def test_cfg_of_a_stage_that_reads_only_paths(capsys):
    assert main(["summary", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == {} and out.startswith("# summary reads no config key")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train_gpt", "--cfg", "hydra"], "--cfg hydra"),
        (["train_gpt", "--cfg=nope"], "--cfg=nope"),
        (["sync", "--cfg"], "sync"),
    ],
)
def test_cfg_mistakes_are_one_line(capsys, args, named):
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and named in captured.err


# --- -m / --multirun and bad input ----------------------------------------------------------------


def test_multirun_is_refused_with_one_line_pointing_at_the_workflow():
    result = _run("evaluate", "-m", "seed=0,1")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("trifle evaluate: error: -m/--multirun")
    assert "workflow/config/default.yaml" in line and "snakemake" in line
    assert ("workflow/config/paper.yaml" in line) == (REPO / "workflow" / "config" / "paper.yaml").is_file()


def test_multirun_long_form(capsys):
    assert main(["train_gpt", "--multirun"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["nope", "--help"], "unknown command 'nope'"),
        (["nope"], "unknown command 'nope'"),
        (["task=taxi-stochastic", "train_gpt"], "the command comes first"),
        (["train_gpt", "gpt=huge", "--help"], "unknown gpt 'huge'"),
        (["train_gpt", "gpt.foo=1", "--help"], "gpt.foo: unknown key"),
    ],
)
def test_bad_input_is_one_line(capsys, args, named):
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert named in line


def test_usage_mistakes_are_one_line():
    for args in ([], ["train_gpt", "--no-such-flag"]):
        result = _run(*args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr


def test_top_level_help_lists_the_commands_and_the_stage_help(capsys):
    for args in ([], ["show"], ["sync"]):
        out = "\n".join(_help(capsys, *args))
        for command in [*STAGE_KEYS, "show", "sync"]:
            assert f"\n  {command} " in out
        assert "<stage> --help" in out and "--cfg" in out and "--multirun" in out


def test_help_and_cfg_import_no_torch():
    """Help must answer at once: torch costs a second to import (tests/test_config_imports.py)."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from trifle.__main__ import main

        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["--help"]) == 0
            assert main(["train_gpt", "--help"]) == 0
            assert main(["evaluate", "task=taxi-stochastic", "planner=trifle-m", "-h"]) == 0
            assert main(["train_pc", "--cfg"]) == 0
            assert main(["evaluate", "--cfg", "all"]) == 0
        assert "gpt.n_layer=" in out.getvalue()
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", loaded[:5])
        sys.exit(1 if loaded else 0)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in (COMPOSE_CACHE_ENV, COMPOSE_MODE_ENV)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_into_a_closed_pipe_is_quiet():
    """`python -m trifle train_gpt --help | head` must not end in a BrokenPipeError traceback."""
    command = f"{sys.executable} -m trifle evaluate --help | head -1"
    result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("usage: python -m trifle evaluate") and result.stderr == ""
