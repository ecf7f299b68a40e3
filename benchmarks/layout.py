"""
Start a worker at one of several memory layouts.

    python benchmarks/layout.py LAYOUT worker.py ARGUMENTS...

How fast the same Python code runs depends on where its objects land in
memory. CPython's type attribute cache, for one, has 4,096 entries indexed by
a type's version tag and the address of the attribute's name: a guard that
imports a few modules more moves every later address and tag, so that some of
SQLAlchemy's own lookups collide in the cache where they did not before, or
the other way round. Under callgrind, where nothing else varies, that alone
moves the baseline's instructions per W1 operation by about 3 %, more than
the listeners' own share; in a timed run, where a worker process keeps its
layout for the whole run, it is a bias of that worker that no number of
rounds averages out.

So before anything else is imported, this allocates objects and types whose
number and sizes follow from LAYOUT (the same LAYOUT, the same layout: a
callgrind count stays reproducible), then runs the worker script as
``__main__``. Layout 0 allocates nothing. run.py measures each configuration
at several layouts and reports the median (``--layouts``).
"""

from __future__ import annotations

import runpy
import sys

_kept: list[object] = []


def shift(layout: int) -> None:
    """Allocate what *layout* asks for and keep it for the life of the process."""
    if layout == 0:
        return
    # A small linear congruential generator: no import, and reproducible.
    state = layout * 2_654_435_761 % 2**32

    def draw(bound: int) -> int:
        nonlocal state
        state = (1_103_515_245 * state + 12_345) % 2**31
        return state % bound

    for index in range(draw(400)):
        # Interned names move the addresses of the names imported later.
        _kept.append(sys.intern(f"_layout_{layout}_{index}_" + "x" * draw(40)))
    for index in range(draw(200)):
        # A type takes a version tag at its first attribute lookup.
        padding = type(f"_Layout{index}", (), {})
        getattr(padding, "__doc__", None)
        _kept.append(padding)
    _kept.append(bytearray(draw(1 << 16)))
    _kept.extend(object() for _ in range(draw(3_000)))


def main() -> None:
    layout, script, *arguments = sys.argv[1:]
    shift(int(layout))
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
