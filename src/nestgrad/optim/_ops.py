"""Out-of-place list arithmetic with two interchangeable back ends.

Every optimizer rule in ``nestgrad.optim`` is written once against this
small vocabulary of list operations. ``Foreach`` runs each operation as a
single ``torch._foreach_*`` call over the whole list; ``PerTensor`` runs a
Python loop of ordinary tensor operations. Both have the same signatures and
give the same numbers, and neither mutates its inputs, so both are
differentiable.

A scalar argument may be a Python number or a 0-dim Tensor. ``_foreach`` ops
cannot back-propagate into a single scalar Tensor, so a Tensor scalar is
broadcast to one list entry per tensor, which they can.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Scalar = float | Tensor
Tensors = list[Tensor]


def is_zero(x: Scalar) -> bool:
    """True only for a Python number equal to 0: a Tensor is never skipped."""
    return not isinstance(x, Tensor) and x == 0


class Foreach:
    """List ops implemented with one ``torch._foreach_*`` call each."""

    @staticmethod
    def _s(xs: Sequence[Tensor], s: Scalar) -> Scalar | list[Tensor]:
        return [s] * len(xs) if isinstance(s, Tensor) else s

    @classmethod
    def add(cls, xs: Tensors, ys: Tensors, alpha: Scalar = 1) -> Tensors:
        if isinstance(alpha, Tensor):
            return torch._foreach_add(xs, cls.mul(ys, alpha))
        return torch._foreach_add(xs, ys, alpha=alpha)

    @classmethod
    def add_scalar(cls, xs: Tensors, s: Scalar) -> Tensors:
        return torch._foreach_add(xs, cls._s(xs, s))

    @staticmethod
    def sub(xs: Tensors, ys: Tensors) -> Tensors:
        return torch._foreach_sub(xs, ys)

    @classmethod
    def mul(cls, xs: Tensors, s: Scalar | Tensors) -> Tensors:
        return torch._foreach_mul(xs, s if isinstance(s, list) else cls._s(xs, s))

    @classmethod
    def div(cls, xs: Tensors, s: Scalar | Tensors) -> Tensors:
        return torch._foreach_div(xs, s if isinstance(s, list) else cls._s(xs, s))

    @classmethod
    def addcmul(cls, xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
        if isinstance(value, Tensor):
            return cls.add(xs, torch._foreach_mul(ys, zs), value)
        return torch._foreach_addcmul(xs, ys, zs, value=value)

    @classmethod
    def addcdiv(cls, xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
        # Not torch._foreach_addcdiv: its backward fails on torch 2.13 for lists of
        # tensors with different shapes ("select(): index 1 out of range").
        return cls.add(xs, torch._foreach_div(ys, zs), value)

    @classmethod
    def lerp(cls, xs: Tensors, ys: Tensors, weight: Scalar) -> Tensors:
        return torch._foreach_lerp(xs, ys, cls._s(xs, weight))

    @staticmethod
    def neg(xs: Tensors) -> Tensors:
        return torch._foreach_neg(xs)

    @staticmethod
    def sqrt(xs: Tensors) -> Tensors:
        return torch._foreach_sqrt(xs)

    @staticmethod
    def abs(xs: Tensors) -> Tensors:
        return torch._foreach_abs(xs)

    @staticmethod
    def sign(xs: Tensors) -> Tensors:
        return torch._foreach_sign(xs)

    @staticmethod
    def maximum(xs: Tensors, ys: Tensors) -> Tensors:
        return torch._foreach_maximum(xs, ys)


class PerTensor:
    """The same list ops as ``Foreach``, one tensor at a time."""

    @staticmethod
    def add(xs: Tensors, ys: Tensors, alpha: Scalar = 1) -> Tensors:
        if isinstance(alpha, Tensor):
            return [x + y * alpha for x, y in zip(xs, ys, strict=True)]
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def add_scalar(xs: Tensors, s: Scalar) -> Tensors:
        return [x + s for x in xs]

    @staticmethod
    def sub(xs: Tensors, ys: Tensors) -> Tensors:
        return [x - y for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def mul(xs: Tensors, s: Scalar | Tensors) -> Tensors:
        if isinstance(s, list):
            return [x * y for x, y in zip(xs, s, strict=True)]
        return [x * s for x in xs]

    @staticmethod
    def div(xs: Tensors, s: Scalar | Tensors) -> Tensors:
        if isinstance(s, list):
            return [x / y for x, y in zip(xs, s, strict=True)]
        return [x / s for x in xs]

    @staticmethod
    def addcmul(xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
        if isinstance(value, Tensor):
            return [x + y * z * value for x, y, z in zip(xs, ys, zs, strict=True)]
        return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs, strict=True)]

    @classmethod
    def addcdiv(cls, xs: Tensors, ys: Tensors, zs: Tensors, value: Scalar = 1) -> Tensors:
        # The quotient first, then a scaled add, as Foreach.addcdiv does: torch.addcdiv rounds
        # value * y / z in another order, a last-bit difference between the two back ends.
        return cls.add(xs, [y / z for y, z in zip(ys, zs, strict=True)], value)

    @staticmethod
    def lerp(xs: Tensors, ys: Tensors, weight: Scalar) -> Tensors:
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def neg(xs: Tensors) -> Tensors:
        return [-x for x in xs]

    @staticmethod
    def sqrt(xs: Tensors) -> Tensors:
        return [x.sqrt() for x in xs]

    @staticmethod
    def abs(xs: Tensors) -> Tensors:
        return [x.abs() for x in xs]

    @staticmethod
    def sign(xs: Tensors) -> Tensors:
        return [x.sign() for x in xs]

    @staticmethod
    def maximum(xs: Tensors, ys: Tensors) -> Tensors:
        return [torch.maximum(x, y) for x, y in zip(xs, ys, strict=True)]


class Unfused:
    """A back end's ops, with ``add(xs, ys, alpha)`` computed as ``xs + ys * alpha``: two roundings.

    ``torch.add(x, y, alpha=a)`` rounds ``x + a * y`` once where the CPU has FMA; a
    hand-written ``x + a * y`` (or ``p - lr * g``) rounds the product first. Same math, last-bit
    differences. Every other op is the wrapped back end's.
    """

    def __init__(self, ops: Ops) -> None:
        self._ops = ops

    def add(self, xs: Tensors, ys: Tensors, alpha: Scalar = 1) -> Tensors:
        if not isinstance(alpha, Tensor) and alpha == 1:
            return self._ops.add(xs, ys)
        return self._ops.add(xs, self._ops.mul(ys, alpha))

    def __getattr__(self, name: str) -> object:
        return getattr(self._ops, name)


Ops = type[Foreach] | type[PerTensor]
