"""Streaming training data: rows read as they are needed, never the whole dataset at once.

Two kinds of streams:

- WebDataset tar shards (`shards/{000000..000009}.tar`, a list of tar files, or a folder of them), each sample an
  image (`jpg`, `png` or `webp`) and a caption (`txt`, or `json` with `text` / `caption`, and optionally `question`
  and `answer`). Read with the `webdataset` package.
- A streaming `datasets.IterableDataset` (e.g. `load_dataset("parquet", data_files=..., streaming=True)`).

`streaming_rows(source)` opens either as `StreamingRows`, an iterable of the row dicts `PiscesTrainingDataset` reads
(`{"image", "text"}`, plus `question` / `answer` where the sample has them). `StreamingTrainingDataset` turns a stream
into training samples for `PiscesCollator` (`PiscesTrainingDataset(stream, ...)` builds one, so `build_trainer` takes a
stream as it is); `train_decoder` takes a stream too.

Several processes and dataloader workers read different samples: WebDataset shards go to processes by rank
(`webdataset.split_by_node`) and then to workers (`webdataset.split_by_worker`); a `datasets` stream goes to
processes with `datasets.distributed.split_dataset_by_node` and to workers by its own shards. The rank and the number
of processes are `RANK` / `WORLD_SIZE` (set by `accelerate launch` and `torchrun`), else those of
`torch.distributed`. Each process's stream repeats from its start when it ends (epochs), so that processes never
run out at different steps.

Resuming: a stream cannot seek, so a resumed run skips the samples that its steps consumed, without decoding them:
`skip_samples` per process = `global_step * batch_size * gradient_accumulation_steps` (all processes together skip
that times the number of processes). Each process's stream is deterministic (same shards, same order), so the
resumed run sees exactly the samples an uninterrupted run would have, as long as the shards, the number of
processes, of workers and the batch size are the same. Batches that the collator dropped whole count as consumed.
"""

import io
import itertools
import json
import os
import random
from pathlib import Path

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_SAMPLE_ID_KEY = "__sample_id__"


def process_info() -> tuple[int, int]:
    """(rank, number of processes): `RANK` / `WORLD_SIZE` when set, else `torch.distributed`'s, else (0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker_info() -> tuple[int, int]:
    """(dataloader worker, number of workers) of this process; (0, 1) outside a worker."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def is_stream(rows) -> bool:
    """Whether `rows` is read by iterating (a stream) rather than by index (a list, a `datasets.Dataset`)."""
    if isinstance(rows, (StreamingRows, torch.utils.data.IterableDataset)):
        return True
    return hasattr(rows, "__iter__") and not (hasattr(rows, "__len__") and hasattr(rows, "__getitem__"))


def expand_shards(pattern) -> list[str]:
    """
    The tar files of a WebDataset source: a brace pattern (`shards/{000000..000009}.tar`), a glob
    (`shards/*.tar`), a folder (its `*.tar`, sorted) or a list of those. Raises a `ValueError` when none exists.
    """
    import braceexpand

    patterns = [pattern] if isinstance(pattern, (str, Path)) else list(pattern)
    shards = []
    for item in patterns:
        item = str(item)
        if Path(item).is_dir():
            shards += sorted(str(path) for path in Path(item).glob("*.tar"))
            continue
        for expanded in braceexpand.braceexpand(item):
            if any(char in expanded for char in "*?["):
                shards += sorted(str(path) for path in Path(expanded).parent.glob(Path(expanded).name))
            else:
                shards.append(expanded)
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if not shards or len(missing) == len(shards):
        raise ValueError(f"No WebDataset shard (.tar file) matches {pattern}.")
    if missing:
        raise ValueError(f"{len(missing)} of the {len(shards)} shards of {pattern} do not exist, e.g. {missing[0]}.")
    return shards


def is_webdataset_source(source) -> bool:
    """Whether `source` names WebDataset shards: a `.tar` pattern or path, or a folder of `.tar` files."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(is_webdataset_source(item) for item in source)
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    if path.is_dir():
        return not (path / "metadata.jsonl").is_file() and any(path.glob("*.tar"))
    return str(source).endswith(".tar") or str(source).endswith(".tar}")


def webdataset_row(sample: dict) -> dict:
    """The row dict of one WebDataset sample: its image bytes, its caption, and a json's other fields."""
    row = {}
    if sample.get("json") is not None:
        try:
            record = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            row.update(record)
            if "text" not in row and "caption" in row:
                row["text"] = row["caption"]
    if sample.get("txt") is not None:
        row["text"] = sample["txt"].decode("utf-8", errors="replace")
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
    # Kept as bytes: `load_row_image` decodes it when the sample is used (and skips it if it is not an image).
    row["image"] = None if image is None else {"bytes": image, "path": sample.get("__key__")}
    return row


