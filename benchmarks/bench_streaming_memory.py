"""Resident memory while streaming 10,000 training samples, from WebDataset shards and from a `datasets` parquet stream.

Writes 10,000 small PNGs with captions (64 px) into a temporary folder as WebDataset shards and as parquet files, then
reads each stream through `StreamingTrainingDataset` and the reference model's `PiscesCollator` (batches of 8), and
prints the process's resident memory (VmRSS) after 1k, 5k and 10k samples, and its growth from 1k to 10k.

    python benchmarks/bench_streaming_memory.py [--samples 10000]
"""

import argparse
import io
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    """This process's resident memory (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_rows(count: int):
    import numpy as np
    import PIL.Image

    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    for index in range(count):
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        yield {"image": PIL.Image.fromarray(pixels), "text": f"a {colors[index % len(colors)]} pattern number {index}"}


def write_parquet(count: int, folder: Path, files: int = 4) -> str:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def encoded(part):
        for index, row in enumerate(make_rows(count)):
            if index % files != part:
                continue
            buffer = io.BytesIO()
            row["image"].save(buffer, format="PNG")
            yield {"image": {"bytes": buffer.getvalue(), "path": None}, "text": row["text"]}

    folder.mkdir(parents=True)
    for part in range(files):
        dataset = datasets.Dataset.from_generator(encoded, gen_kwargs={"part": part}, features=features)
        dataset.to_parquet(str(folder / f"part-{part}.parquet"))
    return str(folder / "*.parquet")


def measure(name: str, stream, collator, count: int, batch_size: int = 8) -> None:
    from pisces.training.streaming import StreamingTrainingDataset

    dataset = StreamingTrainingDataset(stream, fits=collator.fits)
    marks = {1000, 5000, count}
    figures, seen, batch, start = {}, 0, [], time.perf_counter()
    for sample in dataset:
        batch.append(sample)
        if len(batch) == batch_size:
            collator(batch)
            seen += len(batch)
            batch = []
            if seen in marks:
                figures[seen] = rss_mib()
            if seen >= count:
                break
    elapsed = time.perf_counter() - start
    line = ", ".join(f"{mark} samples {figures[mark]:.0f} MiB" for mark in sorted(figures))
    growth = figures[count] - figures[1000]
    rate = count / elapsed
    print(f"{name}: {line}; growth 1k -> {count // 1000}k {growth:+.1f} MiB ({rate:.0f} samples/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()

    from pisces import PiscesProcessor
    from pisces.reference_model import reference_model_path
    from pisces.training import PiscesCollator, streaming_rows
    from pisces.training.streaming import write_webdataset_shards

    processor = PiscesProcessor.from_pretrained(reference_model_path())
    collator = PiscesCollator(processor)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_webdataset_shards(make_rows(args.samples), work / "shards", samples_per_shard=1000)
        parquet = write_parquet(args.samples, work / "parquet")
        print(f"start: {rss_mib():.0f} MiB", flush=True)
        measure("webdataset", streaming_rows(str(work / "shards")), collator, args.samples)
        measure("datasets parquet stream", streaming_rows(parquet), collator, args.samples)


if __name__ == "__main__":
    main()
