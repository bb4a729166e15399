"""Training Pisces' LLM side with the stock `transformers.Trainer`.

`PiscesForConditionalGeneration` returns `loss = lm_loss + lambda * gen_loss`, so the stock `Trainer` trains it as is
(with `remove_unused_columns=False`, since the collator needs the raw samples). `PiscesTrainer` is that Trainer plus
three things a long multimodal run needs in its log: `lm_loss` and `gen_loss` separately (averaged over the logging
interval and over processes) and the number of bad data rows skipped. Under DDP it expects parameters without a
gradient (a batch that holds one direction only leaves the other direction's projector and head out).

Its checkpoints appear whole or not at all (`pisces.training.checkpoints`): each `checkpoint-<step>` is written into
`tmp-checkpoint-<step>/` and renamed into place when complete, rotation (`save_total_limit`) deletes only after that,
and `train(resume_from_checkpoint=True)` resumes from the last complete checkpoint, so a run killed at any moment,
even in the middle of a save, resumes with the losses of an uninterrupted run.
"""

from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import sort_checkpoints
from transformers.utils import logging

from .checkpoints import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    checkpoint_folders,
    checkpoint_step,
    incomplete_reason,
    last_complete_checkpoint,
    publish_checkpoint,
    remove_leftovers,
    rotate_checkpoints,
    staging_folder,
)
from .data import SKIPPED_ROWS_KEY, PiscesCollator, PiscesTrainingDataset
from .stages import apply_stage
from .streaming import StreamingTrainingDataset


logger = logging.get_logger(__name__)


class PiscesTrainer(Trainer):
    """
    `transformers.Trainer` for `PiscesForConditionalGeneration` (or a PEFT model around it) that logs `lm_loss`,
    `gen_loss` and `skipped_rows` beside `loss`. Takes the arguments of `Trainer`.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *more, **kwargs):
        if args is not None and args.ddp_find_unused_parameters is None and not _reentrant_checkpointing(args):
            # A batch may hold one direction only (all captions, or all generation samples): the projector and head
            # of the other direction then get no gradient, which DDP must be told to expect. The stock Trainer turns
            # this off under activation checkpointing, which only the reentrant variant needs.
            args.ddp_find_unused_parameters = True
        super().__init__(model, args, *more, **kwargs)
        # The model's forward takes **kwargs (for the language model), which makes the Trainer believe it normalizes its
        # loss by `num_items_in_batch` itself; it does not (per-batch means), so let the Trainer scale for gradient
        # accumulation and processes the usual way.
        self.model_accepts_loss_kwargs = False
        if self.args.remove_unused_columns:
            # The collator reads the raw samples (images, texts); the Trainer must not strip them.
            self.args.remove_unused_columns = False
        self._metric_sums = None
        self._staging_run_dir = None

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """
        A stream (`StreamingTrainingDataset`) gets a plain `DataLoader`, not one prepared by accelerate: the stream
        already reads this process's own shards, where accelerate would read batches on the main process and dispatch
        them (which needs equal-length batches) or keep only every world-size-th batch of each process's stream.
        """
        if not isinstance(self.train_dataset, StreamingTrainingDataset):
            return super().get_train_dataloader()
        return torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """
        `Trainer.train`; `resume_from_checkpoint=True` resumes from the last complete `checkpoint-<step>` of
        `args.output_dir` (one that a killed save left half-written is skipped), and a folder that is not a complete
        checkpoint is refused.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.last_complete_checkpoint()
        elif resume_from_checkpoint not in (None, False):
            reason = incomplete_reason(resume_from_checkpoint)
            if reason is not None:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {reason}, so it is not a complete checkpoint."
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def last_complete_checkpoint(self) -> str:
        """The last complete checkpoint of `args.output_dir`; a `ValueError` when there is none."""
        output_dir = self.args.output_dir
        last = last_complete_checkpoint(output_dir)
        if last is None:
            found = checkpoint_folders(output_dir)
            incomplete = f" (only incomplete ones: {', '.join(path.name for path in found)})" if found else ""
            raise ValueError(f"No complete {CHECKPOINT_PREFIX}-* folder in {output_dir} to resume from{incomplete}.")
        newer = [path for path in checkpoint_folders(output_dir) if checkpoint_step(path) > checkpoint_step(last)]
        skipped = [path.name for path in newer if incomplete_reason(path) is not None]
        if skipped:
            logger.warning(f"Skipping incomplete checkpoints {', '.join(skipped)}; resuming from {last}.")
        return str(last)

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, the Trainer writes it under the staging folder (see `_save_checkpoint`).
        if self._staging_run_dir is not None:
            return str(self._staging_run_dir)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """
        The Trainer's checkpoint, written into `tmp-checkpoint-<step>/checkpoint-<step>` and renamed to
        `checkpoint-<step>` once every process has written its part; then the rotation.
        """
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step
        final = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        staging = staging_folder(run_dir, step)
        staged = staging / final.name
        if self.args.should_save:
            remove_leftovers(run_dir)  # of a save that a kill interrupted
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees only the staging folder: it deletes nothing
        finally:
            self._staging_run_dir = None
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:
            # The Trainer named the best checkpoint where it was written; point at where it will be.
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staged / STATE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.process_index == 0:
            publish_checkpoint(staged, final)
        self.accelerator.wait_for_everyone()
        if self.args.local_process_index == 0 and staged.exists():
            publish_checkpoint(staged, final)  # node-local filesystems: every node publishes its own copy
        if self.args.local_process_index == 0:
            try:
                staging.rmdir()
            except OSError:
                pass  # already removed by another node's process
        if self.args.should_save:
            ordered = [Path(path) for path in sort_checkpoints(str(run_dir), use_mtime=True)]
            rotate_checkpoints(ordered, self.args.save_total_limit, protected=(final, self.state.best_model_checkpoint))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED_ROWS_KEY, None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            if self._metric_sums is None:
                # lm_loss sum, batches with lm_loss, gen_loss sum, batches with gen_loss, skipped rows.
                self._metric_sums = torch.zeros(5, device=loss.device, dtype=torch.float64)
            sums = self._metric_sums
            if outputs.get("lm_loss") is not None:
                sums[0] += outputs["lm_loss"].detach().to(sums.device, sums.dtype)
                sums[1] += 1
            if outputs.get("gen_loss") is not None:
                sums[2] += outputs["gen_loss"].detach().to(sums.device, sums.dtype)
                sums[3] += 1
            if skipped is not None:
                sums[4] += float(skipped)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training logs carry "loss"; every process reaches this point together (the Trainer gathers the loss first).
        if "loss" in logs and self._metric_sums is not None:
            sums = self.accelerator.reduce(self._metric_sums.clone(), reduction="sum")
            if sums[1] > 0:
                logs["lm_loss"] = round(float(sums[0] / sums[1]), 6)
            if sums[3] > 0:
                logs["gen_loss"] = round(float(sums[2] / sums[3]), 6)
            logs["skipped_rows"] = int(sums[4])
            self._metric_sums.zero_()
        super().log(logs, *args, **kwargs)


