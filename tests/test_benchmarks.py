"""The benchmark scripts still run (tiny shapes, interpret mode): a GPU run must not die on a typo."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gemm_benchmark_smoke():
    r = subprocess.run([sys.executable, "benchmarks/gemm.py", "--smoke"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 256x512")]
    assert len(rows) == 2


def test_attention_benchmark_smoke():
    r = subprocess.run([sys.executable, "benchmarks/attention.py", "--smoke"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(ln.startswith("| 128 |") for ln in r.stdout.splitlines())


def test_throughput_benchmark_smoke_writes_its_table_and_plot(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--out-dir",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={k: v for k, v in __import__("os").environ.items() if k != "OUT"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(ln.startswith("| 2 |") for ln in r.stdout.splitlines())
    assert (tmp_path / "throughput.json").exists()
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
