import os


# No model hub here: every test builds its components locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete random tiny checkpoint folder (model, generation config, processor), built once per run."""
    from pisces.conversion import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from pisces import PiscesForConditionalGeneration

    return PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture
def pipe(tiny_checkpoint):
    """A fresh `PiscesPipeline` of the tiny checkpoint, progress bar off (each test may change it freely)."""
    from pisces import PiscesPipeline

    pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from pisces import PiscesProcessor

    return PiscesProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """8 image-caption pairs of the shapes world, in the `datasets` imagefolder convention (read-only: copy to change)."""
    import json

    from pisces.shapes.world import sample_scene, short_caption

    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for index in range(8):
        scene = sample_scene(index)
        scene.render().save(root / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": short_caption(scene)}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def generation_batch(config, prompt_ids=(11, 12, 13), num_images=1, seed=0):
    """A teacher-forced generation batch `prompt <boi> <gen>*m <eoi>` with labels on <eoi> only, and its images."""
    generator = torch.Generator().manual_seed(seed)
    m = config.num_gen_tokens
    row = list(prompt_ids) + [config.boi_token_id] + [config.gen_token_id] * m + [config.eoi_token_id]
    input_ids = torch.tensor([row] * num_images)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = config.eoi_token_id
    side = config.gen_vision_config.image_size
    gen_pixel_values = torch.randn(num_images, 3, side, side, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "gen_pixel_values": gen_pixel_values}


def understanding_batch(config, num_images=1, seed=0):
    """An understanding batch `<image>*n question answer`, with labels on the answer."""
    generator = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    row = [config.image_token_id] * n + [21, 22, 23, 24]
    input_ids = torch.tensor([row] * num_images)
    labels = input_ids.clone()
    labels[:, : n + 2] = -100
    side = config.vision_config.image_size
    pixel_values = torch.randn(num_images, 3, side, side, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


def accelerate_launch_two_processes() -> list[str]:
    """
    The command prefix that runs `python -m pisces_cli ...` as 2 CPU processes (DDP over gloo). On a machine
    without GPUs, `--cpu` starts one process; `--multi_gpu` with ACCELERATE_USE_CPU=1 (see `CPU_LAUNCH_ENV`) starts two.
    """
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", "pisces_cli",
    ]


CPU_LAUNCH_ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
