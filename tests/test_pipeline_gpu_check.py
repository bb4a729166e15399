"""benchmarks/gpu_check.py --tiny: the GPU check script's own code runs on the CPU, skipping what needs CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"

# The figures each paper-size check must report (with --tiny, on the tiny preset).
FIGURES = {
    "understanding_generate": {"prompt_tokens", "new_tokens", "tokens_per_s"},
    "image_embeddings_eager_vs_compiled": {
        "num_vectors", "weight_read_bound_ms", "bandwidth_gb_s", "eager_total_s", "eager_step_ms", "eager_vs_bound",
        "compile_s", "compiled_total_s", "compiled_step_ms", "compiled_vs_bound", "max_abs_diff", "tolerance",
    },
    "image_1024px": {"side", "steps", "end_to_end_s", "decoder_s", "decoder_share"},
    "device_map_auto": {"devices", "max_abs_diff", "save_s", "load_s"},
    "train_step_pretrain": {"loss", "trainable_tensors", "changed_tensors", "tokens", "step_s", "tokens_per_s"},
}


def run_script(tmp_path, *arguments):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *arguments], capture_output=True, text=True,
        env=env, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    assert report["checkpoint"] == "tiny random" and report["environment"]["device"] == "cpu"
    return report, completed.stdout


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    report, stdout = run_script(tmp_path)
    checks = report["checks"]
    assert checks, "no checks ran"
    for row in checks:
        if row["needs_cuda"]:
            assert row["status"] == "skipped" and "needs CUDA" in row["reason"], row
        else:
            assert row["status"] == "passed", row
        # One table row per check.
        assert any(line.startswith(row["name"]) for line in stdout.splitlines()), row["name"]
    rows = {row["name"]: row for row in checks}
    assert {"model cpu offload", "sequential cpu offload", "group offload, block level"} <= set(rows)
    for name, figures in FIGURES.items():
        measurements = rows[name]["measurements"]
        assert figures <= set(measurements), (name, measurements)
    understanding = rows["understanding_generate"]["measurements"]
    assert understanding["new_tokens"] > 0
    embeddings = rows["image_embeddings_eager_vs_compiled"]["measurements"]
    assert embeddings["max_abs_diff"] <= embeddings["tolerance"] == 1e-4  # float32 on the CPU
    assert embeddings["bandwidth_gb_s"] > 0 and embeddings["eager_vs_bound"] > 0
    image = rows["image_1024px"]["measurements"]
    assert image["steps"] == 20 and 0 < image["decoder_share"] <= 1
    assert rows["device_map_auto"]["measurements"]["devices"] == ["cpu"]
    training = rows["train_step_pretrain"]["measurements"]
    assert training["changed_tensors"] > 0 and training["tokens_per_s"] > 0


def test_skip_compile_skips_the_compiled_half_and_keeps_the_eager_figures(tmp_path):
    report, _ = run_script(tmp_path, "--only", "image_embeddings_eager_vs_compiled", "--skip-compile")
    (row,) = report["checks"]
    assert row["status"] == "skipped" and "--skip-compile" in row["reason"], row
    assert {"eager_total_s", "eager_step_ms", "eager_vs_bound", "weight_read_bound_ms"} <= set(row["measurements"])
    assert "compiled_step_ms" not in row["measurements"]
