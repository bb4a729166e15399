"""`pisces train`, `train-decoder` and `train reference`: output folders, resuming a run as its kind, the summary."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path


import pisces_cli.commands as cli


PISCES = shutil.which("pisces")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run_pisces(*argv, timeout=300):
    assert PISCES is not None, "the `pisces` console script is not installed in this environment"
    return subprocess.run([PISCES, *argv], capture_output=True, text=True, env=ENV, timeout=timeout)


def last_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def train_argv(checkpoint, data, out, *extra):
    return [
        "train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--learning-rate", "1e-3", "--logging-steps", "1", *extra, "--", "--disable_tqdm", "true",
    ]


def old_run(folder: Path) -> Path:
    """A folder holding another run: a checkpoint and the model beside it."""
    (folder / "checkpoint-9").mkdir(parents=True)
    (folder / "checkpoint-9" / "config.json").write_text("{}")
    (folder / "checkpoint-9" / "trainer_state.json").write_text(json.dumps({"global_step": 9, "log_history": []}))
    (folder / "notes.txt").write_text("an old run")
    return folder


# ---- a folder that holds a run is refused without --resume or --overwrite ----------------------------------------


def test_train_refuses_a_folder_that_holds_a_run(tiny_checkpoint, image_folder, tmp_path):
    out = old_run(tmp_path / "run")
    err = last_error_line(run_pisces(*train_argv(tiny_checkpoint, image_folder, out, "--max-steps", "1")))
    assert err == (
        f"pisces: error: --out {out} is not empty (it may hold another run); pass --resume to continue its run, pass "
        f"--overwrite to replace it, or a new --out"
    )
    result = run_pisces(*train_argv(tiny_checkpoint, image_folder, out, "--resume", "--overwrite"))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-9", "notes.txt"]  # untouched


def test_train_decoder_refuses_a_folder_that_holds_a_run(tiny_checkpoint, image_folder, tmp_path):
    out = old_run(tmp_path / "run")
    argv = ["train-decoder", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--out", str(out)]
    err = last_error_line(run_pisces(*argv))
    assert err.startswith(f"pisces: error: --out {out} is not empty") and "pass --overwrite to replace it" in err


def test_train_decoder_resumes_its_run_and_keeps_its_checkpoints(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "decoder"
    argv = ["train-decoder", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--out", str(out),
            "--batch-size", "4", "--save-steps", "1", "--logging-steps", "1"]
    assert cli.main(argv + ["--max-steps", "1"]) == 0
    assert cli.main(argv + ["--max-steps", "2"]) == 2  # a second run into the same folder
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(argv + ["--max-steps", "2", "--resume"]) == 0
    assert "trained the decoder 2 steps" in capsys.readouterr().out
    names = {path.name for path in out.iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "model_index.json", "decoder", "config.json"} <= names
    assert cli.FINAL_PARTIAL_FOLDER not in names


def test_train_reference_refuses_a_folder_that_holds_a_run(tmp_path):
    out = old_run(tmp_path / "reference")
    err = last_error_line(run_pisces("train", "reference", "--out", str(out)))
    assert err.startswith(f"pisces: error: --out {out} is not empty") and "--overwrite" in err
    assert f"continues from {out}.partial" in err


def test_train_reference_overwrite_starts_from_nothing(tmp_path, monkeypatch, capsys):
    import pisces.training.reference as reference

    out = old_run(tmp_path / "reference")
    (tmp_path / "reference.partial" / "0-encoder").mkdir(parents=True)
    seen = []

    def fake_train_reference(out_dir, seed=0, recipe="joint", budget=None, components_from=None, log=print):
        seen.append((out_dir.exists(), out_dir.with_name(out_dir.name + ".partial").exists()))
        return out_dir

    monkeypatch.setattr(reference, "train_reference", fake_train_reference)
    assert cli.main(["train", "reference", "--out", str(out), "--overwrite"]) == 0
    assert seen == [(False, False)]  # neither the old result nor the old partial run survive


def test_overwrite_refuses_the_working_directory(tiny_checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(old_run(tmp_path / "here"))
    assert cli.main(train_argv(tiny_checkpoint, image_folder, ".", "--overwrite")) == 2
    assert "--overwrite would delete ., which holds the working directory" in capsys.readouterr().err


def test_train_overwrite_replaces_the_old_run(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = old_run(tmp_path / "run")
    assert cli.main(train_argv(tiny_checkpoint, image_folder, out, "--max-steps", "1", "--overwrite")) == 0
    names = {path.name for path in out.iterdir()}
    assert "notes.txt" not in names and "checkpoint-9" not in names
    assert {"checkpoint-1", "config.json", "model.safetensors", "model_index.json", "decoder"} <= names
    assert cli.FINAL_PARTIAL_FOLDER not in names  # the finished checkpoint was moved into place


def test_convert_random_refuses_a_folder_that_holds_files_and_writes_whole(tmp_path, capsys):
    out = old_run(tmp_path / "ckpt")
    assert cli.main(["convert", "random", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pisces: error: {out} already exists and is not an empty folder; choose a new output folder"
    )
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # an empty folder is fine
    assert cli.main(["convert", "random", "--out", str(fresh)]) == 0
    assert (fresh / "model_index.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt", "fresh"]  # no temporary sibling left


# ---- resuming a run as the kind it is ---------------------------------------------------------------------------


def test_a_lora_run_resumes_as_lora_without_the_flag(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "lora"
    first = train_argv(tiny_checkpoint, image_folder, out, "--max-steps", "1", "--save-steps", "1", "--lora",
                       "--lora-rank", "4", "--lora-alpha", "8")
    assert cli.main(first) == 0
    capsys.readouterr()

    result = run_pisces(*train_argv(tiny_checkpoint, image_folder, out, "--max-steps", "2", "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming the LoRA run in {out} (checkpoint-1 holds a LoRA adapter)" in result.stdout
    assert f"wrote the LoRA adapter to {out} and the merged checkpoint to {out / 'merged'}" in result.stdout
    adapter = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)  # the run's own rank, not the default 8
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    assert not (out / "config.json").exists() and (out / "merged" / "config.json").is_file()

    # A rank that is not the run's is refused, not silently changed.
    assert cli.main(train_argv(tiny_checkpoint, image_folder, out, "--resume", "--lora-rank", "16")) == 2
    assert capsys.readouterr().err.strip() == (
        f"pisces: error: --resume: the run in {out} is a LoRA run with --lora-rank 4, not 16; drop --lora-rank"
    )


def test_resume_lora_on_a_full_model_run_names_the_flag(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = old_run(tmp_path / "full")
    assert cli.main(train_argv(tiny_checkpoint, image_folder, out, "--resume", "--lora")) == 2
    assert capsys.readouterr().err.strip() == (
        f"pisces: error: --resume --lora: {out / 'checkpoint-9'} holds a full model, not a LoRA adapter (no "
        "adapter_config.json); resume this run without --lora"
    )


# ---- the summary ------------------------------------------------------------------------------------------------


def test_the_summary_reports_the_last_steps_losses(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    # 3 steps logged every 2: the last step is logged too, and the summary prints that entry.
    assert cli.main(train_argv(tiny_checkpoint, image_folder, out, "--max-steps", "3", "--logging-steps", "2")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 3]
    last = logged[-1]
    expected = ", ".join(f"{key} {last[key]:.4f}" for key in ("loss", "lm_loss", "gen_loss") if key in last)
    assert summary == f"trained 3 steps ({expected}); wrote the checkpoint to {out}"
    assert re.search(r"\(loss \d+\.\d{4}, lm_loss \d+\.\d{4}, gen_loss \d+\.\d{4}\)", summary)