class StreamingRows:
    """
    Rows of a stream, split over processes and dataloader workers (see the module docstring).

    Build it with `streaming_rows`. Iterating it yields the rows of this process and worker, once (one epoch);
    `iter_rows(rank, world_size, worker, num_workers, epoch)` yields those of any process and worker.
    """

    def __init__(self, kind: str, source, description: str):
        self.kind = kind  # "webdataset" or "datasets"
        self.source = source  # the shard list, or the `datasets.IterableDataset`
        self.description = description

    def __repr__(self) -> str:
        return f"StreamingRows({self.kind}: {self.description})"

    @property
    def num_shards(self) -> int:
        return len(self.source) if self.kind == "webdataset" else getattr(self.source, "n_shards", 1)

    def iter_rows(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1, epoch: int = 0):
        if self.kind == "webdataset":
            yield from self._iter_webdataset(rank, world_size, worker, num_workers)
        else:
            yield from self._iter_datasets(rank, world_size, worker, num_workers, epoch)

    def _iter_webdataset(self, rank, world_size, worker, num_workers):
        import webdataset as wds

        if len(self.source) < world_size * num_workers:
            raise ValueError(
                f"{len(self.source)} WebDataset shard(s) cannot be split over {world_size} process(es) x "
                f"{num_workers} dataloader worker(s): write at least {world_size * num_workers} shards, or use fewer "
                "workers."
            )
        # webdataset's splitters read the rank and worker of the caller; give them the ones asked for.
        fake = {"RANK": rank, "WORLD_SIZE": world_size, "WORKER": worker, "NUM_WORKERS": num_workers}
        shards = _with_environment(fake, wds.split_by_worker, _with_environment(fake, wds.split_by_node, self.source))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(shards),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
        )
        for sample in pipeline:
            yield webdataset_row(sample)

    def _iter_datasets(self, rank, world_size, worker, num_workers, epoch):
        from datasets.distributed import split_dataset_by_node

        dataset = self.source
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        if num_workers > 1:
            # Workers take the stream's shards when it has enough of them, else every num_workers-th row.
            if dataset.n_shards >= num_workers and dataset.n_shards % num_workers == 0:
                dataset = dataset.shard(num_shards=num_workers, index=worker)
            else:
                dataset = split_dataset_by_node(dataset, rank=worker, world_size=num_workers)
        # Iterated as a plain iterable: the worker split is done above, not by `datasets` again.
        yield from _plain_iterable(dataset)

    def __iter__(self):
        rank, world_size = process_info()
        yield from self.iter_rows(rank, world_size, *_worker_info())


def _plain_iterable(dataset):
    """Iterates a `datasets.IterableDataset` without its own dataloader-worker split (already done)."""
    ex_iterable = dataset._prepare_ex_iterable_for_iteration()
    for _, example in ex_iterable:
        yield example


