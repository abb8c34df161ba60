"""The smoke workflow on a real one-node SLURM cluster, through `workflow/profiles/slurm`.

The module's fixture starts munged, MariaDB, slurmdbd, slurmctld and slurmd on this machine, with every
config, state and log file under a temporary directory (Debian's packages, installed with apt-get when
missing). Snakemake's SLURM executor plugin tracks its jobs with `sacct`, which reads the accounting
database that slurmdbd keeps, hence the database. The test then runs the smoke configuration through the
SLURM profile, checks with `sacct` that every job went through SLURM and completed, and compares the
results with those of the same workflow run locally, in another copy of the project.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from workflow_support import GPU_RULES, REPO, copy_project, env_for, job_counts, snakemake

# The program each Debian package provides to the cluster.
PROGRAMS = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "sacct": "slurm-client",
    "srun": "slurm-client",
    "slurmdbd": "slurmdbd",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
CLUSTER = "trifle-test"
# Long enough for a starting daemon on a busy machine.
START_TIMEOUT = 120


class ClusterError(RuntimeError):
    """A daemon did not start; the message says which and ends with the tail of its log."""


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(program, path=path)


def missing_packages() -> list[str]:
    """Debian packages the cluster needs whose programs are not installed."""
    return sorted({package for program, package in PROGRAMS.items() if _which(program) is None})


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def cluster_unavailable_reason() -> str | None:
    """Why no cluster can be started here (None when it can), installing missing packages first.

    The daemons run as root (SlurmUser=root), and only root can install the packages.
    """
    if os.geteuid() != 0:
        return (
            "a local SLURM cluster needs root (its daemons run as SlurmUser=root; packages come from apt-get)"
        )
    missing = missing_packages()
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"SLURM packages are missing ({' '.join(missing)}) and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`{' '.join(cmd)}` failed: {error}"
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({result.returncode}):\n{_tail(result.stdout + result.stderr)}"
    still = missing_packages()
    if still:
        return f"SLURM packages still missing after apt-get install: {' '.join(still)}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself measures them (`slurmd -C`)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(fields["RealMemory"])


class Cluster:
    """munged, MariaDB, slurmdbd, slurmctld and slurmd, each in the foreground as a child of this process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.logs = root / "log"
        self.munge_socket = root / "munge" / "munge.sock"
        self.slurm_conf = root / "etc" / "slurm.conf"
        self.dbd_conf = root / "etc" / "slurmdbd.conf"
        self.ports = {name: _free_port() for name in ("mysql", "dbd", "ctld", "slurmd")}
        self.procs: dict[str, subprocess.Popen] = {}
        for d in ("log", "munge", "etc", "db", "state", "spool", "run", "bin"):
            (root / d).mkdir(mode=0o700)
        self.bin = root / "bin"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    # ------------------------------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.out", "w") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def log_tail(self, name: str) -> str:
        text = ""
        for path in sorted(self.logs.glob(f"{name}*")):
            text += f"--- {path.name}\n{_tail(path.read_text(errors='replace'))}\n"
        return text

    def _wait(self, name: str, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if ready():
                return
            if self.procs[name].poll() is not None:
                raise ClusterError(f"{name} exited ({self.procs[name].returncode}):\n{self.log_tail(name)}")
            time.sleep(0.5)
        raise ClusterError(f"{name}: no {what} after {START_TIMEOUT} s:\n{self.log_tail(name)}")

    def slurm(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )
        return result

    def start(self) -> None:
        self._write_srun()
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.ports["dbd"]), "listening port")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.slurm_conf)])
        self._wait("slurmctld", lambda: self.slurm("scontrol", "ping", check=False).returncode == 0, "ping")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.slurm_conf)])
        self._wait("slurmd", self._node_idle, "idle node")
        self._wait("slurmctld", self._cluster_registered, "cluster registered with slurmdbd")

    def _write_srun(self) -> None:
        """An `srun` that finds this cluster. Inside a job, the jobstep plugin runs the rule's command through
        srun with every SLURM_* variable but the job's identity removed, SLURM_CONF included: a real cluster's
        srun reads /etc/slurm/slurm.conf (or the configless cache), this one's config is under a temporary
        directory."""
        srun = self.bin / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.slurm_conf} exec {_which("srun")} "$@"\n')
        srun.chmod(0o700)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.logs / 'munged.log'}",
            ],
        )
        self._wait("munged", self.munge_socket.exists, "socket")

    def _start_mariadb(self) -> None:
        data = self.root / "db" / "data"
        install = subprocess.run(
            [
                _which("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed:\n{_tail(install.stdout + install.stderr)}")
        self._spawn(
            "mariadb",
            [
                _which("mariadbd"),
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                f"--socket={self.root / 'db' / 'mysqld.sock'}",
                f"--pid-file={self.root / 'run' / 'mysqld.pid'}",
                "--bind-address=127.0.0.1",
                f"--port={self.ports['mysql']}",
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-lock-wait-timeout=900",
            ],
        )
        self._wait("mariadb", lambda: _port_open(self.ports["mysql"]), "listening port")

    def _write_configs(self) -> None:
        cpus, memory = _node_resources()
        run, auth = self.root / "run", ["AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}"]
        dbd = [
            *auth,
            f"DbdHost={self.host}",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.ports['dbd']}",
            "SlurmUser=root",
            f"LogFile={self.logs / 'slurmdbd.log'}",
            f"PidFile={run / 'slurmdbd.pid'}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mysql']}",
            "StorageUser=root",
            "StorageLoc=slurm_acct_db",
        ]
        self.dbd_conf.write_text("\n".join(dbd) + "\n")
        self.dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
        slurm = [
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            *auth,
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={self.ports['ctld']}",
            f"SlurmdPort={self.ports['slurmd']}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            # No cgroups (containers lack systemd): processes tracked through /proc, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports['dbd']}",
            # slurmctld's munge socket for slurmdbd (AuthInfo does not reach that connection).
            f"AccountingStoragePass={self.munge_socket}",
            # The plugin names each job's rule in its comment; keep comments in the database for sacct.
            "AccountingStoreFlags=job_comment",
            "JobCompType=jobcomp/none",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            # The profile sends training and evaluation to `gpu`, the rest to `cpu`; the smoke config asks
            # for no GPUs, so `gpu` can hold the same node without GRES.
            f"PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP",
        ]
        self.slurm_conf.write_text("\n".join(slurm) + "\n")

    def _node_idle(self) -> bool:
        result = self.slurm("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.returncode == 0 and "idle" in result.stdout.split()

    def _cluster_registered(self) -> bool:
        result = self.slurm("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster", check=False)
        return CLUSTER in result.stdout.split()

    def stop(self) -> None:
        """Cancel what is left in the queue, then stop the daemons, newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.slurm("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.slurm("squeue", "-h", check=False).stdout.strip():
                time.sleep(1)
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cluster_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            c.start()
        except (ClusterError, OSError, subprocess.CalledProcessError) as error:
            pytest.skip(f"the local SLURM cluster did not start: {error}")
        with pytest.MonkeyPatch.context() as mp:
            # sbatch, sacct and the jobs (sbatch --export=ALL) find the cluster through SLURM_CONF.
            mp.setenv("SLURM_CONF", str(c.slurm_conf))
            mp.setenv("PATH", f"{c.bin}{os.pathsep}{os.environ.get('PATH', '')}")
            yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------- when it cannot run
def test_missing_apt_get_gives_one_skip_reason(monkeypatch):
    """Root, nothing installed and no apt-get: one reason naming the missing packages, no install tried."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("nothing to run"))
    reason = cluster_unavailable_reason()
    assert reason == (
        "SLURM packages are missing (mariadb-server munge slurm-client slurmctld slurmd slurmdbd) "
        "and there is no apt-get to install them"
    )


def test_failed_install_gives_apt_gets_output_as_the_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        shutil, "which", lambda name, **kwargs: "/usr/bin/apt-get" if name == "apt-get" else None
    )
    calls = []

    def apt_get(cmd, **kwargs):
        calls.append(cmd)
        failed = cmd[1] == "install"
        return subprocess.CompletedProcess(
            cmd, 100 if failed else 0, "", "E: Unable to locate package slurmdbd"
        )

    monkeypatch.setattr(subprocess, "run", apt_get)
    reason = cluster_unavailable_reason()
    assert [c[:2] for c in calls] == [["apt-get", "update"], ["apt-get", "install"]]
    assert "--no-install-recommends" in calls[1] and "slurmdbd" in calls[1]
    assert reason.startswith("`apt-get install") and "failed (100)" in reason
    assert reason.endswith("E: Unable to locate package slurmdbd")


def test_without_root_there_is_no_cluster(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cluster_unavailable_reason().startswith("a local SLURM cluster needs root")


def test_results_compare_without_timings_only(tmp_path):
    """The comparison with the local run ignores wall-clock timings and nothing else."""
    tables = {
        "t.csv": "task,return_mean,step_seconds\ntaxi,{r},{s}\n",
        "t.md": "text\n\n| task | return_mean | step_seconds |\n|---|---|---|\n| taxi | {r} | {s} |\n",
        "t.html": "<tr><th>task</th><th>return_mean</th><th>step_seconds</th></tr>\n"
        '<tr><td>taxi</td><td class="num">{r}</td><td class="num">{s}</td></tr>\n',
        "t.json": '{{"return_mean": {r}, "details": {{"train_seconds": {s}}}}}',
    }
    for name, text in tables.items():
        forms = []
        for r, s in (("1.5", "0.1"), ("1.5", "0.2"), ("1.6", "0.1")):
            (tmp_path / name).write_text(text.format(r=r, s=s))
            forms.append(_without_timings(tmp_path / name))
        assert forms[0] == forms[1] != forms[2], name


# --------------------------------------------------------------------------------------------- the runs
# Training and evaluation go to partition `gpu` (workflow/profiles/slurm/config.yaml; GPU_RULES), the
# rest to `cpu`.
# Overrides of the profile for one small machine: outputs are on the local disk (no file-system latency)
# and jobs take seconds, so status checks start after 2 s rather than 40.
SLURM_ARGS = (
    "--workflow-profile",
    "workflow/profiles/slurm",
    "--latency-wait",
    "5",
    "--slurm-init-seconds-before-status-checks",
    "2",
)


def _rule_jobs(log: str) -> tuple[Counter, Counter]:
    """Jobs Snakemake ran, by rule: (submitted, local), from the 'rule X:' / 'localrule X:' job headers."""
    submitted, local = Counter(), Counter()
    for line in log.splitlines():
        match = re.match(r"(local)?rule (\w+):$", line.strip())
        if match:
            (local if match.group(1) else submitted)[match.group(2)] += 1
    return submitted, local


@pytest.mark.slow
def test_smoke_workflow_on_slurm_submits_every_job_and_matches_a_local_run(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    smoke = (REPO / "workflow" / "config" / "smoke.yaml").read_text()
    local = copy_project(root / "local", config=smoke)
    on_slurm = copy_project(root / "slurm", config=smoke)
    # The local run, without the SLURM profile, goes on beside the cluster's.
    with open(root / "local.log", "w") as log:
        local_run = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "2"],
            cwd=local,
            env=env_for(local),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 60))
        result = snakemake(on_slurm, *SLURM_ARGS)
    finally:
        local_run.wait()
    assert local_run.returncode == 0, (root / "local.log").read_text()[-5000:]
    log = result.stdout + result.stderr

    # 1. Every job but the local rules went through SLURM, to the profile's partition, and completed.
    expected, local_jobs = _rule_jobs(log)
    assert sum(expected.values()) + sum(local_jobs.values()) == sum(job_counts(log).values()), log[-3000:]
    assert local_jobs["all"] == 1 and expected["dataset"] == 3, log[-3000:]
    sacct = cluster.slurm(
        "sacct",
        "-X",
        "-n",
        "-P",
        "--clusters",
        "all",
        "--starttime",
        since,
        "--format",
        "JobIDRaw,Partition,State,Comment",
    ).stdout
    jobs = [line.split("|") for line in sacct.splitlines() if line.strip()]
    rules = Counter(comment.removeprefix("rule_").split("_wildcards_")[0] for *_, comment in jobs)
    assert rules == expected, (sacct, log[-3000:])
    assert {state for _, _, state, _ in jobs} == {"COMPLETED"}, sacct
    for _, partition, _, comment in jobs:
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        assert partition == ("gpu" if rule in GPU_RULES else "cpu"), (rule, partition)

    # 2. The same results as the local run: every file but the provenance records (`*.run.json`: the copy's
    # paths, times) equal, wall-clock timings (`*seconds` keys and columns) aside.
    files = _results(local)
    assert files == _results(on_slurm) and len(files) > 100
    differ = [
        str(f)
        for f in sorted(files)
        if not f.name.endswith(".run.json")
        and (local / f).read_bytes() != (on_slurm / f).read_bytes()
        and _without_timings(local / f) != _without_timings(on_slurm / f)
    ]
    assert not differ, differ


