"""Runs a script unmodified as __main__ and writes the time of each tick of its progress bar (one
training step, or one sampling batch) to a file: the clock vs_released.py reads, the same for the
released scripts and ours.

    python benchmarks/step_clock.py TICKS_FILE TOTAL path/to/train.py --flag ...
    torchrun --standalone --nproc_per_node 8 benchmarks/step_clock.py TICKS_FILE TOTAL path/to/generate.py ...

The bar timed is the first one created with `total` TOTAL: train.py's step bar (total: the steps
to run) or generate.py's batch loop (total: this process's batches), in both repositories, which
both create it before their first step; later bars, such as those torch.compile shows while it
builds kernels during the first step, are left out. TICKS_FILE gets one
time.perf_counter() value in seconds per line, flushed as it happens, from the main process only
(RANK 0 or unset). A tick is a `tqdm.update` call (a step has ended) or, for a loop over a tqdm,
the start of each iteration and the end of the loop: the time between two ticks is one step of
the script, whatever it does in it. The script runs with its own folder as sys.path[0], as
`python script.py` would.
"""
import os
import runpy
import sys
import time
from pathlib import Path

import tqdm.std


class TickLog:
    """Appends a line per tick of the first bar created with `total` items; other bars are ignored."""

    def __init__(self, path, total):
        self.file = open(path, "w") if os.environ.get("RANK", "0") == "0" else None  # open for the whole run
        self.total, self.bar = total, None

    def created(self, bar):
        if self.bar is None and bar.total == self.total:
            self.bar = bar

    def __call__(self, bar):
        if self.file is not None and bar is self.bar:
            self.file.write(f"{time.perf_counter():.6f}\n")
            self.file.flush()


def install(ticks):
    """Wraps tqdm's constructor, update and iteration (tqdm.auto's and tqdm's bars are both tqdm.std.tqdm) so that
    `ticks` sees every bar created and every tick."""
    init, update, iterate = tqdm.std.tqdm.__init__, tqdm.std.tqdm.update, tqdm.std.tqdm.__iter__

    def recorded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        ticks.created(self)
    iterating = set()  # bars inside __iter__, which calls update itself to redraw

    def ticking_update(self, n=1):
        if id(self) not in iterating:
            ticks(self)
        return update(self, n)

    def ticking_iter(self):
        iterating.add(id(self))
        try:
            for item in iterate(self):
                ticks(self)
                yield item
            ticks(self)  # the end of the last iteration
        finally:
            iterating.discard(id(self))

    tqdm.std.tqdm.__init__, tqdm.std.tqdm.update, tqdm.std.tqdm.__iter__ = recorded_init, ticking_update, ticking_iter


def main():
    if len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} TICKS_FILE TOTAL SCRIPT [ARGS...]")
    ticks_file, total, script = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).resolve()
    install(TickLog(ticks_file, total))
    sys.argv = [str(script), *sys.argv[4:]]
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
