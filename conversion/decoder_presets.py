"""Fresh diffusion decoders for Pisces: stock diffusers `UNet2DConditionModel`s sized by preset, and a tiny VAE.

The decoder cross-attends to the m pooled generation vectors (`encoder_hidden_states`, width = the generation
encoder's hidden size) and takes their mean as a projected class embedding (the SDXL-style pooled conditioning,
through diffusers' own `class_embed_type="projection"`). Weights start random: train them with
`pisces train-decoder`.
"""

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


# Each preset: the UNet's shape. `sample_size` is in latents (or pixels for a decoder without a VAE).
DECODER_PRESETS = {
    # Seconds to build; for tests and smoke runs.
    "tiny": {
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    # The shipped reference model's (64 px pictures of the shapes world, 4 x 16 x 16 latents); trains on a CPU in minutes.
    "reference": {
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 16,
        "norm_num_groups": 16,
    },
    # Trainable on one GPU in hours (about 100M parameters); 256 px with an 8x VAE.
    "small": {
        "sample_size": 32,
        "block_out_channels": (128, 256, 512),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": 8,
    },
    # The SDXL UNet's shape (about 2.4B parameters with this conditioning), 1024 px with an 8x VAE, as the paper-size decoder.
    "sdxl": {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
    },
}


def build_decoder(
    preset: str, cross_attention_dim: int, in_channels: int = 4, grid_conditioning: bool = False
) -> UNet2DConditionModel:
    """
    A fresh `UNet2DConditionModel` of a preset (`"tiny"`, `"small"`, `"sdxl"`).

    Args:
        preset: the size, a key of `DECODER_PRESETS`.
        cross_attention_dim: the width of the generation vectors (the gen encoder's hidden size).
        in_channels: the VAE's latent channels, or 3 for a decoder in pixel space.
        grid_conditioning: also take the vectors, laid out on their grid, as extra input channels (see
            `pisces.pipelines.decoder_input`).
    """
    if preset not in DECODER_PRESETS:
        raise ValueError(f"Unknown decoder preset {preset!r}; choose one of {', '.join(DECODER_PRESETS)}.")
    return UNet2DConditionModel(
        in_channels=in_channels + (cross_attention_dim if grid_conditioning else 0),
        out_channels=in_channels,
        cross_attention_dim=cross_attention_dim,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=cross_attention_dim,
        **DECODER_PRESETS[preset],
    )


def build_tiny_vae() -> AutoencoderKL:
    """A tiny `AutoencoderKL`: 3 x 32 x 32 pixels <-> 4 x 16 x 16 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_scheduler() -> DDIMScheduler:
    """The default sampler: DDIM over the usual 1000-step scaled-linear schedule, epsilon prediction."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )
