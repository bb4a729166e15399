"""Progress over the items a command produces (images, evaluated prompts).

On a terminal a tqdm bar (on stderr); otherwise, in a log or a pipe, one plain line per finished item, since a bar
redrawn with carriage returns is unreadable there.
"""

import sys


class ItemProgress:
    """
    Reports finished items: `done(message)` after each one. With more than one item, the message carries the count
    (`wrote a-3.png (4/10)`) in plain mode; on a terminal it is printed above the bar.

    Args:
        total: the number of items this run produces.
        unit: what an item is, for the bar (`"image"`).
        terminal: whether stderr is a terminal; detected when not given.
    """

    def __init__(self, total: int, unit: str = "item", terminal: bool | None = None):
        self.total = total
        self.count = 0
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None
        if self.terminal and total > 1:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def done(self, message: str) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
            self._bar.update()
        elif self.total > 1:
            print(f"{message} ({self.count}/{self.total})", flush=True)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "ItemProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