def _reentrant_checkpointing(args: TrainingArguments) -> bool:
    """Whether `args` asks for reentrant activation checkpointing (transformers' default is non-reentrant)."""
    for field in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):  # 5.24 name, then 5.17's
        checkpointing_kwargs = getattr(args, field, None)
        if isinstance(checkpointing_kwargs, dict) and checkpointing_kwargs.get("use_reentrant"):
            return True
    return False


def build_trainer(
    model,
    processor,
    rows,
    args: TrainingArguments,
    stage: str | None = "pretrain",
    trainable: list[str] | None = None,
    generation_ratio: float = 0.5,
    caption_dropout: float = 0.1,
    caption_prompt: str | None = None,
    data_seed: int = 0,
    callbacks=None,
    **dataset_kwargs,
) -> PiscesTrainer:
    """
    A `PiscesTrainer` over image-caption rows, with the parameters of `stage` trainable.

    Args:
        model: a `PiscesForConditionalGeneration`, or a PEFT model around one (then pass `stage=None`).
        processor: its `PiscesProcessor`.
        rows: image-text rows (see `PiscesTrainingDataset`): a `datasets.Dataset`, `load_image_folder(...)`, a list.
        args: the `TrainingArguments`.
        stage: a stage preset (`pisces.training.stages`), or None to keep the model's `requires_grad` as they are.
        trainable: module name patterns, for `stage="custom"`.
        generation_ratio, caption_dropout, data_seed: see `PiscesTrainingDataset`.
        caption_prompt: the instruction of caption samples (default `DEFAULT_CAPTION_PROMPT`).
        callbacks: `TrainerCallback`s.
        dataset_kwargs: column names for `PiscesTrainingDataset`.
    """
    if stage is not None:
        apply_stage(model, stage, trainable)
    collator_kwargs = {} if caption_prompt is None else {"caption_prompt": caption_prompt}
    collator = PiscesCollator(processor, **collator_kwargs)
    # A row too long for the model is replaced by the next one that fits, and counted with the bad rows.
    dataset = PiscesTrainingDataset(
        rows, generation_ratio=generation_ratio, caption_dropout=caption_dropout, seed=data_seed,
        fits=collator.fits, **dataset_kwargs
    )
    return PiscesTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )


__all__ = ["PiscesTrainer", "build_trainer"]
