"""--threads and OpenMP's wait policy: the computing commands use the physical cores by
default, take --threads N, and the entry point sets OMP_WAIT_POLICY=PASSIVE before torch
starts OpenMP, unless the user set it."""

import json
import os
import subprocess
import sys

import pytest
from cli_checks import assert_one_line_error, quantized_checkpoint, run_quantcli

from quantcli.cli.process import physical_cores


def run_with_env(*args, env_update: dict, drop=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    return subprocess.run(
        [sys.executable, "-m", "quantcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "m", "--out", "o"],
        ["load", "m"],
        ["eval", "m"],
        ["generate", "m", "hi"],
        ["inspect", "m", "--against", "n"],
    ],
)
def test_threads_0_is_refused_in_one_line(args, tmp_path):
    result = run_quantcli(*args, "--threads", "0", cwd=tmp_path)
    assert_one_line_error(result, 2, "--threads 0: it takes 1 or more.")
    assert list(tmp_path.iterdir()) == []


def test_threads_are_applied_and_default_to_the_physical_cores(saved_models, tmp_path):
    folder = quantized_checkpoint(saved_models, tmp_path / "q")
    one = run_quantcli("load", folder, "--threads", "1", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["threads"] == 1
    default = run_quantcli("load", folder, "--json")
    assert json.loads(default.stdout)["threads"] == physical_cores()
    generated = run_quantcli(
        "generate", folder, "hi", "--max-new-tokens", "2", "--threads", "1", "--json"
    )
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["threads"] == 1


def test_the_wait_policy_is_passive_unless_the_user_set_it(saved_models, tmp_path):
    folder = quantized_checkpoint(saved_models, tmp_path / "q")
    unset = run_with_env("load", folder, "--json", env_update={}, drop=("OMP_WAIT_POLICY",))
    assert unset.returncode == 0, unset.stderr
    assert json.loads(unset.stdout)["omp_wait_policy"] == "PASSIVE"
    chosen = run_with_env("load", folder, "--json", env_update={"OMP_WAIT_POLICY": "ACTIVE"})
    assert json.loads(chosen.stdout)["omp_wait_policy"] == "ACTIVE"


def test_the_entry_point_sets_the_policy_before_torch_is_imported():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the entry point's module and
    the package must not import torch themselves."""
    code = (
        "import sys, quantcli, quantcli.cli\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def write_topology(root, cpus: dict[int, tuple[int, int]]):
    for cpu, (package, core) in cpus.items():
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_physical_cores_counts_hyperthread_siblings_once(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    # two packages; cpus 0/3 and 1/4 are siblings; cpu 5 has no topology (counts alone)
    write_topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (0, 0), 4: (0, 1)})
    assert physical_cores(tmp_path) == 4


def test_physical_cores_is_capped_by_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    write_topology(tmp_path, {cpu: (0, cpu) for cpu in range(4)})
    (tmp_path / "fs/cgroup").mkdir(parents=True)
    (tmp_path / "fs/cgroup/cpu.max").write_text("150000 100000\n")
    assert physical_cores(tmp_path) == 2
    (tmp_path / "fs/cgroup/cpu.max").write_text("max 100000\n")
    assert physical_cores(tmp_path) == 4


def test_physical_cores_without_affinity_falls_back_to_the_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert physical_cores() == 1
