"""The benchmark scripts and benchmarks/gpu_check.sh still run (tiny shapes, interpret mode): a
GPU run must not die on a typo, a stale -k filter, a missing flag or a summary that cannot read
a JSON. (The whole `gpu_check.sh --dry-run --quick` takes ~5 minutes on 2 cores: too long here;
these tests run its parts: the benchmarks' --smoke modes into one folder, then the summary over
what they wrote, the step runner, and the pytest selections and flags the script names.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BENCHMARKS = ("ceilings", "gemm", "grouped_gemm", "attention", "throughput", "long_context",
              "speculative_cost", "summary")


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **kw)
    return env


def _run(args, timeout=600, **env):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=_env(**env))


def test_smoke_runs_and_the_summary_reads_what_they_wrote(tmp_path):
    """Each benchmark's --smoke mode into one folder (as gpu_check.sh --dry-run runs them),
    then the summary over it: every target is computed from those JSONs except the batch-256
    one (the throughput run here uses batch 4), so a renamed key or a missing file shows."""
    out = tmp_path
    r = _run([sys.executable, "benchmarks/ceilings.py", "--smoke"], OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "ceilings.json").exists()

    r = _run([sys.executable, "benchmarks/gemm.py", "--smoke"], OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 256x512")]
    assert [int(ln.split("|")[2]) for ln in rows] == [1, 64, 256, 1024]  # every target's M

    r = _run([sys.executable, "benchmarks/grouped_gemm.py", "--smoke"], OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [ln.split("|")[6].strip() for ln in r.stdout.splitlines()
            if ln.startswith("| tiny")] == ["1", "8"]  # both token counts ran
    assert (out / "grouped_gemm.json").exists()

    r = _run([sys.executable, "benchmarks/attention.py", "--smoke"], OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(ln.startswith("| 4096 |") for ln in r.stdout.splitlines())
    assert "ragged step" in r.stdout

    # --quick as gpu_check.sh --quick runs it: no warm-up run, latency for W4A8KV4 at batch 1
    r = _run([sys.executable, "benchmarks/throughput.py", "--smoke", "--quick", "--batches", "4",
              "--out-dir", str(out)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(ln.startswith("| 4 |") for ln in r.stdout.splitlines())
    assert "0 cached prompt tokens" in r.stdout
    assert (out / "throughput.json").exists()
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"

    r = _run([sys.executable, "benchmarks/speculative_cost.py", "--smoke", "--batches", "2"],
             OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"batch 2: target decode .* round .* tokens: [0-9.]+x", r.stdout), r.stdout
    assert (out / "speculative_cost.json").exists()

    r = _run([sys.executable, "benchmarks/summary.py", "--strict", str(out)])
    lines = r.stdout.splitlines()
    marks = [ln for ln in lines if ln.startswith("[")]
    assert len(marks) == 7, r.stdout
    computed = [ln for ln in marks if ln.startswith(("[MET ]", "[MISS]"))]
    assert len(computed) == 6, r.stdout
    assert "batch 256" in next(ln for ln in marks if ln.startswith("[----]"))
    assert "error" not in r.stdout and "missing" not in r.stdout, r.stdout
    assert any(ln.startswith("ceilings: copy") for ln in lines), r.stdout
    assert r.returncode == 1  # --strict: the batch-256 target was not computed


def test_summary_strict_fails_on_missing_or_broken_json(tmp_path):
    (tmp_path / "gemm.json").write_text("{not json")
    r = _run([sys.executable, "benchmarks/summary.py", "--strict", str(tmp_path)])
    assert r.returncode == 1
    assert "gemm.json: unreadable" in r.stdout and "throughput.json: missing" in r.stdout
    r = _run([sys.executable, "benchmarks/summary.py", str(tmp_path)])
    assert r.returncode == 0  # on the GPU the summary never fails the check


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_flag_gpu_check_passes_exists(name):
    """Each flag gpu_check.sh gives a benchmark (and --smoke, which --dry-run adds) is in that
    script's --help."""
    r = _run([sys.executable, f"benchmarks/{name}.py", "--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = [ln.split(f"benchmarks/{name}.py", 1)[1] for ln in text.splitlines()
             if f"benchmarks/{name}.py" in ln and not ln.lstrip().startswith("#")]
    assert calls, f"gpu_check.sh no longer runs {name}.py"
    flags = {f for c in calls for f in re.findall(r"(?<![\w$-])--[a-z][a-z0-9-]*", c)}
    flags |= {f"--{v.lower()}" for v in ("QUICK", "SMOKE") if any(f"${v}" in c for c in calls)}
    if name == "summary":
        flags.add("--strict")
    missing = [f for f in sorted(flags) if f not in r.stdout]
    assert not missing, f"{name}.py --help lacks {missing}"


def test_every_pytest_selection_of_gpu_check_selects_tests():
    """Each test file gpu_check.sh names exists, its -k filter selects tests, and every term of
    an "a or b or ..." filter matches at least one test (a renamed test drops out otherwise)."""
    r = _run(["bash", str(SCRIPT), "--print-tests"])
    assert r.returncode == 0, r.stderr
    steps = [ln.split("|") for ln in r.stdout.strip().splitlines()]
    assert [s[0] for s in steps] == ["kernel-tests", "mosaic-tests", "engine-tests"]
    for name, files, flt in steps:
        files = files.split()
        assert files and all((REPO / f).is_file() for f in files), (name, files)
        c = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                  "no:cacheprovider", *files, "-k", flt], timeout=300)
        assert c.returncode == 0, (name, c.stdout[-2000:], c.stderr[-2000:])
        selected = [ln for ln in c.stdout.splitlines() if "::" in ln]
        assert selected, (name, flt)
        assert {ln.split("::")[0] for ln in selected} == set(files), (name, "a file selects none")
        for term in (t.strip() for t in flt.split(" or ")):
            if not term.startswith("not "):
                assert any(term.lower() in ln.lower() for ln in selected), (name, term)


def test_gpu_check_runs_a_step_and_keeps_to_its_budget(tmp_path):
    r = _run(["bash", str(SCRIPT), "--dry-run", "--only", "ceilings"], timeout=300,
             OUT=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "-- ceilings: ok" in r.stdout and "== gemm" not in r.stdout
    assert (tmp_path / "ceilings.json").exists() and (tmp_path / "gpu_check.log").exists()
    r = _run(["bash", str(SCRIPT), "--dry-run", "--only", "ceilings"], timeout=300,
             OUT=str(tmp_path), GPU_CHECK_BUDGET="5")
    assert r.returncode == 1 and "ceilings skipped (budget)" in r.stdout, r.stdout[-3000:]
    r = _run(["bash", str(SCRIPT), "--no-such-flag"])
    assert r.returncode == 2
