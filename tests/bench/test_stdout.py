"""The benches' contract: exactly one JSON document on stdout, logs on stderr (bench/benchio.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Owned by the trainer engineers; they print their JSON themselves (checked by their own tests).
NOT_YET = {"rag_quality.py", "train_speed.py"}
BENCHES = sorted(p.name for p in BENCH.glob("*.py") if p.name != "benchio.py")


def test_nothing_a_bench_does_while_measuring_reaches_stdout(tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(BENCH)!r})
        import benchio

        def main():
            print("starting the local platform ...")        # what open_platform used to print
            os.write(1, b"a C library writing to fd 1\\n")
            subprocess.run(["echo", "a child process that inherits stdout"], check=True)
            return {{"benchmark": "noisy", "value": 1}}, 3

        sys.exit(benchio.run(main))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert json.loads(done.stdout) == {"benchmark": "noisy", "value": 1}
    for line in ("starting the local platform", "a C library", "a child process"):
        assert line in done.stderr and line not in done.stdout


def test_a_failing_bench_prints_no_document_and_restores_stdout(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import benchio

        def main():
            print("half-way")
            raise RuntimeError("the platform did not start")

        try:
            benchio.run(main)
        except RuntimeError:
            print("stdout is stdout again")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout == "stdout is stdout again\n"
    assert "half-way" in done.stderr


@pytest.mark.parametrize("name", [b for b in BENCHES if b not in NOT_YET])
def test_every_bench_runs_its_main_through_benchio(name):
    tree = ast.parse((BENCH / name).read_text())
    guard = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    assert "benchio.run(main)" in ast.unparse(guard), f"bench/{name}: end with sys.exit(benchio.run(main))"
    # main returns the document; a print of JSON to stdout would bypass the contract
    prints = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "print"
              and not any(k.arg == "file" for k in n.keywords)]
    assert not prints, f"bench/{name}:{prints[0].lineno}: print to stdout (log to stderr; return the document)"


@pytest.mark.slow
def test_operator_scale_stdout_is_one_json_document_even_when_it_starts_a_platform(tmp_path):
    """The original bug: the private platform's start-up lines came before the JSON."""
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAGTUNE_TEST_PLATFORM", "RAGTUNE_TEST_KUBECONFIG")}
    env["RAGTUNE_BENCH_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(BENCH / "operator_scale.py"), "--n", "3", "--timeout", "120"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # the whole of stdout
    assert report["benchmark"] == "operator_scale" and report["rounds"][0]["all_jobs_created"]
