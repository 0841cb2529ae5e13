"""The binomial checkpointing schedule (Griewank and Walther's revolve) of ``Reverse(checkpoints=c)``.

A pure function of the number of steps ``T`` and of snapshots ``c``: no tensors. A run goes
from state 0 to state ``T``; step ``t`` maps state ``t`` to state ``t + 1``. The backward
pass must pull the cotangent back through steps ``T - 1, ..., 0``, each from its input state,
while at most ``c`` states are stored at once. The schedule is a list of actions:

* ``(STORE, t)``: store the current state (state ``t``) as a snapshot;
* ``(ADVANCE, t)``: run step ``t`` without a graph, from the current state ``t`` to ``t + 1``;
* ``(RESTORE, t)``: make the snapshot of state ``t`` the current state;
* ``(REVERSE, t)``: run step ``t`` with a graph from the current state ``t`` and pull the
  cotangent back through it (the current state is used up);
* ``(FREE, t)``: drop the snapshot of state ``t``.

It begins with the training run itself: ``STORE`` and ``ADVANCE`` actions up to state
``T - 1``, where the first ``REVERSE`` is (training runs step ``T - 1`` too, for its output).

Counting as Griewank does, the ``ADVANCE`` actions (the training run's first ``T - 1`` steps
included) number ``r·T - C(c + r, c + 1)``, where ``r`` is the smallest integer with
``C(c + r, c) >= T``: the fewest any schedule with ``c`` snapshots can take. The backward
pass recomputes ``r·T - C(c + r, c + 1) - (T - 1)`` steps without a graph, besides the ``T``
steps it reverses: 0 when ``c >= T - 1`` (every state stored), ``T(T - 1)/2 - (T - 1)`` with
``c = 1`` (only the start). The snapshot counted as one of the ``c`` includes state 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import comb

STORE, ADVANCE, RESTORE, REVERSE, FREE = "store", "advance", "restore", "reverse", "free"

Action = tuple[str, int]


def repetitions(steps: int, snapshots: int) -> int:
    """The smallest ``r`` with ``C(snapshots + r, snapshots) >= steps``: how often the worst step is recomputed."""
    r = 0
    while comb(snapshots + r, snapshots) < steps:
        r += 1
    return r


def optimal_advances(steps: int, snapshots: int) -> int:
    """The fewest steps run without a graph to reverse ``steps`` steps with ``snapshots`` snapshots.

    Griewank's closed form, training's first ``steps - 1`` steps included: ``r·T - C(c + r, c + 1)``.
    """
    if steps < 1 or snapshots < 1:
        raise ValueError(f"nestgrad.Reverse: need steps >= 1 and snapshots >= 1; got {steps} and {snapshots}.")
    r = repetitions(steps, snapshots)
    return r * steps - comb(snapshots + r, snapshots + 1)


def _split(steps: int, snapshots: int) -> int:
    """Where to store the next snapshot when reversing ``steps`` steps from a stored start with ``snapshots``.

    With ``r = repetitions(steps, snapshots)``, any ``m`` that leaves the first part at most
    ``C(c + r - 1, c)`` steps long (reversed with ``c`` snapshots and one repetition fewer) and the
    rest at most ``C(c + r - 1, c - 1)`` (reversed with ``c - 1`` and ``r``), each at least as long
    as one repetition fewer allows, costs the optimum: the largest such ``m`` is taken.
    """
    c, r = snapshots, repetitions(steps, snapshots)
    return min(comb(c + r - 1, c), steps - comb(c + r - 2, c - 1))


def schedule(steps: int, snapshots: int) -> list[Action]:
    """The actions that reverse ``steps`` steps with at most ``snapshots`` stored states (see the module)."""
    return list(actions(steps, snapshots))


def actions(steps: int, snapshots: int) -> Iterator[Action]:
    """``schedule(steps, snapshots)``, one action at a time (a long run's schedule is not held as a list)."""
    if steps < 1 or snapshots < 1:
        raise ValueError(f"nestgrad.Reverse: need steps >= 1 and snapshots >= 1; got {steps} and {snapshots}.")
    yield STORE, 0
    current: int | None = 0  # the position of the current state; None once a REVERSE used it
    # The work left, last in first out: reverse steps [lo, hi) from the snapshot at lo with s
    # snapshots (that one included), or free a snapshot.
    todo: list[tuple[int, int, int] | int] = [(0, steps, min(snapshots, steps))]
    while todo:
        task = todo.pop()
        if isinstance(task, int):
            yield FREE, task
            continue
        lo, hi, s = task
        if current != lo:
            yield RESTORE, lo
        if hi - lo == 1:
            yield REVERSE, lo
            current = None
        elif s == 1:  # only the start: recompute from it for every step
            for t in reversed(range(lo, hi)):
                if t != hi - 1:
                    yield RESTORE, lo
                yield from ((ADVANCE, u) for u in range(lo, t))
                yield REVERSE, t
            current = None
        else:
            m = lo + _split(hi - lo, s)
            yield from ((ADVANCE, u) for u in range(lo, m))
            yield STORE, m
            current = m
            todo += [(lo, m, s), m, (m, hi, s - 1)]
    yield FREE, 0


def training_stores(steps: int, snapshots: int) -> list[int]:
    """The states the training run stores: the ``STORE`` actions before the first ``REVERSE``."""
    stores = []
    for kind, t in actions(steps, snapshots):
        if kind == REVERSE:
            return stores
        if kind == STORE:
            stores.append(t)
    raise AssertionError("unreachable: every schedule reverses step steps - 1")  # pragma: no cover


def backward_actions(steps: int, snapshots: int) -> Iterator[Action]:
    """The actions of the backward pass: from the first ``REVERSE`` on, after restoring state ``steps - 1``.

    Training ran every step, so its current state is the final one, not ``steps - 1``; that
    one is among the states it stored (``training_stores``).
    """
    it = actions(steps, snapshots)
    for kind, _ in it:
        if kind == REVERSE:
            break
    yield RESTORE, steps - 1
    yield REVERSE, steps - 1
    yield from it
