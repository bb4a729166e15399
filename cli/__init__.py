"""The `pisces` command line (`pisces_cli`).

A package of its own, outside `pisces`, because importing anything under `pisces` runs the package face, which loads
torch, transformers and diffusers: the command parses its arguments first and loads them only for the work it does.
Under `accelerate launch`, run it as `python -m pisces_cli ...`.
"""

from .commands import CommandError, build_parser, main


__all__ = ["CommandError", "build_parser", "main"]