def _results(project: Path) -> set[Path]:
    return {
        p.relative_to(project) for d in ("data", "results") for p in (project / d).rglob("*") if p.is_file()
    }


def _without_timings(path: Path):
    """A result's content without its wall-clock timings, in a form that compares with ==."""
    if path.suffix == ".json":
        return _timeless(json.loads(path.read_text()))
    if path.suffix == ".pt":
        import torch

        return _timeless(torch.load(path, map_location="cpu", weights_only=False))
    if path.suffix in (".csv", ".md", ".html"):
        return _table_without_timings(path)
    return path.read_bytes()


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if not str(k).endswith("seconds")}
    if isinstance(value, list | tuple):
        return [_timeless(v) for v in value]
    if hasattr(value, "detach"):  # a tensor
        return str(value.dtype), value.detach().cpu().tolist()
    if hasattr(value, "tobytes"):  # a NumPy array
        return str(value.dtype), value.shape, value.tobytes()
    return value


def _table_without_timings(path: Path) -> list:
    """The lines of a table (CSV, Markdown or HTML), with the cells of `*seconds` columns removed."""
    lines, drop = [], set()
    rows = list(csv.reader(path.open())) if path.suffix == ".csv" else path.read_text().splitlines()
    for row in rows:
        if path.suffix == ".csv":
            cells, header = row, not lines
        elif path.suffix == ".md":
            cells = row.split("|")[1:-1] if row.startswith("|") else None
            header = cells is not None and (not lines or not isinstance(lines[-1], list))
        else:
            cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) or None
            header = cells is not None and "<th" in row
        if cells is None:
            lines.append(row)
            continue
        if header:
            drop = {i for i, cell in enumerate(cells) if cell.strip().endswith("seconds")}
        lines.append([cell for i, cell in enumerate(cells) if i not in drop])
    return lines
