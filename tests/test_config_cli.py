"""Hydra composition, per-stage slices, code fingerprints and the CLI's handling of bad input."""

import subprocess
import sys

import pytest

from trifle.__main__ import main
from trifle.config import STAGE_KEYS, STAGE_OUTPUTS, available, compose, stage_overrides, stage_slice
from trifle.errors import ConfigError
from trifle.fingerprint import code_fingerprint


def test_every_task_composes_and_validates():
    for task in available("task"):
        cfg = compose([f"task={task}"])
        assert cfg["task"]["name"] == task
        assert cfg["paths"]["gpt"] == f"results/checkpoints/{task}/gpt/seed0.pt"


def test_paper_groups_compose():
    cfg = compose(["gpt=paper", "pc=paper", "eval=paper"])
    assert (cfg["gpt"]["n_layer"], cfg["gpt"]["n_head"], cfg["gpt"]["n_embd"]) == (4, 4, 128)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task=nope", "unknown task 'nope'.*taxi-stochastic"),
        ("gpt=huge", "unknown gpt 'huge'.*small"),
        ("task.dataset.epsilon=-0.1", "task.dataset.epsilon"),
        ("task.pc_window=0", "task.pc_window"),
        ("task.discretizer.n_bins=1", "task.discretizer.n_bins"),
        ("task.discretizer.values=kmeans", "task.discretizer.values"),
        ("gpt.n_embd=65", "gpt.n_embd"),
        ("pc.backend=tpu", "pc.backend"),
        ("pc.pseudocount=-1", "pc.pseudocount"),
        ("eval.episodes=abc", "eval.episodes"),
        ("task=hopper-medium-v2 task.dataset.sha256=abc", "task.dataset.sha256"),
        ("task=hopper-medium-v2 task.dataset.size=-5", "task.dataset.size"),
        ("eval.episodes=-3", "eval.episodes"),
        ("eval.batch_episodes=0", "eval.batch_episodes"),
        ("eval.max_episode_steps=abc", "eval.max_episode_steps"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(override.split())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gpt.foo=1", r"gpt\.foo: unknown key; known keys of gpt: action_weight, .*steps"),
        (
            "task.planning.nope=2",
            r"task\.planning\.nope: unknown key; known keys of task\.planning: .*beam_width",
        ),
        ("foo=1", r"foo: unknown key; known keys of the top level: .*seed"),
    ],
)
def test_an_unknown_key_is_named_with_the_known_ones(override, message):
    """Hydra alone would suggest `+key=value`, which then fails as unknown: one message instead."""
    with pytest.raises(ConfigError, match=message):
        compose(["task=taxi-stochastic", override])


def test_a_hyperparameter_changes_only_the_slices_that_read_it():
    base = compose(["task=taxi-stochastic"])
    changed = compose(["task=taxi-stochastic", "pc.num_latents=8"])
    differing = {s for s in STAGE_KEYS if stage_slice(base, s) != stage_slice(changed, s)}
    assert differing == {"train_pc"}
    changed = compose(["task=taxi-stochastic", "task.labels.discount=0.9"])
    # The planners discount with the same factor as the labels, and the circuit's diagnostics score
    # E[r + gamma V | s, a] with it; the IQL critic's Q targets too, and the optimality score's return
    # models their G = r + gamma V. The import stages check a released GPT's labels against it and
    # score a released circuit's diagnostics with it.
    assert {s for s in STAGE_KEYS if stage_slice(base, s) != stage_slice(changed, s)} == {
        "labels",
        "train_pc",
        "import_gpt",
        "import_pc",
        "train_critic",
        "train_aux",
        "evaluate",
    }


def test_seed_changes_training_and_evaluation_but_not_data():
    a, b = compose(["seed=0"]), compose(["seed=1"])
    changed = {s for s in STAGE_KEYS if stage_slice(a, s) != stage_slice(b, s)}
    # The optimality score's return models are trained per seed, and its files are per run; an imported
    # model's metrics use the seed's held-out split.
    assert changed == {
        "train_gpt",
        "train_pc",
        "import_gpt",
        "import_pc",
        "train_dt",
        "train_critic",
        "train_aux",
        "evaluate",
        "optimality",
    }


def test_planner_choice_changes_only_evaluation():
    a, b = compose(["planner=tt"]), compose(["planner=trifle-s"])
    assert {s for s in STAGE_KEYS if stage_slice(a, s) != stage_slice(b, s)} == {"evaluate"}


def test_fingerprint_follows_imports_and_ignores_docstrings(tmp_path):
    import trifle.fingerprint as fp

    pkg = tmp_path / "trifle"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "stages" / "s.py").write_text('"""Doc."""\nfrom trifle.helper import X\n')

    def fingerprint():
        fp.code_fingerprint.cache_clear()
        return fp.code_fingerprint("trifle.stages.s", root=pkg)

    first = fingerprint()
    (pkg / "stages" / "s.py").write_text('"""Other doc."""\n# comment\nfrom trifle.helper import X\n')
    assert fingerprint() == first
    (pkg / "helper.py").write_text("X = 2\n")
    assert fingerprint() != first


def test_real_stage_fingerprints_differ():
    assert code_fingerprint("trifle.stages.train_gpt") != code_fingerprint("trifle.stages.train_pc")


def test_cli_prints_one_line_error_for_unknown_task(capsys):
    assert main(["data", "task=nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'nope'" in err[0]


def test_cli_missing_dataset_names_the_file_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "labeled.npz"
    rc = main(["labels", f"paths.raw={tmp_path}/missing.hdf5", f"paths.labeled={out}"])
    assert rc == 1
    assert "missing.hdf5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_corrupt_dataset_is_rejected(tmp_path, capsys):
    raw = tmp_path / "raw.hdf5"
    raw.write_bytes(b"\x00garbage")
    rc = main(["labels", f"paths.raw={raw}", f"paths.labeled={tmp_path}/labeled.npz"])
    assert rc == 1 and "raw.hdf5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.hdf5"]


def test_stage_runs_as_module_and_saves_provenance(tmp_path):
    raw = tmp_path / "raw.hdf5"
    cmd = [
        sys.executable,
        "-m",
        "trifle",
        "data",
        "task.dataset.num_episodes=20",
        f"paths.raw={raw}",
        "progress=false",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    from trifle.io import read_json

    info = read_json(f"{raw}.run.json")
    assert info["stage"] == "data" and info["seed"] == 0
    assert info["config"]["task"]["dataset"]["num_episodes"] == 20
    assert "commit" in info["git"]


def test_every_stage_names_its_outputs_among_the_paths():
    """The command line checks these before a stage runs; a key missing from `paths` would go unchecked."""
    paths = compose([])["paths"]
    assert set(STAGE_OUTPUTS) == set(STAGE_KEYS)
    assert {key for keys in STAGE_OUTPUTS.values() for key in keys} <= set(paths)


def test_jobs_get_only_the_overrides_their_stage_reads():
    overrides = [
        "task=taxi-stochastic",
        "seed=1",
        "gpt=small",
        "pc.num_latents=4",
        "task.dataset.num_episodes=9",
    ]
    assert stage_overrides(overrides, "data") == ["task=taxi-stochastic", "task.dataset.num_episodes=9"]
    assert stage_overrides(overrides, "train_gpt") == ["task=taxi-stochastic", "seed=1", "gpt=small"]
    assert stage_overrides(overrides, "train_pc") == ["task=taxi-stochastic", "seed=1", "pc.num_latents=4"]
