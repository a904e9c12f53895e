"""Mutation testing of the core modules with mutmut, and the score per module.

`make mutate` runs it. Each run works in a scratch copy (``.cache/mutation/LABEL``): the
package, the tests (from the working tree, or from a git ref with ``--tests-from`` to
measure an older suite against today's code) and pyproject.toml with a ``[tool.mutmut]``
section written here, so the repository itself never holds mutants; the copy's
tests/conftest.py keeps torch on one thread (`ONE_TORCH_THREAD`). mutmut is installed
apart in ``.cache/mutmut`` (``make mutate`` does it) and put *after* the venv on sys.path,
so it never changes which pytest or torch the tests run with.

The score is killed / (killed + survived + timeouts + suspicious + segfaults); a mutant
that no selected test reaches counts as survived ("no tests"). Results are written to
``docs/generated/mutation.md`` (one section per label, replaced on each run), with every
surviving mutant's diff, so each can be judged equivalent or harmless there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["quantcli/tensor", "quantcli/nn", "quantcli/checkpoint.py", "quantcli/config.py"]
#: The fast tests: the math, the layers, the kernels, the file format's unit tests, and the
#: in-process tests that write, load and refuse whole tiny checkpoints (no model downloads,
#: no subprocesses): a few minutes on 2 cores; each mutant runs only the tests reaching it.
FAST_TESTS = [
    "tests/test_quantize_math.py",
    "tests/test_references.py",
    "tests/test_tolerances.py",
    "tests/test_packing.py",
    "tests/test_qlinear.py",
    "tests/test_kernels.py",
    "tests/test_overhead.py",
    "tests/test_config.py",
    "tests/test_format.py",
    "tests/test_fuzz.py",
    "tests/test_checkpoint_reader.py",
    "tests/test_quantize_load.py",
    "tests/test_replace.py",
    "tests/test_compressed_tensors.py",
    "tests/test_safety.py",
    "tests/test_faults.py",
    "tests/test_fast_paths.py",
    "tests/test_tied_heads.py",
    "tests/test_moe.py",
    "tests/test_qembedding.py",
    "tests/test_qexperts.py",
]
#: Tests left out of the mutation runs: those that run quantcli in a subprocess, where the
#: mutants' trampolines cannot import mutmut (it is kept off the venv), the CLI fuzz
#: tests, which build and quantize models for every example (tens of seconds: every mutant
#: they reach times out), and compiled decoding (torch.compile per mutant: the same).
LEFT_OUT_TESTS = [
    "tests/test_fuzz.py::test_inspect_on_random_bytes_is_one_line",
    "tests/test_fuzz.py::test_quantize_on_a_broken_source_fails_cleanly",
    "tests/test_fuzz.py::test_inspect_and_load_on_a_broken_checkpoint_fail_cleanly",
    "tests/test_compressed_tensors.py::test_a_third_party_checkpoint_inspects_evaluates_and_generates",
    "tests/test_safety.py::test_a_link_to_a_system_file_is_refused_by_every_command",
    "tests/test_safety.py::test_a_fifo_is_refused_without_blocking",
    "tests/test_faults.py::test_a_signal_mid_write_leaves_nothing",
    "tests/test_faults.py::test_sigkill_mid_write_then_a_clean_rerun",
    "tests/test_faults.py::test_a_token_never_appears_in_output",
    "tests/test_faults.py::test_bad_quantize_input",
    "tests/test_faults.py::test_huge_max_new_tokens_is_capped_with_a_note",
    "tests/test_fast_paths.py::test_compiled_decoding_gives_the_same_tokens",
    "tests/test_fast_paths.py::test_load_verbose_and_json_name_the_kernels",
    "tests/test_fast_paths.py::test_generate_json_reports_speed_and_dtype",
    "tests/test_tied_heads.py::test_a_model_that_always_ties_its_head_is_refused_with_nothing_written",
    "tests/test_tied_heads.py::test_tables_one_quantized_copy_cannot_serve_are_refused",
    "tests/test_moe.py::test_cli_quantize_inspect_load_generate_eval_on_moe",
    "tests/test_moe.py::test_a_quantized_checkpoint_whose_experts_disagree_with_its_config_is_refused",
    "tests/test_moe.py::test_an_expert_layout_quantcli_does_not_know_is_refused",
    "tests/test_moe.py::test_expert_shapes_the_config_does_not_describe_are_refused",
    "tests/test_moe.py::test_experts_the_config_does_not_describe_are_refused",
]
#: Appended to the scratch copy's tests/conftest.py: torch computes on one thread. mutmut
#: forks a process per mutant from one that ran the tests, and once a process has had an
#: OpenMP pool of several threads, a fork of it hangs as soon as it asks for more than one;
#: the in-process CLI tests ask for the cores (`--threads`' default), so every mutant they
#: reached timed out.
ONE_TORCH_THREAD = """

