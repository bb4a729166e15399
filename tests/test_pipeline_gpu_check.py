"""benchmarks/gpu_check.py --tiny: the GPU check script's own code runs on the CPU, skipping what needs CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    assert report["checkpoint"] == "tiny random" and report["environment"]["device"] == "cpu"
    checks = report["checks"]
    assert checks, "no checks ran"
    for row in checks:
        if row["needs_cuda"]:
            assert row["status"] == "skipped" and "needs CUDA" in row["reason"], row
        else:
            assert row["status"] == "passed", row
        # One table row per check.
        assert any(line.startswith(row["name"]) for line in completed.stdout.splitlines()), row["name"]
    names = {row["name"] for row in checks}
    assert {"model cpu offload", "sequential cpu offload", "group offload, block level"} <= names