def _with_environment(values: dict, function, *args):
    """`function(*args)` fully consumed with `values` as environment variables, restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: str(value) for name, value in values.items()})
    try:
        return list(function(*args))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def streaming_rows(source, split: str = "train", data_files=None, **load_kwargs) -> StreamingRows:
    """
    Opens a stream of training rows without reading it.

    Args:
        source: WebDataset shards (a `.tar` brace pattern or glob, a folder of `.tar` files, a list of them); a
            streaming `datasets.IterableDataset`; a `datasets.Dataset` (streamed by `to_iterable_dataset`); a folder
            in the imagefolder convention (`metadata.jsonl`); a `.parquet` / `.json` / `.jsonl` / `.csv` file or glob;
            a folder saved by `datasets`; or a `datasets` builder or Hub name (read with `streaming=True`).
        split: the split of a `datasets` source.
        data_files: passed to `datasets.load_dataset` with a builder name (e.g. `"parquet"`).
        load_kwargs: more `datasets.load_dataset` arguments.

    Returns:
        `StreamingRows`, an iterable of row dicts (`{"image", "text", ...}`).
    """
    if isinstance(source, StreamingRows):
        return source
    if is_webdataset_source(source):
        shards = expand_shards(source)
        return StreamingRows("webdataset", shards, f"{len(shards)} shards of {source}")
    if isinstance(source, (str, Path)) and ("{" in str(source) and ".tar" in str(source)):
        expand_shards(source)  # raises: the pattern matches no shard
    import datasets

    if isinstance(source, datasets.IterableDataset):
        return StreamingRows("datasets", source, "a datasets.IterableDataset")
    if isinstance(source, datasets.Dataset):
        return StreamingRows("datasets", source.to_iterable_dataset(), "a datasets.Dataset")
    if not isinstance(source, (str, Path)):
        raise ValueError(f"Cannot stream training rows from {type(source).__name__}.")
    path = Path(source)
    name = str(source)
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        stream = datasets.load_dataset("imagefolder", data_dir=name, split=split, streaming=True, **load_kwargs)
    elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(name)
        loaded = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        stream = loaded.to_iterable_dataset(num_shards=max(1, len(loaded.cache_files)))
    elif path.suffix in (".parquet", ".json", ".jsonl", ".csv") or data_files is not None:
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        if data_files is not None:
            builder, files = name, data_files
        else:
            files = sorted(str(file) for file in path.parent.glob(path.name)) if "*" in name else [name]
            if not files or not all(Path(file).is_file() for file in files):
                raise ValueError(f"No data file matches {source}.")
        stream = datasets.load_dataset(builder, data_files=files, split=split, streaming=True, **load_kwargs)
    else:
        stream = datasets.load_dataset(name, split=split, streaming=True, **load_kwargs)
    return StreamingRows("datasets", stream, name)


def _as_streaming_rows(rows) -> StreamingRows | None:
    """`rows` as `StreamingRows` where it is a kind `streaming_rows` knows, else None (a plain iterable)."""
    if isinstance(rows, StreamingRows):
        return rows
    try:
        import datasets
    except ImportError:
        return None
    if isinstance(rows, datasets.IterableDataset):
        return streaming_rows(rows)
    return None


def worker_skip(skip_samples: int, batch_size: int, worker: int, num_workers: int) -> int:
    """
    The samples that dataloader worker `worker` of a process must skip so that the process skips `skip_samples`:
    the DataLoader takes its batches from the workers in turn, batch b from worker b % num_workers.
    """
    if num_workers <= 1:
        return skip_samples
    if skip_samples % batch_size:
        raise ValueError(
            f"Cannot resume a stream read by {num_workers} workers at {skip_samples} samples, not a whole number of "
            f"batches of {batch_size}."
        )
    batches = skip_samples // batch_size
    return len(range(worker, batches, num_workers)) * batch_size


class _StreamReader(torch.utils.data.IterableDataset):
    """The common part of the streaming datasets: this process and worker's rows, repeated, after a skip."""

    def __init__(self, rows, skip_samples: int = 0, batch_size: int = 1, repeat: bool = True):
        self.rows = rows
        self.streaming_rows = _as_streaming_rows(rows)
        self.skip_samples = skip_samples
        self.batch_size = batch_size
        self.repeat = repeat

    def resume(self, skip_samples: int, batch_size: int) -> None:
        """Makes the next iteration skip the first `skip_samples` samples of this process (batches of `batch_size`)."""
        self.skip_samples = skip_samples
        self.batch_size = batch_size

    def _reader(self) -> tuple[int, int, int, int]:
        """
        (rank, number of processes, worker stream, number of workers) of this reader. The DataLoader takes its first
        batch from worker 0; after a skip of b batches, worker w reads the part of the stream that worker
        (w + b) % num_workers read in the uninterrupted run, so that the batches come in the same order.
        """
        rank, world_size = process_info()
        worker, num_workers = _worker_info()
        if num_workers > 1:
            worker = (worker + self.skip_samples // max(1, self.batch_size)) % num_workers
        return rank, world_size, worker, num_workers

    def _rows(self):
        """(position in this process and worker's stream, row), from the first one not skipped, forever."""
        rank, world_size, worker, num_workers = self._reader()
        skip = worker_skip(self.skip_samples, self.batch_size, worker, num_workers)
        position = 0
        for epoch in itertools.count():
            if self.streaming_rows is not None:
                rows = self.streaming_rows.iter_rows(rank, world_size, worker, num_workers, epoch)
            else:  # a plain iterable: every (world_size * num_workers)-th row
                slot, slots = rank * num_workers + worker, world_size * num_workers
                rows = itertools.islice(iter(self.rows), slot, None, slots)
            seen = 0
            for row in rows:
                seen += 1
                if skip > 0:
                    skip -= 1
                else:
                    yield position, row
                position += 1
            if seen == 0:
                if epoch == 0 and num_workers == 1:
                    raise ValueError(f"The training stream of process {rank} is empty.")
                return
            if not self.repeat:
                return

    def sample_id(self, position: int) -> int:
        """A number for the sample at `position` of this stream, distinct across processes and workers."""
        rank, world_size, worker, num_workers = self._reader()
        return (position * world_size + rank) * num_workers + worker


class StreamingTrainingDataset(_StreamReader):
    """
    Training samples from a stream of rows, as `PiscesTrainingDataset` makes them from indexed rows (same arguments,
    same samples: directions, caption dropout, bad rows skipped and counted in `SKIPPED_ROWS_KEY`).

    The draws of each sample are seeded by `(seed, rank, worker, position in that stream)`, so a resumed run draws
    what an uninterrupted one would. The stream repeats when it ends; give the Trainer `max_steps`.

    Args:
        rows: `streaming_rows(...)`, a `datasets.IterableDataset`, or any iterable of row dicts.
        skip_samples: samples of this process to skip first (a resumed run: `global_step * batch_size *
            gradient_accumulation_steps`); `batch_size` is the per-process batch size, needed with several workers.
        The other arguments are those of `PiscesTrainingDataset`.
    """

    def __init__(
        self,
        rows,
        image_column: str = "image",
        text_column: str = "text",
        question_column: str = "question",
        answer_column: str = "answer",
        generation_ratio: float = 0.5,
        caption_dropout: float = 0.1,
        seed: int = 0,
        fits=None,
        skip_samples: int = 0,
        batch_size: int = 1,
    ):
        for name, value in (("generation_ratio", generation_ratio), ("caption_dropout", caption_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        super().__init__(_as_streaming_rows(rows) or rows, skip_samples=skip_samples, batch_size=batch_size)
        self.image_column = image_column
        self.text_column = text_column
        self.question_column = question_column
        self.answer_column = answer_column
        self.generation_ratio = generation_ratio
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.fits = fits

    def __iter__(self):
        from .data import SKIPPED_ROWS_KEY, row_sample

        rank, _, worker, _ = self._reader()
        bad = 0
        for position, row in self._rows():
            rng = random.Random(f"pisces-{self.seed}-{rank}-{worker}-{position}")
            sample = row_sample(self, row, rng, position)
            if sample is None:
                bad += 1
                continue
            if self.fits is not None and not self.fits(sample):
                logger.warning(
                    f"Skipping stream row {position}: its {sample['task']} sequence is too long for the model."
                )
                bad += 1
                continue
            sample[SKIPPED_ROWS_KEY] = bad
            sample[_SAMPLE_ID_KEY] = self.sample_id(position)
            bad = 0
            yield sample


class StreamingDecoderImages(_StreamReader):
    """
    Decoder-training images from a stream of rows (see `DecoderImages`): bad images are skipped and counted in
    `skipped` (of this process; dataloader workers count in their own copies).

    Yields `{"gen_pixel_values": (3, H', W'), "pixel_values": (3, H, W) in [-1, 1], "index": int}`, `index` being
    `sample_id(position)`, which seeds the sample's noise.
    """

    def __init__(self, rows, pipe, image_column: str = "image", skip_samples: int = 0, batch_size: int = 1):
        super().__init__(_as_streaming_rows(rows) or rows, skip_samples=skip_samples, batch_size=batch_size)
        self.image_column = image_column
        self.gen_image_processor = pipe.processor.gen_image_processor
        self.image_processor = pipe.image_processor
        self.size = pipe.default_sample_size * pipe.vae_scale_factor
        self.skipped = 0

    def __iter__(self):
        from .data import load_row_image

        for position, row in self._rows():
            image = load_row_image(row.get(self.image_column), position)
            if image is None:
                self.skipped += 1
                continue
            gen = self.gen_image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            pixels = self.image_processor.preprocess(image, height=self.size, width=self.size)[0]
            yield {"gen_pixel_values": gen, "pixel_values": pixels, "index": self.sample_id(position)}


def write_webdataset_shards(rows, folder, samples_per_shard: int = 100, image_format: str = "png") -> list[str]:
    """
    Writes image-caption rows (`{"image": PIL image, "text": str, ...}`) as WebDataset shards
    `folder/000000.tar`, ... (`<key>.<image_format>` and `<key>.json`); returns their paths.
    """
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as writer:
        for index, row in enumerate(rows):
            buffer = io.BytesIO()
            row["image"].save(buffer, format=image_format.upper())
            record = {key: value for key, value in row.items() if key != "image"}
            writer.write({"__key__": f"{index:08d}", image_format: buffer.getvalue(), "json": json.dumps(record)})
    return sorted(str(path) for path in folder.glob("*.tar"))


__all__ = [
    "StreamingDecoderImages",
    "StreamingRows",
    "StreamingTrainingDataset",
    "expand_shards",
    "is_stream",
    "process_info",
    "streaming_rows",
    "worker_skip",
    "write_webdataset_shards",
]
