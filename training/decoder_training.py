"""Training the diffusion decoder: reconstruct images from the frozen generation encoder's pooled vectors.

The decoder is an autoencoder's second half (DESIGN.md section 1): image -> frozen gen encoder -> m pooled vectors ->
denoiser -> image. It never sees the LLM, so it trains on images alone. The loss follows the pipeline's scheduler:
epsilon or v-prediction (or sample) for DDPM-family schedulers, velocity `noise - x0` for flow matching; in the VAE's
latents when the pipeline has a VAE, in pixels otherwise. Built on accelerate (so it runs unchanged under
`accelerate launch`) and diffusers' training utilities (`EMAModel`).
"""

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from transformers.utils import logging

from pisces.pipelines import decoder_conditioning, decoder_input
from pisces.processing.processing_pisces import to_rgb_image

from .data import load_row_image


logger = logging.get_logger(__name__)


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
) -> list[float]:
    """
    Trains `pipe.decoder` in place to reconstruct images from `pipe.model`'s frozen generation-encoder vectors.

    Args:
        pipe ([`PiscesPipeline`]): model (only its gen encoder runs), processor, decoder, scheduler and VAE.
        rows: image rows: a `datasets.Dataset`, `load_image_folder(...)`, a list of dicts.
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

    Returns:
        The loss of every optimizer step (averaged over its micro-batches and, with several processes, over them).
    """
    if not 0.0 <= condition_dropout < 1.0:
        raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}.")
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

    dataset = DecoderImages(rows, pipe, image_column)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=1e-2)
    warmup = max(1, max_steps // 20)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    decoder, optimizer, loader, lr_scheduler = accelerator.prepare(decoder, optimizer, loader, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(decoder).parameters(), decay=ema_decay) if ema_decay else None
    if ema is not None:
        ema.to(device)

    losses, pending, step = [], [], 0
    epochs = math.ceil(max_steps * gradient_accumulation_steps / max(1, len(loader)))
    for epoch in range(epochs):
        for batch in loader:
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
            if step >= max_steps:
                break
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
