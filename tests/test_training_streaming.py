"""Streaming training data: WebDataset shards and `datasets` streams, split over processes and workers, resumed."""

import io
import json

import pytest
import torch


NUM_SAMPLES = 32


@pytest.fixture(scope="module")
def scene_rows():
    from pisces.shapes.world import sample_scene, short_caption

    return [
        {"image": sample_scene(index).render(), "text": short_caption(sample_scene(index)), "number": index}
        for index in range(NUM_SAMPLES)
    ]


@pytest.fixture(scope="module")
def shards(scene_rows, tmp_path_factory):
    """8 WebDataset shards of 4 samples (png + json)."""
    from pisces.training.streaming import write_webdataset_shards

    folder = tmp_path_factory.mktemp("shards")
    written = write_webdataset_shards(scene_rows, folder, samples_per_shard=4)
    assert len(written) == 8
    return folder


@pytest.fixture(scope="module")
def parquet_files(scene_rows, tmp_path_factory):
    """The same rows as 2 parquet files (a `datasets` stream of 2 shards)."""
    import datasets

    folder = tmp_path_factory.mktemp("parquet")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "number": datasets.Value("int64")})
    for part in range(2):
        part_rows = scene_rows[part::2]
        encoded = []
        for row in part_rows:
            buffer = io.BytesIO()
            row["image"].save(buffer, format="PNG")
            encoded.append({"image": {"bytes": buffer.getvalue(), "path": None}, "text": row["text"],
                            "number": row["number"]})
        datasets.Dataset.from_list(encoded, features=features).to_parquet(str(folder / f"part-{part}.parquet"))
    return folder


def numbers(rows):
    return [row["number"] for row in rows]


def test_webdataset_rows_hold_the_image_and_caption(shards, scene_rows):
    from pisces.training.data import load_row_image
    from pisces.training.streaming import streaming_rows

    rows = list(streaming_rows(str(shards / "{000000..000007}.tar")))
    assert numbers(rows) == list(range(NUM_SAMPLES))
    assert rows[3]["text"] == scene_rows[3]["text"]
    image = load_row_image(rows[3]["image"], 3)
    assert image.size == scene_rows[3]["image"].size and image.tobytes() == scene_rows[3]["image"].tobytes()


@pytest.mark.parametrize("source", ["webdataset", "datasets"])
def test_processes_and_workers_read_disjoint_samples_that_cover_the_data(source, shards, parquet_files):
    """2 processes x 2 workers (faked): every sample read once, by exactly one of them."""
    from pisces.training.streaming import streaming_rows

    stream = streaming_rows(str(shards) if source == "webdataset" else str(parquet_files / "*.parquet"))
    workers = 2 if source == "webdataset" else 1  # the parquet stream has 2 shards: one per process
    parts = {
        (rank, worker): numbers(stream.iter_rows(rank, 2, worker, workers))
        for rank in range(2) for worker in range(workers)
    }
    every = [number for part in parts.values() for number in part]
    assert sorted(every) == list(range(NUM_SAMPLES))
    assert all(parts.values())
    if source == "webdataset":  # whole shards: process 0 takes shards 0, 2, 4, 6; its worker 1 takes 2 and 6
        assert parts[(0, 1)] == [8, 9, 10, 11, 24, 25, 26, 27]


