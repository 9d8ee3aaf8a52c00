"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from
Debian's `slurm-wlm` and `munge` packages, configured in a temp dir.

`.ci/run` installs the packages when they are missing; without them the
tests skip with the reason, except under CI (the CI variable set), where
they fail. The one-machine recipe in docs/clusters.md is the same set-up.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator, Optional

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "scancel", "squeue", "scontrol")
SBIN = ("/usr/sbin", "/sbin")
PARTITION = "bdtest"  # a second, non-default partition: --job-resources partition=... must reach the jobs

CONFIG = """\
ClusterName=beamdownsample
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
KillWait=2
MinJobAge=300
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName={partition} Nodes={host} MaxTime=INFINITE State=UP
"""


def which(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_reason() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    absent = [name for name in DAEMONS if which(name) is None]
    if absent:
        return (f"SLURM test cluster needs Debian's slurm-wlm and munge ({', '.join(absent)} not found; "
                "apt-get install slurm-wlm munge, as .ci/run does)")
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd and SlurmUser=root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "SLURM test cluster needs the munge user (Debian's munge package)"
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as handle:
        total_kb = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    return max(min(total_kb // 1024 - 1024, 16 * 1024), 2048)


def sinfo_state(env) -> str:
    result = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=env,
                            timeout=30, check=False)
    return result.stdout.strip()


@contextlib.contextmanager
def one_node_cluster(timeout: float = 60.0) -> Iterator[dict]:
    """Starts munged, slurmctld and slurmd; yields the environment (SLURM_CONF) and stops exactly them."""
    root = tempfile.mkdtemp(prefix="beam-downsample-slurm-")  # not under pytest's 0700 tmp: munge must enter it
    os.chmod(root, 0o755)
    munge_dir = os.path.join(root, "munge")
    for sub in ("state", "spool", "log", "munge"):
        os.makedirs(os.path.join(root, sub))
    munge_user = pwd.getpwnam("munge")
    os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
    os.chmod(munge_dir, 0o755)
    host = socket.gethostname()
    config = os.path.join(root, "slurm.conf")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(CONFIG.format(host=host, root=root, ctld_port=_free_port(), slurmd_port=_free_port(),
                                   cpus=os.cpu_count() or 1, memory_mb=_memory_mb(), partition=PARTITION))
    env = dict(os.environ, SLURM_CONF=config)
    started: list[subprocess.Popen] = []
    logs = []

    def start(name, command, **kwargs):
        log = open(os.path.join(root, "log", f"{name}.out"), "w", encoding="utf-8")  # pylint: disable=consider-using-with
        logs.append(log)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
        started.append(proc)
        return proc

    try:
        subprocess.run([which("mungekey"), "--create", "--keyfile", os.path.join(munge_dir, "munge.key")],
                       check=True, capture_output=True, user=munge_user.pw_uid, group=munge_user.pw_gid)
        start("munged", [which("munged"), "--foreground", "--force", f"--socket={munge_dir}/munge.socket",
                         f"--key-file={munge_dir}/munge.key", f"--log-file={munge_dir}/munged.log",
                         f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed"],
              user=munge_user.pw_uid, group=munge_user.pw_gid)
        _wait(lambda: os.path.exists(f"{munge_dir}/munge.socket"), started, timeout, "munged socket")
        start("slurmctld", [which("slurmctld"), "-D", "-f", config])
        start("slurmd", [which("slurmd"), "-D", "-f", config])
        _wait(lambda: set(sinfo_state(env).split()) == {"idle"}, started, timeout, "an idle node in sinfo", root)
        yield env
    finally:
        if any(proc.poll() is None for proc in started[1:]):
            subprocess.run([which("scancel"), "--user", "root"], env=env, capture_output=True, timeout=30, check=False)
            _wait(lambda: not _jobs(env), [], 30, "", root, quiet=True)
        for proc in reversed(started):  # slurmd, slurmctld, munged: exactly the daemons started here
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        for log in logs:
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def _jobs(env) -> list[str]:
    result = subprocess.run([which("squeue"), "-h", "-o", "%i"], capture_output=True, text=True, env=env,
                            timeout=30, check=False)
    return result.stdout.split()


def _wait(predicate, started, timeout, what, root=None, quiet=False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [proc for proc in started if proc.poll() is not None]
        if dead:
            break
        time.sleep(0.2)
    if quiet:
        return
    tails = ""
    if root:
        for name in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = os.path.join(root, "log", name)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    tails += f"\n--- {name}\n" + "".join(handle.readlines()[-10:])
    raise RuntimeError(f"SLURM test cluster: no {what} after {timeout:.0f} s{tails}")


def job_of_pid(pid: int) -> Optional[str]:
    """The SLURM job id a process of this machine runs in (from its environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            for item in handle.read().split(b"\0"):
                if item.startswith(b"SLURM_JOB_ID="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None
