"""Training runs killed at any moment (SIGKILL between steps, in the middle of a checkpoint save, during rotation)
resume from their last complete checkpoint with the losses of an uninterrupted run; a half-written checkpoint is never
picked up. Each killed run is the real `python -m pisces_cli` in a subprocess, through a small wrapper that patches
one function of the save to kill the process at a known point."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch


STEPS = ["--max-steps", "6", "--save-steps", "2"]

# Runs `python -m pisces_cli ARGV...` after arranging for the process to SIGKILL itself at POINT of step STEP.
KILL_WRAPPER = textwrap.dedent(
    """
    import os, runpy, shutil, signal, sys

    point, step = sys.argv[1], int(sys.argv[2])
    sys.argv = ["pisces"] + sys.argv[3:]  # what `python -m pisces_cli` gets


    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


    if point in ("between-steps", "saving-weights", "writing-state", "rotating"):
        from transformers import Trainer, TrainerCallback, TrainerState

        if point == "between-steps":  # after the optimizer step `step`, before any save of it
            import pisces.training.trainer as trainer_module

            class Kill(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == step:
                        die()

            build_trainer = trainer_module.build_trainer
            trainer_module.build_trainer = lambda *a, **k: build_trainer(*a, callbacks=[Kill()], **k)
        if point == "saving-weights":  # the weights of the checkpoint are written, its optimizer state is not
            save_optimizer = Trainer._save_optimizer_and_scheduler

            def killed_save_optimizer(self, output_dir):
                if self.state.global_step == step:
                    die()
                return save_optimizer(self, output_dir)

            Trainer._save_optimizer_and_scheduler = killed_save_optimizer
        if point == "writing-state":  # half of trainer_state.json, the last file of a checkpoint, is on disk
            save_to_json = TrainerState.save_to_json

            def killed_save_to_json(self, json_path):
                if self.global_step == step:
                    save_to_json(self, json_path)
                    text = open(json_path).read()
                    with open(json_path, "w") as file:
                        file.write(text[: len(text) // 2])
                    die()
                return save_to_json(self, json_path)

            TrainerState.save_to_json = killed_save_to_json
        if point == "rotating":  # deleting an old checkpoint: one file gone, then killed
            import pisces.training.checkpoints as checkpoints

            rmtree = shutil.rmtree

            def killed_rmtree(path, *args, **kwargs):
                if "checkpoint-" not in os.path.basename(path):
                    return rmtree(path, *args, **kwargs)
                files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
                if files:
                    os.remove(files[0])
                die()

            checkpoints.shutil.rmtree = killed_rmtree
    if point == "decoder-saving":  # the decoder checkpoint of `step`: its weights written, its training state not
        import torch
        import pisces.training.decoder_training as decoder_training

        save = torch.save

        def killed_save(obj, path, *args, **kwargs):
            if f"checkpoint-{step}" in str(path):
                die()
            return save(obj, path, *args, **kwargs)

        decoder_training.torch.save = killed_save
    if point.startswith("decoder"):  # sys.argv: the checkpoint, the image folder, train_decoder's keywords (JSON)
        import json

        from pisces import PiscesPipeline
        from pisces.training.data import load_image_folder
        from pisces.training.decoder_training import train_decoder

        pipe = PiscesPipeline.from_pretrained(sys.argv[1])
        train_decoder(pipe, load_image_folder(sys.argv[2]), **json.loads(sys.argv[3]))
    else:
        runpy.run_module("pisces_cli", run_name="__main__")
    """
)


def train_argv(checkpoint, data, out, *extra, trainer_args=()):
    return [
        "train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--learning-rate", "1e-3", "--logging-steps", "1", *STEPS, *extra, "--", "--disable_tqdm", "true",
        *trainer_args,
    ]


def run_killed(tmp_path, point, step, argv):
    """
    Runs `python -m pisces_cli argv...` (or, for the `decoder-*` points, `train_decoder` on the checkpoint and
    images in `argv`, with the keywords in `argv[2]`) until it kills itself at `point` of `step`.
    """
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    result = subprocess.run(
        [sys.executable, str(wrapper), point, str(step), *argv], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])
    return result


def step_logs(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry and "step" in entry]


def assert_same_losses(resumed, straight):
    assert [entry["step"] for entry in resumed] == [entry["step"] for entry in straight] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "gen_loss"):
        assert [entry.get(key) for entry in resumed] == pytest.approx(
            [entry.get(key) for entry in straight], rel=1e-4, abs=1e-4
        ), key


@pytest.fixture(scope="module")
def straight_run(image_folder, tiny_checkpoint, tmp_path_factory):
    """The uninterrupted run: 6 steps, a checkpoint every 2."""
    from pisces_cli.commands import main

    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_argv(tiny_checkpoint, image_folder, out)) == 0
    return out


@pytest.mark.parametrize(
    "point, step, resumes_from, trainer_args",
    [
        ("between-steps", 3, "checkpoint-2", ()),
        ("saving-weights", 4, "checkpoint-2", ()),
        ("writing-state", 4, "checkpoint-2", ()),
        ("rotating", 4, "checkpoint-4", ("--save_total_limit", "1")),
    ],
)
def test_train_killed_anywhere_resumes_with_the_uninterrupted_losses(
    point, step, resumes_from, trainer_args, straight_run, image_folder, tiny_checkpoint, tmp_path
):
    from safetensors.torch import load_file

    from pisces.training.checkpoints import checkpoint_folders, last_complete_checkpoint
    from pisces_cli.commands import main

    out = tmp_path / "run"
    run_killed(tmp_path, point, step, train_argv(tiny_checkpoint, image_folder, out, trainer_args=trainer_args))
    # What the kill left: the last complete checkpoint; no folder named checkpoint-* that is not complete.
    assert last_complete_checkpoint(out).name == resumes_from
    assert [path.name for path in checkpoint_folders(out)][-1] == resumes_from

    assert main(train_argv(tiny_checkpoint, image_folder, out, "--resume", trainer_args=trainer_args)) == 0
    assert_same_losses(step_logs(out / "checkpoint-6"), step_logs(straight_run / "checkpoint-6"))
    straight, resumed = load_file(straight_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-5, msg=name)
    # Nothing half-written is left behind, and rotation kept what it was asked to.
    assert sorted(path.name for path in out.iterdir() if path.is_dir() and "checkpoint" in path.name) == (
        ["checkpoint-6"] if trainer_args else ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    )


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    """Folders written in place by other code: the Trainer's last file missing or cut, a just-in-time sentinel."""
    from pisces.training.checkpoints import last_complete_checkpoint, publish_checkpoint, staging_folder
    from pisces.training.trainer import PiscesTrainer

    def checkpoint(name, state='{"global_step": 1}', *extra):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        for file in extra:
            (folder / file).write_text("")
        return folder

    assert last_complete_checkpoint(tmp_path) is None
    checkpoint("checkpoint-2")
    checkpoint("checkpoint-10", None)  # killed before its trainer_state.json
    checkpoint("checkpoint-12", '{"global_st')  # killed while writing it
    checkpoint("checkpoint-14", '{"global_step": 14}', "checkpoint-is-incomplete.txt")
    checkpoint("tmp-checkpoint-16")  # a staging folder is never a checkpoint
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"

    # A folder that is not complete is refused by name, before training starts.
    trainer = PiscesTrainer.__new__(PiscesTrainer)
    with pytest.raises(ValueError, match="checkpoint-10: it has no trainer_state.json"):
        PiscesTrainer.train(trainer, resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    with pytest.raises(ValueError, match="truncated"):
        PiscesTrainer.train(trainer, resume_from_checkpoint=str(tmp_path / "checkpoint-12"))

    # Publishing the staged checkpoint of a step that exists (a run resumed from an earlier one) replaces it whole.
    staged = checkpoint("staged", '{"global_step": 10}')
    publish_checkpoint(staged, tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text()) == {"global_step": 10}
    assert staging_folder(tmp_path, 3).name == "tmp-checkpoint-3"


# ---- decoder training -------------------------------------------------------------------------------------------


def test_train_decoder_killed_while_saving_resumes_with_the_uninterrupted_losses(
    image_folder, tiny_checkpoint, tmp_path
):
    """
    2 images a micro-batch, 2 micro-batches a step, 4 a pass over the 8 images: the checkpoint of step 3 is halfway
    through the second epoch, so resuming from it restores the data order and skips what was done of that epoch.
    Killed while writing the checkpoint of step 4 (its decoder written, its training state not), the run resumes
    from step 3.
    """
    from safetensors.torch import load_file

    from pisces import PiscesPipeline
    from pisces.training.checkpoints import checkpoint_folders, last_complete_checkpoint
    from pisces.training.data import load_image_folder
    from pisces.training.decoder_training import train_decoder

    settings = dict(max_steps=4, batch_size=2, gradient_accumulation_steps=2, ema_decay=0.9, logging_steps=1,
                    save_steps=3)

    def run(out, **resume):
        pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
        losses = train_decoder(pipe, load_image_folder(image_folder), output_dir=str(out), **settings, **resume)
        return losses, pipe.decoder.state_dict()

    straight_losses, straight_weights = run(tmp_path / "straight")
    assert [path.name for path in checkpoint_folders(tmp_path / "straight")] == ["checkpoint-3", "checkpoint-4"]

    out = tmp_path / "killed"
    run_killed(
        tmp_path, "decoder-saving", 4,
        [str(tiny_checkpoint), str(image_folder), json.dumps(dict(settings, output_dir=str(out)))],
    )
    assert last_complete_checkpoint(out).name == "checkpoint-3"
    assert [path.name for path in checkpoint_folders(out)] == ["checkpoint-3"]  # the half-written 4 has no name

    resumed_losses, resumed_weights = run(out, resume_from_checkpoint=True)
    assert len(resumed_losses) == 4
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5, abs=1e-6)
    for name, value in straight_weights.items():  # the EMA weights, put in the decoder at the end
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["losses"] == pytest.approx(straight_losses, rel=1e-5, abs=1e-6)
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert load_file(out / "checkpoint-4" / "decoder" / "diffusion_pytorch_model.safetensors").keys() == (
        straight_weights.keys()
    )


def test_train_decoder_refuses_a_checkpoint_of_another_run(image_folder, tiny_checkpoint, tmp_path):
    from pisces import PiscesPipeline
    from pisces.training.data import load_image_folder
    from pisces.training.decoder_training import train_decoder

    pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
    rows = load_image_folder(image_folder)
    with pytest.raises(ValueError, match="No complete checkpoint-"):
        train_decoder(pipe, rows, max_steps=1, output_dir=str(tmp_path), resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="pass output_dir"):
        train_decoder(pipe, rows, max_steps=1, save_steps=1)
    train_decoder(pipe, rows, max_steps=1, batch_size=4, output_dir=str(tmp_path), save_steps=1)
    with pytest.raises(ValueError, match=r"differs from the one that wrote it \(batch_size 4 -> 2\)"):
        train_decoder(pipe, rows, max_steps=2, batch_size=2, output_dir=str(tmp_path), resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_decoder(pipe, rows, max_steps=2, resume_from_checkpoint=str(tmp_path))
