"""PiscesPipeline's denoising loop as SDXL's: callbacks that replace tensors or change guidance mid-loop, interrupt,
custom timesteps and sigmas, `set_begin_index`, the progress bar of higher-order schedulers, and the negative prompt's
warning when guidance is off."""

import logging
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


STEPS = 2


def draw(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle")
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def record_decoder_calls(pipe) -> list[dict]:
    """What the decoder gets at each call: the batch size, the timestep and the cross-attended vectors."""
    calls = []

    def record(module, args, kwargs):
        sample, timestep = args[0], args[1]
        calls.append({"batch": sample.shape[0], "t": float(timestep), "vectors": kwargs["encoder_hidden_states"].clone()})

    pipe.decoder.register_forward_pre_hook(record, with_kwargs=True)
    return calls


# ---- callbacks ----


def test_a_callback_replacing_image_embeds_conditions_the_next_steps(pipe):
    calls = record_decoder_calls(pipe)
    replacement = {}

    def callback(pipeline, step, timestep, tensors):
        if step == 0:
            replacement["vectors"] = tensors["image_embeds"] + 1.0
            return {"image_embeds": replacement["vectors"]}
        return {}

    draw(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["image_embeds"])
    assert len(calls) == STEPS
    assert not torch.equal(calls[0]["vectors"], replacement["vectors"])
    assert torch.equal(calls[1]["vectors"], replacement["vectors"])


def test_callbacks_get_every_tensor_input_and_a_replaced_latent_is_the_result(pipe):
    def every_input(pipeline, step, timestep, tensors):
        assert sorted(tensors) == sorted(pipeline._callback_tensor_inputs)
        if step == pipeline.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    latents = draw(
        pipe, output_type="latent", callback_on_step_end=every_input,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
    )
    assert latents.abs().sum() == 0


@pytest.mark.parametrize(("start", "after_first_step", "batches"), [(3.0, 1.0, [2, 1]), (1.0, 3.0, [1, 2])])
def test_decoder_guidance_changes_mid_loop_from_a_callback(pipe, start, after_first_step, batches):
    # diffusers' CFG-cutoff pattern: the callback changes the scale and hands back the matching conditioning (the
    # vectors of one image each: the pipeline builds the guidance batch at every step).
    calls = record_decoder_calls(pipe)

    def switch(pipeline, step, timestep, tensors):
        if step == 0:
            pipeline._decoder_guidance_scale = after_first_step
        return {"image_embeds": tensors["image_embeds"]}

    images = draw(
        pipe, decoder_guidance_scale=start, callback_on_step_end=switch,
        callback_on_step_end_tensor_inputs=["image_embeds"],
    )
    assert [call["batch"] for call in calls] == batches
    assert np.isfinite(images).all()
    assert not np.array_equal(images, draw(pipe, decoder_guidance_scale=start))


class DecoderGuidanceCutoff(PipelineCallback):
    """A diffusers-style callback: turns decoder guidance off at `cutoff_step_index` (as SDCFGCutoffCallback)."""

    tensor_inputs = ["image_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            pipeline._decoder_guidance_scale = 0.0
        return callback_kwargs


def test_a_pipeline_callback_names_its_own_tensor_inputs(pipe):
    calls = record_decoder_calls(pipe)
    seen = []

    class Recorder(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return callback_kwargs

    cutoff = MultiPipelineCallbacks([DecoderGuidanceCutoff(cutoff_step_ratio=None, cutoff_step_index=0), Recorder()])
    draw(pipe, num_inference_steps=3, decoder_guidance_scale=3.0, callback_on_step_end=cutoff)
    assert [call["batch"] for call in calls] == [2, 1, 1]
    assert seen == [["image_embeds", "latents"]] * 3


def test_interrupt_skips_the_remaining_steps(pipe):
    calls = record_decoder_calls(pipe)

    def stop(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return {}

    images = draw(pipe, num_inference_steps=3, callback_on_step_end=stop)
    assert len(calls) == 1 and pipe.interrupt
    assert images.shape == (1, 32, 32, 3)


# ---- timesteps ----


def test_custom_timesteps_and_sigmas_reach_the_decoder(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = record_decoder_calls(pipe)
    draw(pipe, timesteps=[999, 500])
    assert [call["t"] for call in calls] == [999.0, 500.0] and pipe.num_timesteps == 2
    calls.clear()
    sigmas = [14.0, 3.0, 0.5]
    draw(pipe, sigmas=sigmas)
    expected = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    expected.set_timesteps(sigmas=sigmas)
    assert [call["t"] for call in calls] == expected.timesteps.tolist()
    assert pipe.num_timesteps == len(expected.timesteps)


def test_custom_timesteps_need_a_scheduler_that_takes_them(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps takes no custom `timesteps`"):
        draw(pipe, timesteps=[999, 500])
    with pytest.raises(ValueError, match="not both"):
        draw(pipe, timesteps=[999], sigmas=[1.0])


def test_the_scheduler_starts_at_index_zero(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    draw(pipe)
    assert pipe.scheduler.begin_index == 0


def test_the_progress_bar_counts_steps_of_a_higher_order_scheduler(pipe, capsys):
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = record_decoder_calls(pipe)
    pipe.set_progress_bar_config(disable=False)
    draw(pipe)
    err = capsys.readouterr().err
    # Heun takes two decoder calls per step but the last: 3 timesteps for 2 steps.
    assert len(calls) == 3 and pipe.num_timesteps == 3
    # One update per step: the bar ends full, never past its total (which tqdm shows as a bare count, "3it").
    assert f"{STEPS}/{STEPS}" in err and f"3/{STEPS}" not in err and not re.search(r"(?<![\d.])3it \[", err)


# ---- the negative prompt needs guidance on ----


def _set_default_guidance(pipe, value):
    pipe.model.generation_config.gen_guidance_scale = value


def test_a_negative_prompt_with_guidance_off_warns(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        draw(pipe, negative_prompt="a blue square", guidance_scale=1.0)
    assert "`negative_prompt` has no effect with guidance_scale 1" in caplog.text
    caplog.clear()
    _set_default_guidance(pipe, 1.0)  # the shipped reference model's default
    with caplog.at_level(logging.WARNING):
        draw(pipe, negative_prompt="a blue square")
    assert "`negative_prompt` has no effect" in caplog.text


def test_a_negative_prompt_with_guidance_on_does_not_warn(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        draw(pipe, negative_prompt="a blue square", guidance_scale=3.0)
    assert "negative_prompt" not in caplog.text


def test_guidance_scale_defaults_to_the_models_generation_config(pipe):
    _set_default_guidance(pipe, 2.5)
    draw(pipe)
    assert pipe.guidance_scale == 2.5
