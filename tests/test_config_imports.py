"""Config composition and validation import no torch.

The workflow composes and validates a config for every job when it builds its DAG (workflow/rules/
common.smk), and so does ``python -m trifle show``; torch costs about a second to import, which a no-op
``snakemake`` rerun must not pay just to check settings. The checks therefore live in torch-free modules
(the trainers' ``*_settings``, trifle.planning.dt_targets, the planners' settings named by the method
registry's ``validate``). A fresh interpreter is needed: this one has imported torch already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from trifle.config import COMPOSE_CACHE_ENV, COMPOSE_MODE_ENV

REPO = Path(__file__).resolve().parents[1]

# What a DAG build does for each job (workflow/rules/common.smk): compose and validate its config, take
# its stage's slice and fingerprint the stage's code; here for the training stages and the evaluations
# of every registered method, then `show`'s composition.
SCRIPT = textwrap.dedent(
    """
    import sys

    from trifle.config import STAGE_KEYS, compose, stage_slice
    from trifle.fingerprint import code_fingerprint
    from trifle.planning.methods import available_methods, method

    for stage in ("train_gpt", "train_dt", "train_critic", "train_aux", "train_pc"):
        stage_slice(compose(["task=taxi-stochastic"]), stage)
        code_fingerprint(f"trifle.stages.{stage}")
    for name in available_methods():
        cfg = compose(["task=taxi-stochastic", f"planner={name}"])
        assert cfg["planner"]["name"] == name
        stage_slice(cfg, "evaluate")
        code_fingerprint("trifle.stages.evaluate", method(name).module)
    for stage in STAGE_KEYS:
        stage_slice(compose(["task=frozenlake-eps0.5", "planner=dt", "planner.target_return=[1,0.5]"]), stage)
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("torch modules:", loaded[:5])
    sys.exit(1 if loaded else 0)
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (COMPOSE_CACHE_ENV, COMPOSE_MODE_ENV)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_composing_and_validating_every_stage_and_method_imports_no_torch():
    result = _run(SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_show_command_imports_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "from trifle.__main__ import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['show', 'task=taxi-stochastic', 'planner=trifle-m']) == 0\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_value_still_fails_without_torch():
    # The checks moved, not away: a bad value of each kind is still refused at composition.
    code = textwrap.dedent(
        """
        import sys
        from trifle.config import compose
        from trifle.errors import ConfigError

        for overrides, key in (
            (["gpt.value_inputs=hidden"], "gpt.value_inputs"),
            (["dt.dropout=2"], "dt.dropout"),
            (["critic.expectile=1.0"], "critic.expectile"),
            (["aux.kind=other"], "aux.kind"),
            (["planner=trifle-m", "planner.multistep_value=other"], "planner.multistep_value"),
            (["task=taxi-stochastic", "planner=trifle-dt", "planner.top_ratio=2"], "planner.top_ratio"),
            (["planner=dt", "planner.target_return=abc"], "planner.target_return"),
        ):
            try:
                compose(overrides)
            except ConfigError as err:
                assert key in str(err), (overrides, str(err))
            else:
                raise AssertionError(f"{overrides} composed")
        sys.exit(1 if "torch" in sys.modules else 0)
        """
    )
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr
