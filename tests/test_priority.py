"""The sidecar's lower CPU priority (trainer/priority.py): nice value and a cgroup of small CPU weight."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.priority import SidecarPriority, join_cgroup, prefer_passive_openmp


def test_config_names_the_field_on_bad_values():
    for bad, field in ((dict(nice=20), "nice"), (dict(cpu_weight=-1), "cpu_weight"), (dict(cgroup="a/b"), "cgroup"),
                       (dict(cpu_max=-1), "cpu_max"), (dict(cpu_max=0.5, cpu_weight=0), "cpu_max"), (dict(cpus=-1), "cpus")):
        with pytest.raises(ValueError, match=f"SidecarPriority.{field}"):
            SidecarPriority(**bad)


def test_join_cgroup_v2_and_v1_layouts(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert "v2, weight 10" in join_cgroup(SidecarPriority(), 4242, v2)
    assert (v2 / "livetower-trainer" / "cpu.weight").read_text() == "10"
    assert (v2 / "livetower-trainer" / "cgroup.procs").read_text() == "4242"
    assert (v2 / "livetower-trainer" / "cpu.max").read_text() == "max 100000"
    assert "at most 0.5 CPU" in join_cgroup(SidecarPriority(cpu_max=0.5), 4242, v2)
    assert (v2 / "livetower-trainer" / "cpu.max").read_text() == "50000 100000"
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.shares").write_text("1024")
    assert "v1, weight 25" in join_cgroup(SidecarPriority(cpu_weight=25), 4243, v1)
    assert (v1 / "cpu" / "livetower-trainer" / "cpu.shares").read_text() == "256"
    assert (v1 / "cpu" / "livetower-trainer" / "cpu.cfs_quota_us").read_text() == "-1"
    join_cgroup(SidecarPriority(cpu_max=1.5), 4243, v1)  # a cap, then none: the cgroup outlives its last setting
    assert (v1 / "cpu" / "livetower-trainer" / "cpu.cfs_quota_us").read_text() == "150000"
    join_cgroup(SidecarPriority(), 4243, v1)
    assert (v1 / "cpu" / "livetower-trainer" / "cpu.cfs_quota_us").read_text() == "-1"
    assert join_cgroup(SidecarPriority(), 1, tmp_path / "none") == "no cgroup CPU controller found"


def test_the_idle_policy_makes_the_cgroup_idle_and_a_later_start_clears_it(tmp_path):
    """The scheduler compares the server's threads with the trainer's cgroup: only an idle cgroup is preempted at
    once by a serving thread's wake-up. An idle cgroup refuses a weight, so a later start clears it first."""
    group = tmp_path / "cpu" / "livetower-trainer"
    group.mkdir(parents=True)
    (tmp_path / "cpu" / "cpu.shares").write_text("1024")
    (group / "cpu.idle").write_text("0")
    assert "v1, idle" in join_cgroup(SidecarPriority(idle_policy=True), 7, tmp_path)
    assert (group / "cpu.idle").read_text() == "1" and not (group / "cpu.shares").exists()
    assert "v1, weight 10" in join_cgroup(SidecarPriority(idle_policy=False), 7, tmp_path)
    assert (group / "cpu.idle").read_text() == "0" and (group / "cpu.shares").read_text() == "102"


def _lowered_process(priority: str, report: str) -> list[str]:
    """Run `lower_priority(SidecarPriority(<priority>))` in a fresh process, then print `report` there and in a
    child it starts (what the trainer's workers would inherit); the printed words."""
    code = ("import os, subprocess, sys; from trainer.priority import SidecarPriority, lower_priority; "
            f"done = lower_priority(SidecarPriority({priority})); print({report}, subprocess.run([sys.executable, "
            f"'-c', 'import os; print({report})'], capture_output=True, text=True).stdout.strip())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()


def test_a_trainer_process_lowers_itself_and_its_children_inherit():
    assert _lowered_process("nice=7, cpu_weight=0", "os.nice(0)") == [str(min(19, os.nice(0) + 7))] * 2


def test_idle_policy_is_inherited_by_the_trainers_children():
    idle = "os.sched_getscheduler(0) == os.SCHED_IDLE"
    assert _lowered_process("nice=0, cpu_weight=0, idle_policy=True", idle) == ["True", "True"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to confine to one")
def test_cpus_confines_the_trainer_its_threads_and_children_to_the_last_cpus():
    last = str(max(os.sched_getaffinity(0)))
    code = ("import os, subprocess, sys, threading; from trainer.priority import SidecarPriority, lower_priority; "
            "started = threading.Event(); seen = []; "
            "t = threading.Thread(target=lambda: (started.wait(), seen.append(sorted(os.sched_getaffinity(0))))); "
            "t.start(); done = lower_priority(SidecarPriority(nice=0, cpu_weight=0, idle_policy=False, cpus=1)); "
            "started.set(); t.join(); "
            "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], "
            "capture_output=True, text=True).stdout.strip(); "
            "print(done['cpus'], sorted(os.sched_getaffinity(0)), seen[0], child, sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip().split("|")
    assert out == [last, f"[{last}]", f"[{last}]", f"[{last}]"]  # itself, a thread started before, a child


def test_passive_openmp_is_set_unless_off_or_already_chosen():
    env: dict = {}
    assert prefer_passive_openmp(SidecarPriority(), env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "active"}  # the operator's own choice stands
    assert prefer_passive_openmp(SidecarPriority(), env) == "active"
    env = {}
    assert prefer_passive_openmp(SidecarPriority(passive_wait=False), env).startswith("default") and env == {}


@pytest.mark.parametrize("flags, spincount", [((), "0"), (("--no-trainer-passive-wait",), "300000")])
def test_the_train_command_sets_openmp_before_libgomp_loads(tmp_path, flags, spincount):
    # libgomp reads its environment once, when torch loads it, and prints what it read with OMP_DISPLAY_ENV=VERBOSE:
    # passive means no spinning (GOMP_SPINCOUNT 0); its default spins 300,000 times first.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    out = subprocess.run([sys.executable, "-m", "livetower", "train", "--data-dir", str(tmp_path), "--tiny", "--once",
                          "--trainer-nice", "0", "--trainer-cpu-weight", "0", "--no-trainer-idle-policy",
                          "--trainer-metrics-port", "-1", *flags], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{spincount}'" in out.stderr
