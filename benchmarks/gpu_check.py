"""The checks that need an accelerator, in one script: a list of named checks, one JSON file, one printed table.

Each check builds what it needs from a Pisces pipeline folder (by default the reference model that ships inside the
package; `--model DIR` for another), runs on the device, compares with a plain run on the same device and returns its
measurements; a failed comparison raises. `--tiny` runs the same code on the CPU with a tiny random checkpoint, and
skips, saying why, the checks that need CUDA.

Run: `python benchmarks/gpu_check.py [--model DIR] [--steps 4] [--out gpu_check.json] [--only NAME ...] [--tiny]`.
The exit status is 1 when a check failed.

Adding a check: write `def check_something(context) -> dict` (raise `CheckFailed` with the reason when it fails;
return the numbers worth keeping) and decorate it with `@check("something", needs_cuda=...)`.
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


PROMPT = "a red circle above a blue square"
# The images are in [0, 1]; offloading moves weights, not arithmetic, so the same device gives the same image.
SAME_IMAGE_ATOL = 1e-3
# Lower precision changes the arithmetic: a loose bound that still catches a broken cast (NaNs, noise, black images).
LOW_PRECISION_ATOL = 0.1


class CheckFailed(AssertionError):
    """A check ran and its result is wrong."""


@dataclass
class Check:
    name: str
    run: Callable[["Context"], dict]
    needs_cuda: bool = False
    description: str = ""


CHECKS: list[Check] = []


def check(name: str, needs_cuda: bool = False):
    """Registers a check under `name`; its docstring's first line is its description."""

    def register(run):
        CHECKS.append(Check(name, run, needs_cuda, (run.__doc__ or "").strip().splitlines()[0]))
        return run

    return register


@dataclass
class Context:
    """What every check shares: the checkpoint, the device, the denoising steps, and the plain run's image."""

    checkpoint: Path
    device: torch.device
    steps: int
    _reference: np.ndarray | None = field(default=None, repr=False)

    def load(self, **kwargs):
        from pisces import PiscesPipeline

        pipe = PiscesPipeline.from_pretrained(self.checkpoint, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def draw(self, pipe, **kwargs) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)  # the same noise on every device
        return pipe(PROMPT, num_inference_steps=self.steps, generator=generator, output_type="np", **kwargs).images

    def reference(self) -> np.ndarray:
        """The image of a plain float32 pipeline moved to the device, computed once."""
        if self._reference is None:
            self._reference = self.draw(self.load().to(self.device))
        return self._reference

    def compare(self, images: np.ndarray, atol: float = SAME_IMAGE_ATOL) -> dict:
        if not np.isfinite(images).all():
            raise CheckFailed("the image has non-finite values")
        difference = float(np.abs(images - self.reference()).max())
        if difference > atol:
            raise CheckFailed(f"max abs difference {difference:.2e} from the plain run exceeds {atol:g}")
        return {"max_abs_diff": difference}


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def module_devices(pipe) -> dict[str, str]:
    return {name: str(getattr(component, "device", "?")) for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module)}


# ---- the checks ----


@check("pipeline on device")
def check_pipeline_on_device(context: Context) -> dict:
    """pipe.to(device) draws a finite image, and the same image twice."""
    pipe = context.load().to(context.device)
    first, second = context.draw(pipe), context.draw(pipe)
    if not np.isfinite(first).all() or not np.array_equal(first, second):
        raise CheckFailed("the image is not finite, or not the same twice with the same seed")
    return {"devices": module_devices(pipe)}


@check("bfloat16")
def check_bfloat16(context: Context) -> dict:
    """A bfloat16 pipeline on the device draws close to the float32 one."""
    pipe = context.load(dtype=torch.bfloat16).to(context.device)
    return context.compare(context.draw(pipe), atol=LOW_PRECISION_ATOL)


@check("model cpu offload", needs_cuda=True)
def check_model_cpu_offload(context: Context) -> dict:
    """enable_model_cpu_offload: the same image, twice; every model back on the CPU with its CpuOffload hook."""
    import accelerate

    pipe = context.load()
    pipe.enable_model_cpu_offload(device=context.device)
    if pipe._execution_device.type != context.device.type:
        raise CheckFailed(f"execution device {pipe._execution_device}, expected {context.device}")
    result = context.compare(context.draw(pipe))
    result["second_run"] = context.compare(context.draw(pipe))["max_abs_diff"]
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    not_offloaded = [k for k, v in models.items() if v.device.type != "cpu"]
    wrong_hook = [k for k, v in models.items() if not isinstance(getattr(v, "_hf_hook", None), accelerate.hooks.CpuOffload)]
    if not_offloaded or wrong_hook:
        raise CheckFailed(f"not offloaded: {not_offloaded}; without a CpuOffload hook: {wrong_hook}")
    return result