def test_the_training_dataset_splits_by_the_launcher_rank(shards, monkeypatch):
    from pisces.training.data import PiscesTrainingDataset
    from pisces.training.streaming import StreamingTrainingDataset, streaming_rows

    seen = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = PiscesTrainingDataset(streaming_rows(str(shards)), generation_ratio=0.5)
        assert isinstance(dataset, StreamingTrainingDataset)
        samples = iter(dataset)
        seen[rank] = {next(samples)["image"].tobytes() for _ in range(NUM_SAMPLES // 2)}
    assert len(seen[0]) == len(seen[1]) == NUM_SAMPLES // 2
    assert not seen[0] & seen[1]


def test_too_few_shards_and_missing_shards_are_clear_errors(shards, tmp_path):
    from pisces.training.streaming import streaming_rows

    with pytest.raises(ValueError, match="No WebDataset shard"):
        streaming_rows(str(tmp_path / "{000000..000003}.tar"))
    with pytest.raises(ValueError, match="cannot be split over 2 process"):
        next(iter(streaming_rows(str(shards / "000000.tar")).iter_rows(0, 2)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_continues_where_the_run_stopped(shards, num_workers):
    """Skipping `steps * batch_size` samples of a process gives the batches an uninterrupted run reads next."""
    from pisces.training.streaming import StreamingTrainingDataset, streaming_rows

    def batches(skip, count):
        dataset = StreamingTrainingDataset(streaming_rows(str(shards)), skip_samples=skip, batch_size=4)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, num_workers=num_workers, collate_fn=lambda samples: samples
        )
        taken = []
        for batch in loader:
            taken.append([(sample["__sample_id__"], sample["task"], sample["text"]) for sample in batch])
            if len(taken) == count:
                return taken

    straight = batches(0, 12)  # 48 samples: the 32 of the stream and 16 of its second pass
    assert batches(5 * 4, 7) == straight[5:]
    assert len({sample for batch in straight for sample in batch}) == 48


def test_trainer_on_webdataset_and_datasets_streams_lowers_the_loss(shards, parquet_files, tiny_checkpoint, tmp_path):
    from transformers import TrainingArguments

    from pisces import PiscesForConditionalGeneration, PiscesProcessor
    from pisces.training import streaming_rows
    from pisces.training.trainer import build_trainer

    processor = PiscesProcessor.from_pretrained(tiny_checkpoint)
    for name, source in (("webdataset", str(shards / "{000000..000007}.tar")),
                         ("datasets", str(parquet_files / "*.parquet"))):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2, learning_rate=2e-3,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
            seed=0, use_cpu=True, max_steps=20,
        )
        model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
        trainer = build_trainer(model, processor, streaming_rows(source), args, stage="pretrain")
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 20
        assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, (name, losses)


def test_pisces_train_on_webdataset_shards(shards, tiny_checkpoint, tmp_path, capsys):
    from pisces_cli.commands import main

    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_checkpoint), "--data", str(shards), "--out", str(out), "--batch-size", "4",
            "--learning-rate", "1e-3", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "100",
            "--", "--disable_tqdm", "true"]
    assert main(argv) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert (out / "config.json").is_file()
    missing = ["train", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "none/{000000..000003}.tar"),
               "--out", str(tmp_path / "other"), "--max-steps", "3"]
    assert main(missing) == 2
    assert "No WebDataset shard (.tar file) matches" in capsys.readouterr().err


def test_a_stream_without_max_steps_is_a_clear_error(shards, parquet_files):
    from pisces_cli.commands import CommandError, _load_rows

    with pytest.raises(CommandError, match="is a stream, which has no length: pass --max-steps"):
        _load_rows(str(shards), "train", max_steps=None)
    with pytest.raises(CommandError, match="pass --max-steps"):
        _load_rows(str(parquet_files / "*.parquet"), "train", streaming=True, max_steps=None)
    assert numbers(_load_rows(str(parquet_files / "*.parquet"), "train", streaming=True))[:2] == [0, 2]


def test_train_decoder_on_webdataset_resumes_like_an_uninterrupted_run(shards, tiny_checkpoint, tmp_path):
    from pisces import PiscesPipeline
    from pisces.training import streaming_rows
    from pisces.training.decoder_training import train_decoder

    def run(out, max_steps, resume=None):
        pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
        return train_decoder(
            pipe, streaming_rows(str(shards)), max_steps=max_steps, batch_size=4, learning_rate=2e-3,
            condition_dropout=0.0, output_dir=str(out), save_steps=4, resume_from_checkpoint=resume,
        )

    straight = run(tmp_path / "straight", 16)
    assert len(straight) == 16
    assert sum(straight[-4:]) / 4 < 0.7 * sum(straight[:4]) / 4, straight
    run(tmp_path / "resumed", 4)
    resumed = run(tmp_path / "resumed", 8, resume=True)
    assert resumed == pytest.approx(straight[:8], rel=1e-5)


def test_two_processes_train_the_decoder_on_webdataset(shards, tiny_checkpoint, tmp_path):
    import subprocess

    from conftest import CPU_LAUNCH_ENV, accelerate_launch_two_processes

    argv = ["train-decoder", "--model", str(tiny_checkpoint), "--data", str(shards / "{000000..000007}.tar"),
            "--out", str(tmp_path / "two"), "--max-steps", "3", "--batch-size", "2", "--logging-steps", "1"]
    result = subprocess.run(
        accelerate_launch_two_processes() + argv, env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained the decoder 3 steps") == 1
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["run"]["num_processes"] == 2 and state["run"]["rows"] == "stream"
