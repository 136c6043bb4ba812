"""Python's cyclic garbage collector and the half-million objects torch, diffusers and transformers
make when they import.

Each full collection walks every tracked object. During the imports the heap keeps growing, so the
collector runs full passes over it again and again, and at exit the interpreter runs one more over
everything: about a second each on a CPU machine, for memory the process gives back anyway. The
imports leave little cyclic garbage, so the collector pauses while they run, makes one pass at the
end for what garbage there is, and moves the rest out of its reach (`gc.freeze`): later passes walk
only what the command itself allocates.
"""
from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def libraries_loading() -> Iterator[None]:
    """Around a command's first import of the ML libraries. Once per process: when diffusers is
    already imported (a second training in the same process, the tests) it leaves the collector be,
    so that no later garbage is frozen with the libraries."""
    if "diffusers" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        gc.enable()


def exit_without_final_collection(code: int) -> None:
    """sys.exit(code), the interpreter's last full collection over the libraries' objects skipped."""
    gc.freeze()
    sys.exit(code)