@pytest.fixture(autouse=True)
def _mutation_run_on_one_torch_thread(monkeypatch):  # written by scripts/mutation.py
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
"""
KILLED = {1, 3}
#: Why each surviving mutant may survive (equivalent or harmless), by mutmut's name.
REASONS = ROOT / "scripts" / "mutation_survivors.json"
STATUS = {
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    None: "not run",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--tests", nargs="+", default=FAST_TESTS)
    parser.add_argument("--tests-from", help="git ref to take tests/ from (default: working tree)")
    parser.add_argument("--label", default="current")
    parser.add_argument("--minutes", type=float, default=60, help="wall-clock cap of the run")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--mutmut", default=str(ROOT / ".cache" / "mutmut"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "generated" / "mutation.md"))
    parser.add_argument("--report-only", action="store_true", help="summarise an earlier run")
    parser.add_argument("--summary-only", action="store_true", help="scores, no survivor list")
    options = parser.parse_args()

    work = ROOT / ".cache" / "mutation" / options.label
    if not options.report_only:
        prepare(work, options)
        started = time.monotonic()
        complete = run(work, options)
        minutes = (time.monotonic() - started) / 60
        (work / "run.json").write_text(json.dumps({"complete": complete, "minutes": minutes}))
    else:
        recorded = json.loads((work / "run.json").read_text())
        complete, minutes = recorded["complete"], recorded["minutes"]
    results = collect(work)
    section = report(options, work, results, complete, minutes)
    print(section)
    write_section(Path(options.out), options.label, section)


def prepare(work: Path, options) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(
        ROOT / "quantcli", work / "quantcli", ignore=shutil.ignore_patterns("__pycache__")
    )
    if options.tests_from:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", options.tests_from, "tests"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(work, filter="data")
    else:
        shutil.copytree(
            ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__")
        )
    with open(work / "tests" / "conftest.py", "a") as conftest:
        conftest.write(ONE_TORCH_THREAD)
    tests = [t for t in options.tests if (work / t).is_file()]
    options.tests = tests
    config = {
        # the whole package is copied (tests import all of it); only `--modules` mutated
        "source_paths": ["quantcli/"],
        "only_mutate": [
            m.rstrip("/") + "/*" if not m.endswith(".py") else m for m in options.modules
        ],
        "pytest_add_cli_args_test_selection": tests,
        "also_copy": ["tests/"],
        "pytest_add_cli_args": ["-q", "-x", "-p", "no:cacheprovider", "--hypothesis-seed=0"]
        + [f"--deselect={test}" for test in LEFT_OUT_TESTS],
        "use_git_change_detection": False,
    }
    pyproject = (ROOT / "pyproject.toml").read_text()
    lines = [pyproject, "", "[tool.mutmut]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)


def run(work: Path, options) -> bool:
    """mutmut run in `work`, stopped after `--minutes`; True when it finished."""
    bootstrap = (
        f"import sys; sys.path.append({options.mutmut!r}); "
        "sys.argv = ['mutmut', 'run', '--max-children', sys.argv[1]]; "
        "from mutmut.__main__ import cli; cli()"
    )
    # one thread: mutmut forks a test process per mutant, and a fork of a process whose
    # OpenMP pool is running can hang, which mutmut would count as a timeout
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **threads, "PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", bootstrap, str(options.max_children)],
        cwd=work,
        env=env,
        start_new_session=True,
    )
    try:
        return process.wait(timeout=options.minutes * 60) == 0
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 15)
        process.wait()
        return False


def collect(work: Path) -> dict[str, dict[str, int | None]]:
    """exit code of every mutant, by source file, from mutmut's .meta files."""
    results = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(work / "mutants")).removesuffix(".meta")
        results[source] = json.loads(meta.read_text())["exit_code_by_key"]
    return results


