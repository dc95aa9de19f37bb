"""Progress bars from tqdm: redrawn in place on a terminal; where the output is not one (a Ray job's
log, CI, a file) a plain line every LINE_EVERY_S seconds and at the end, with no control characters.

    with bar(total=len(specs), desc="shards", unit="shard") as progress:
        progress.update(1)
        progress.set_postfix_str("451 img/s")
"""
import sys

from tqdm import tqdm

LINE_EVERY_S = 10.0


class _Lines:
    """A file for tqdm whose every refresh becomes a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def bar(total=None, desc=None, unit="it", stream=None, leave=True, **kwargs) -> tqdm:
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True, **kwargs)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=LINE_EVERY_S,
                maxinterval=LINE_EVERY_S, ncols=80, ascii=True, **kwargs)