@check("sequential cpu offload", needs_cuda=True)
def check_sequential_cpu_offload(context: Context) -> dict:
    """enable_sequential_cpu_offload: the same image; every model's weights on the meta device, behind hooks."""
    pipe = context.load()
    pipe.enable_sequential_cpu_offload(device=context.device)
    if pipe._execution_device.type != context.device.type:
        raise CheckFailed(f"execution device {pipe._execution_device}, expected {context.device}")
    result = context.compare(context.draw(pipe))
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    not_offloaded = [k for k, v in models.items() if v.device.type != "meta" or not hasattr(v, "_hf_hook")]
    if not_offloaded:
        raise CheckFailed(f"not offloaded to meta behind a hook: {not_offloaded}")
    return result


def _group_offload(context: Context, **options) -> dict:
    pipe = context.load()
    pipe.enable_group_offload(onload_device=context.device, offload_device=torch.device("cpu"), **options)
    result = context.compare(context.draw(pipe))
    result["second_run"] = context.compare(context.draw(pipe))["max_abs_diff"]
    # Between calls the weights are back on the CPU.
    on_device = [k for k, v in pipe.components.items()
                 if isinstance(v, torch.nn.Module) and next(v.parameters()).device.type != "cpu"]
    if on_device:
        raise CheckFailed(f"weights left on the device after the call: {on_device}")
    return result


@check("group offload, block level", needs_cuda=True)
def check_group_offload_block_level(context: Context) -> dict:
    """Pipeline-level group offloading by blocks (one per group): the same image; weights back on the CPU after."""
    return _group_offload(context, offload_type="block_level", num_blocks_per_group=1)


@check("group offload, leaf level", needs_cuda=True)
def check_group_offload_leaf_level(context: Context) -> dict:
    """Pipeline-level group offloading by leaf modules: the same image; weights back on the CPU after."""
    return _group_offload(context, offload_type="leaf_level")


@check("group offload, leaf level with streams", needs_cuda=True)
def check_group_offload_leaf_level_streams(context: Context) -> dict:
    """Leaf-level group offloading with a CUDA stream prefetching the next layer: the same image."""
    return _group_offload(context, offload_type="leaf_level", use_stream=True)


# ---- running them ----


def run_checks(context: Context, checks: list[Check]) -> list[dict]:
    results = []
    for item in checks:
        row = {"name": item.name, "description": item.description, "needs_cuda": item.needs_cuda}
        if item.needs_cuda and context.device.type != "cuda":
            row.update(status="skipped", reason="needs CUDA; none here")
            results.append(row)
            continue
        if context.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(context.device)
        start = time.perf_counter()
        try:
            row.update(status="passed", measurements=item.run(context))
        except CheckFailed as error:
            row.update(status="failed", reason=str(error))
        except Exception as error:  # a crash is a failed check too; the others still run
            row.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        row["seconds"] = round(time.perf_counter() - start, 3)
        row["peak_memory_mib"] = peak_memory_mib(context.device)
        results.append(row)
    return results


def print_table(results: list[dict]) -> None:
    width = max(len(row["name"]) for row in results)
    print(f"{'check':<{width}}  {'status':<8}  {'seconds':>8}  {'peak MiB':>8}  detail")
    for row in results:
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        memory = f"{row['peak_memory_mib']:.0f}" if row.get("peak_memory_mib") is not None else ""
        detail = row.get("reason") or ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("measurements", {}).items()
        )
        print(f"{row['name']:<{width}}  {row['status']:<8}  {seconds:>8}  {memory:>8}  {detail}")


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Pisces pipeline folder (default: the shipped reference model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint on the CPU (CUDA checks skipped)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 4, 2 with --tiny)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    parser.add_argument("--out", default="gpu_check.json", help="where the results are written as JSON")
    args = parser.parse_args(argv)
    names = [item.name for item in CHECKS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks are: {', '.join(names)}")
    checks = [item for item in CHECKS if not args.only or item.name in args.only]

    import pisces  # noqa: F401  (registers the pipeline)

    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            from pisces.conversion import build_random_checkpoint

            checkpoint = build_random_checkpoint(Path(scratch) / "tiny", preset="tiny", seed=0)
            device = torch.device("cpu")
        else:
            if args.model is not None:
                checkpoint = Path(args.model)
            else:
                from pisces.reference_model import reference_model_path

                checkpoint = Path(reference_model_path())
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        steps = args.steps or (2 if args.tiny else 4)
        context = Context(checkpoint=checkpoint, device=device, steps=steps)
        results = run_checks(context, checks)

    report = {"environment": environment(device), "checkpoint": "tiny random" if args.tiny else str(checkpoint),
              "steps": steps, "checks": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return 1 if any(row["status"] == "failed" for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
