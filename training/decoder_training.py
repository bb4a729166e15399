"""Training the diffusion decoder: reconstruct images from the frozen generation encoder's pooled vectors.

The decoder is an autoencoder's second half: image -> frozen gen encoder -> m pooled vectors ->
denoiser -> image. It never sees the LLM, so it trains on images alone. The loss follows the pipeline's scheduler:
epsilon or v-prediction (or sample) for DDPM-family schedulers, velocity `noise - x0` for flow matching; in the VAE's
latents when the pipeline has a VAE, in pixels otherwise. Built on accelerate (so it runs unchanged under
`accelerate launch`) and diffusers' training utilities (`EMAModel`).

With `output_dir` and `save_steps`, a run writes `checkpoint-<step>` folders (the decoder as a diffusers model folder,
the optimizer, schedule, EMA and random states, and `trainer_state.json` with the position in the data and the losses),
each whole or not at all (`pisces.training.checkpoints`), and `resume_from_checkpoint=True` continues from the last
complete one with the losses of an uninterrupted run.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from transformers.utils import logging

from pisces.pipelines import decoder_conditioning, decoder_input
from pisces.processing.processing_pisces import to_rgb_image

from .checkpoints import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    checkpoint_folders,
    incomplete_reason,
    last_complete_checkpoint,
    publish_checkpoint,
    remove_leftovers,
    rotate_checkpoints,
    staging_folder,
)
from .data import load_row_image
from .streaming import StreamingDecoderImages, is_stream


logger = logging.get_logger(__name__)

# In each checkpoint: the decoder (a diffusers model folder) and the optimizer, schedule, EMA and random states.
DECODER_FOLDER = "decoder"
TRAINING_STATE_FILE = "training_state.pt"


def is_flow_matching(scheduler) -> bool:
    """Whether a diffusers scheduler samples a flow-matching ODE (it has sigmas but no `alphas_cumprod`)."""
    return "FlowMatch" in type(scheduler).__name__


class DecoderImages(torch.utils.data.Dataset):
    """
    Images for decoder training, from rows with an image column (text is not needed). A bad image (missing,
    unreadable) is replaced by the next good one and counted in `skipped`.

    Returns `{"gen_pixel_values": (3, H', W') for the gen encoder, "pixel_values": (3, H, W) in [-1, 1] for the VAE
    or the pixel-space decoder}`.
    """

    def __init__(self, rows, pipe, image_column: str = "image"):
        if len(rows) == 0:
            raise ValueError("The training data is empty.")
        self.rows = rows
        self.image_column = image_column
        self.gen_image_processor = pipe.processor.gen_image_processor
        self.image_processor = pipe.image_processor
        self.size = pipe.default_sample_size * pipe.vae_scale_factor
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, index: int):
        return load_row_image(self.rows[index].get(self.image_column), index)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.rows)):
            image = self._image((index + offset) % len(self.rows))
            if image is not None:
                self.skipped += offset
                gen = self.gen_image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
                pixels = self.image_processor.preprocess(image, height=self.size, width=self.size)[0]
                return {"gen_pixel_values": gen, "pixel_values": pixels, "index": index}
        raise ValueError("Every row of the training data is bad (missing or unreadable images).")


class PerSampleRandom:
    """
    Draws each sample's random numbers from its own generator, seeded by (seed, epoch, dataset index). A sample then
    gets the same noise whichever process or micro-batch it lands in, so N processes train exactly like one process
    with N-fold gradient accumulation.
    """

    def __init__(self, indices: torch.Tensor, epoch: int, seed: int, device: torch.device):
        self.generators = [torch.Generator().manual_seed(hash((seed, epoch, int(i))) % 2**63) for i in indices]
        self.device = device

    def draw(self, fn) -> torch.Tensor:
        """`fn(generator)` for every sample, stacked along a new first dimension."""
        return torch.stack([fn(generator) for generator in self.generators]).to(self.device)


def _encode(pipe, pixel_values: torch.Tensor, random: PerSampleRandom) -> torch.Tensor:
    """Clean samples x0 of the diffusion: scaled VAE latents (matching `PiscesPipeline.decode_latents`), or pixels."""
    if pipe.vae is None:
        return pixel_values
    latent_dist = pipe.vae.encode(pixel_values.to(pipe.vae.dtype)).latent_dist
    eps = random.draw(lambda g: torch.randn(latent_dist.mean.shape[1:], generator=g)).to(latent_dist.mean.dtype)
    return (latent_dist.mean + latent_dist.std * eps) * pipe.vae.config.scaling_factor


def train_decoder(
    pipe,
    rows,
    max_steps: int = 1000,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    gradient_accumulation_steps: int = 1,
    condition_dropout: float = 0.1,
    ema_decay: float | None = None,
    mixed_precision: str = "no",
    seed: int = 0,
    logging_steps: int = 10,
    image_column: str = "image",
    num_workers: int = 0,
    output_dir: str | None = None,
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    resume_from_checkpoint: bool | str | None = None,
) -> list[float]:
    """
    Trains `pipe.decoder` in place to reconstruct images from `pipe.model`'s frozen generation-encoder vectors.

    Args:
        pipe ([`PiscesPipeline`]): model (only its gen encoder runs), processor, decoder, scheduler and VAE.
        rows: image rows: a `datasets.Dataset`, `load_image_folder(...)`, a list of dicts; or a stream
            (`pisces.training.streaming_rows(...)`: WebDataset shards, a `datasets.IterableDataset`), which each
            process reads its own part of, repeated as needed, and which a resumed run skips the consumed samples of
            (`global_step * batch_size * gradient_accumulation_steps` per process).
        max_steps: optimizer steps.
        batch_size: images per process and micro-batch.
        learning_rate: AdamW learning rate (constant after a warm-up of 5% of the steps).
        gradient_accumulation_steps: micro-batches per optimizer step.
        condition_dropout: probability of replacing a sample's vectors by zeros, the pipeline's unconditional branch
            (`decoder_guidance_scale`).
        ema_decay: keep an exponential moving average of the weights (e.g. 0.9999) and put it in the decoder at the end.
        mixed_precision: `"no"`, `"fp16"` or `"bf16"` (accelerate's autocast; the weights stay in float32).
        seed: seeds the noise, the timesteps and the data order.
        logging_steps: print the mean loss every this many steps (main process).
        image_column: the key of the image in each row.
        num_workers: dataloader workers.
        output_dir: the folder of the checkpoints, `output_dir/checkpoint-<step>`.
        save_steps: write a checkpoint every this many optimizer steps, and at the last one (needs `output_dir`).
        save_total_limit: keep only this many checkpoints (the newest; default: all).
        resume_from_checkpoint: `True` to continue from the last complete checkpoint in `output_dir`, or a checkpoint
            folder. The run must have the same data, batch size, accumulation, processes, seed and EMA setting;
            `max_steps` may grow.

    Returns:
        The loss of every optimizer step (averaged over its micro-batches and, with several processes, over them),
        from the first step of the run, also when it resumed.
    """
    if not 0.0 <= condition_dropout < 1.0:
        raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}.")
    if save_steps is not None and save_steps < 1:
        raise ValueError(f"save_steps must be at least 1, got {save_steps}.")
    if (save_steps or resume_from_checkpoint is True) and output_dir is None:
        raise ValueError("Checkpoints need a folder: pass output_dir with save_steps or resume_from_checkpoint=True.")
    checkpoint = _checkpoint_to_resume(output_dir, resume_from_checkpoint)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    set_seed(seed)
    device = accelerator.device
    model, vae, decoder = pipe.model, pipe.vae, pipe.decoder
    # Only the decoder trains; the gen encoder and the VAE are fixed feature extractors.
    model.requires_grad_(False).eval().to(device)
    if vae is not None:
        vae.requires_grad_(False).eval().to(device)
    decoder.requires_grad_(True).train()

    flow = is_flow_matching(pipe.scheduler)
    noise_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config) if flow else DDPMScheduler.from_config(
        pipe.scheduler.config
    )
    prediction_type = None if flow else noise_scheduler.config.prediction_type
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    streaming = is_stream(rows)
    # The data order: drawn from this generator at the start of each epoch, so its state there is the epoch's order.
    order_generator = torch.Generator().manual_seed(seed)
    if streaming:
        # Each process reads its own part of the stream (see `pisces.training.streaming`), so the loader is not
        # handed to accelerate, which would have one process read for all or every process read everything.
        dataset = StreamingDecoderImages(rows, pipe, image_column, batch_size=batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    else:
        dataset = DecoderImages(rows, pipe, image_column)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
            num_workers=num_workers, generator=order_generator,
        )
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=1e-2)
    warmup = max(1, max_steps // 20)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    if streaming:
        decoder, optimizer, lr_scheduler = accelerator.prepare(decoder, optimizer, lr_scheduler)
    else:
        decoder, optimizer, loader, lr_scheduler = accelerator.prepare(decoder, optimizer, loader, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(decoder).parameters(), decay=ema_decay) if ema_decay else None
    if ema is not None:
        ema.to(device)

    # What a checkpoint must match to continue this run (the data position depends on all of it).
    run_settings = {
        "rows": "stream" if streaming else len(dataset),
        "num_workers": num_workers if streaming else None,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "seed": seed,
        "ema": ema is not None,
    }
    losses, pending, step = [], [], 0
    start_epoch, start_batch = 0, 0
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, run_settings, accelerator, decoder, optimizer, lr_scheduler, ema)
        losses, step = state["losses"], state["global_step"]
        start_epoch, start_batch = state["epoch"], state["batches_in_epoch"]
        order_generator.set_state(state["order_generator"])
        dataset.skipped = state["skipped_rows"]
        if streaming:
            # A stream cannot seek: skip, without decoding them, the samples this process consumed.
            dataset.resume(step * gradient_accumulation_steps * batch_size, batch_size)
            start_epoch, start_batch = 0, 0
        if accelerator.is_main_process:
            print(f"decoder: resuming from {checkpoint} at step {step}", flush=True)
    # A stream repeats by itself: one pass of the loop, until max_steps.
    epochs = 1 if streaming else math.ceil(max_steps * gradient_accumulation_steps / max(1, len(loader)))
    for epoch in range(start_epoch, epochs):
        if step >= max_steps:
            break
        epoch_order = order_generator.get_state()
        first_batch = start_batch if epoch == start_epoch else 0
        # A resumed epoch draws the same order and skips what the run had done of it (without loading those images).
        epoch_loader = accelerator.skip_first_batches(loader, first_batch) if first_batch else loader
        for batch_index, batch in enumerate(epoch_loader, start=first_batch):
            with accelerator.accumulate(decoder):
                random = PerSampleRandom(batch["index"], epoch, seed, device)
                with torch.no_grad():
                    gen_pixel_values = batch["gen_pixel_values"].to(device, model.dtype)
                    embeds = model.model.get_gen_image_features(gen_pixel_values).pooler_output
                    x0 = _encode(pipe, batch["pixel_values"].to(device), random).float()
                unwrapped = accelerator.unwrap_model(decoder)
                embeds = embeds.to(unwrapped.dtype)
                if condition_dropout > 0:
                    keep = random.draw(lambda g: torch.rand((), generator=g)) >= condition_dropout
                    embeds = embeds * keep.view(-1, 1, 1)
                noise = random.draw(lambda g: torch.randn(x0.shape[1:], generator=g))
                if flow:
                    # Flow matching: x_t = (1 - sigma) x0 + sigma noise, and the decoder predicts the velocity;
                    # sigma is logit-normal (SD3's sampling).
                    u = torch.sigmoid(random.draw(lambda g: torch.randn((), generator=g))).cpu()
                    indices = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
                    timesteps = noise_scheduler.timesteps[indices].to(device)
                    sigmas = noise_scheduler.sigmas[indices].to(device, x0.dtype).view(-1, 1, 1, 1)
                    noisy = (1.0 - sigmas) * x0 + sigmas * noise
                    target = noise - x0
                else:
                    timesteps = random.draw(lambda g: torch.randint(0, num_train_timesteps, (), generator=g))
                    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
                    if prediction_type == "epsilon":
                        target = noise
                    elif prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(x0, noise, timesteps)
                    elif prediction_type == "sample":
                        target = x0
                    else:
                        raise ValueError(f"Unsupported prediction_type {prediction_type!r} of the scheduler.")
                with accelerator.autocast():
                    conditioning = decoder_conditioning(unwrapped, embeds)
                    sample = decoder_input(unwrapped, noisy, embeds)
                    prediction = decoder(sample, timesteps, **conditioning, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(decoder.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            pending.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(accelerator.unwrap_model(decoder).parameters())
            step_loss = accelerator.reduce(torch.stack(pending).mean(), reduction="mean")
            losses.append(float(step_loss))
            pending = []
            step += 1
            if accelerator.is_main_process and (step % logging_steps == 0 or step == max_steps):
                recent = losses[-logging_steps:]
                print(f"decoder step {step}/{max_steps}: loss {sum(recent) / len(recent):.4f}", flush=True)
            if save_steps and (step % save_steps == 0 or step == max_steps):
                state = {
                    "global_step": step,
                    "epoch": epoch,
                    "batches_in_epoch": batch_index + 1,
                    "losses": losses,
                    "skipped_rows": dataset.skipped,
                    "run": run_settings,
                }
                _save_checkpoint(
                    Path(output_dir), state, epoch_order, accelerator, decoder, optimizer, lr_scheduler, ema,
                    save_total_limit,
                )
            if step >= max_steps:
                break

    accelerator.wait_for_everyone()
    decoder = accelerator.unwrap_model(decoder)
    if ema is not None:
        ema.copy_to(decoder.parameters())
    decoder.eval()
    pipe.decoder = decoder
    if dataset.skipped:
        logger.warning(f"Skipped {dataset.skipped} bad image rows.")
    return losses


def _checkpoint_to_resume(output_dir, resume_from_checkpoint) -> Path | None:
    """The checkpoint folder that `resume_from_checkpoint` names (see `train_decoder`), checked to be complete."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        last = last_complete_checkpoint(output_dir)
        if last is None:
            found = ", ".join(path.name for path in checkpoint_folders(output_dir))
            incomplete = f" (only incomplete ones: {found})" if found else ""
            raise ValueError(f"No complete {CHECKPOINT_PREFIX}-* folder in {output_dir} to resume from{incomplete}.")
        return last
    folder = Path(resume_from_checkpoint)
    reason = incomplete_reason(folder)
    if reason is None and not (folder / TRAINING_STATE_FILE).is_file():
        reason = f"it has no {TRAINING_STATE_FILE} (it is not a decoder training checkpoint)"
    if reason is not None:
        raise ValueError(f"Cannot resume from {folder}: {reason}, so it is not a complete checkpoint.")
    return folder


def _save_checkpoint(
    output_dir: Path, state: dict, epoch_order, accelerator, decoder, optimizer, lr_scheduler, ema, save_total_limit
) -> None:
    """Writes `output_dir/checkpoint-<step>` whole (staged, then renamed), then rotates; the main process writes."""
    if accelerator.is_main_process:
        remove_leftovers(output_dir)  # of a save that a kill interrupted
        final = output_dir / f"{CHECKPOINT_PREFIX}-{state['global_step']}"
        staged = staging_folder(output_dir, state["global_step"])
        staged.mkdir(parents=True)
        accelerator.unwrap_model(decoder).save_pretrained(staged / DECODER_FOLDER)
        training_state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
            "order_generator": epoch_order,
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(training_state, staged / TRAINING_STATE_FILE)
        (staged / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: the Trainer's completion mark
        publish_checkpoint(staged, final)
        rotate_checkpoints(checkpoint_folders(output_dir), save_total_limit, protected=(final,))
    accelerator.wait_for_everyone()


def _load_checkpoint(folder: Path, run_settings: dict, accelerator, decoder, optimizer, lr_scheduler, ema) -> dict:
    """Restores a checkpoint of `_save_checkpoint` into the prepared objects; returns its state and data order."""
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    saved = state.get("run", {})
    changed = [f"{name} {saved.get(name)} -> {new}" for name, new in run_settings.items() if saved.get(name) != new]
    if changed:
        raise ValueError(
            f"Cannot resume from {folder}: the run differs from the one that wrote it ({', '.join(changed)}); resume "
            "with the same data and settings, or start a new run in a new folder."
        )
    weights = {}
    for file in sorted((folder / DECODER_FOLDER).glob("*.safetensors")):  # one file, or the shards of a large model
        weights.update(load_file(file))
    accelerator.unwrap_model(decoder).load_state_dict(weights)
    # Tensors and plain values only: never unpickle code.
    training_state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(training_state["ema"])
        ema.to(accelerator.device)
    if accelerator.scaler is not None and training_state["scaler"] is not None:
        accelerator.scaler.load_state_dict(training_state["scaler"])
    torch.set_rng_state(training_state["cpu_rng"])
    if training_state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(training_state["cuda_rng"])
    state["order_generator"] = training_state["order_generator"]
    return state


@torch.no_grad()
def reconstruction_error(pipe, images, num_inference_steps: int = 20, seed: int = 0) -> float:
    """
    Mean squared error between images and the pipeline's reconstructions of them (the decoder sampling from the gen
    encoder's vectors of each image, `pipe(image=...)`), in the decoder's own space: against the VAE's encoding (the
    mean of its latent distribution, scaled) when the pipeline has a VAE, so that the VAE's own error does not count,
    and against the pixels in [-1, 1] otherwise.
    """
    size = pipe.default_sample_size * pipe.vae_scale_factor
    images = [to_rgb_image(image, index) for index, image in enumerate(images)]
    generator = torch.Generator().manual_seed(seed)
    output = pipe(image=images, num_inference_steps=num_inference_steps, generator=generator, output_type="latent")
    reconstructed = output.images.float().cpu()
    pixels = pipe.image_processor.preprocess(images, height=size, width=size)
    if pipe.vae is None:
        reference = pixels
    else:
        latent_dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        reference = latent_dist.mean * pipe.vae.config.scaling_factor
    return float(F.mse_loss(reconstructed, reference.float().cpu()))


__all__ = ["DecoderImages", "is_flow_matching", "reconstruction_error", "train_decoder"]
