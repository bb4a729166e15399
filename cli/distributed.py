"""Sharing a command's items (prompts, questions) between the processes of an `accelerate launch` run.

A command that works item by item runs unchanged as one process or under `accelerate launch --num_processes N`: each
process takes its own contiguous part of the items (accelerate's `PartialState.split_between_processes`) and works on
its own device (`this_process_device()`). Items keep their index in the whole list, so whatever a process derives from
an item (a seed, a file name) does not depend on how many processes there are.

accelerate (and torch) are imported inside the functions, so that importing this module loads neither: `pisces --help`
stays light.
"""

from typing import TypeVar


Item = TypeVar("Item")


def _state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # `accelerate launch --cpu` (or ACCELERATE_USE_CPU=1) asks for CPU processes; PartialState sees several of them only
    # when told so, where the Trainer would be told by `use_cpu`.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def split_for_this_process(items: list[Item]) -> list[tuple[int, Item]]:
    """
    This process's part of `items`, as `(index in items, item)` pairs, in order. The parts of all processes are
    contiguous, together hold every item once, and differ in length by at most one; a single process gets them all.
    """
    indexed = list(enumerate(items))
    state = _state()
    if state.num_processes == 1:
        return indexed
    with state.split_between_processes(indexed) as part:
        return list(part)


def is_main_process() -> bool:
    """Whether this process is the one that prints summaries and prepares shared folders (always true alone)."""
    return _state().is_main_process


def num_processes() -> int:
    return _state().num_processes


def this_process_device():
    """The `torch.device` this process works on (its own GPU under `accelerate launch`, else the CPU or the one GPU)."""
    return _state().device


def wait_for_everyone() -> None:
    """A barrier: returns once every process has reached it (at once with a single process)."""
    _state().wait_for_everyone()