def module_of(source: str, modules: list[str]) -> str:
    return next(
        (m for m in modules if source == m or source.startswith(m.rstrip("/") + "/")), source
    )


def report(options, work: Path, results, complete: bool, minutes: float) -> str:
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for source, codes in results.items():
        module = module_of(source, options.modules)
        for name, code in codes.items():
            status = "killed" if code in KILLED else STATUS.get(code, "suspicious")
            by_module[module][status] += 1
            if status not in ("killed", "not run", "skipped"):
                survivors.append((module, name, status))
    tests = "working tree" if not options.tests_from else f"git {options.tests_from}"
    lines = [
        f"## {options.label}",
        "",
        f"Tests: {', '.join(Path(t).name for t in options.tests)} ({tests}); "
        f"{minutes:.0f} min{'' if complete else ', stopped at the time cap: partial'}.",
        "",
        "| module | killed | survived | no tests | timeout/other | not run | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for module in sorted(by_module):
        c = by_module[module]
        other = sum(v for k, v in c.items() if k in ("timeout", "suspicious"))
        judged = c["killed"] + c["survived"] + c["no tests"] + other
        score = f"{100 * c['killed'] / judged:.1f}%" if judged else "-"
        lines.append(
            f"| {module} | {c['killed']} | {c['survived']} | {c['no tests']} | {other} | "
            f"{c['not run']} | {score} |"
        )
    if survivors and not options.summary_only:
        reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
        lines += [
            "",
            "Surviving mutants, each with why it may survive (from",
            f"`{REASONS.relative_to(ROOT)}`):",
            "",
        ]
        for _, name, status in sorted(survivors):
            reason = reasons.get(name, "not judged yet")
            lines += [f"- `{name}` ({status}): {reason}", ""]
            diff = show(work, name, options.mutmut)
            if diff:
                lines += ["  ```diff", *("  " + line for line in diff), "  ```", ""]
    return "\n".join(lines) + "\n"


def show(work: Path, name: str, mutmut: str) -> list[str]:
    """The changed lines of one mutant, as `mutmut show` prints them."""
    bootstrap = (
        f"import sys; sys.path.append({mutmut!r}); "
        "sys.argv = ['mutmut', 'show', sys.argv[1]]; "
        "from mutmut.__main__ import cli; cli()"
    )
    result = subprocess.run(
        [sys.executable, "-c", bootstrap, name], cwd=work, capture_output=True, text=True
    )
    return [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]


def write_section(path: Path, label: str, section: str) -> None:
    """Replace this label's section of the report, keeping the others."""
    header = "# Mutation testing\n\nGenerated by `scripts/mutation.py` (`make mutate`).\n\n"
    text = path.read_text() if path.exists() else header
    sections = text.split("\n## ")
    kept = [s for s in sections[1:] if not s.startswith(label + "\n")]
    body = sections[0].rstrip() + "\n\n" + "".join("## " + s.rstrip() + "\n\n" for s in kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body + section)


if __name__ == "__main__":
    main()
