"""``ZerothOrder``: evolution-strategies (Gaussian smoothing) estimates from re-runs of the training."""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._data import Batches, ReplayError
from .._nonfinite import NonFiniteError
from .._rng import RngState, replay_rng, rng_key, rng_state, threads_cause
from ._base import AdjointMethod

if TYPE_CHECKING:
    from .._problem import Problem


@dataclass(frozen=True)
class ZerothOrder(AdjointMethod):
    r"""Estimate the hypergradient from training runs at randomly perturbed hyperparameters.

    Let ``\lambda`` be every hyperparameter element that requires grad (the
    leaves of ``hparams`` and the optimizer's Tensor hyperparameters, concatenated),
    ``W(\lambda)`` the trained weights and ``v = \partial L/\partial W``
    at the unperturbed run. With ``\varepsilon_i \sim \mathcal N(0, I)``, the
    antithetic estimate is

    ```text
    \widehat{\nabla_\lambda L} = \frac1N \sum_{i=1}^N \varepsilon_i\,
        \frac{v^\top\big(W(\lambda + \sigma\varepsilon_i) - W(\lambda - \sigma\varepsilon_i)\big)}{2\sigma}
    ```

    and with ``antithetic=False``, ``\frac1N \sum_i \varepsilon_i\, v^\top\big(W(\lambda + \sigma\varepsilon_i)
    - W(\lambda)\big)/\sigma``, reusing the forward run as ``W(\lambda)``.
    Every re-run replays the data and the random numbers (dropout, sampling) of
    the original run; only the hyperparameters differ. A re-run that reads another
    batch for a step (``data=lambda t: next(it)``) or leaves torch's global generator
    elsewhere than training did (another thread drawing from it) raises instead.

    No derivative of the training path is taken, so this is the method that still
    gives an answer when hyperparameters reach the trained weights only through
    non-differentiable operations: argmax pseudo-labels, rounding, thresholds,
    sampling of discrete choices. There the exact gradient is zero almost
    everywhere and the estimate is the gradient of the Gaussian-smoothed
    ``v^\top W``, at the scale ``sigma``.

    Bias and variance: the estimate is unbiased for the gradient of
    ``v^\top\, \mathbb E_\varepsilon W(\lambda + \sigma\varepsilon)``, which differs
    from the exact hypergradient by ``O(\sigma^2)`` where ``W`` is smooth. The
    outer loss is linearized in ``W`` (through ``v``). The variance of one
    coordinate is about ``(\lVert\nabla\rVert^2 + \nabla_j^2)/N``, so the
    relative error is about ``\sqrt{d/N}`` for ``d`` hyperparameter elements:
    use it for a few hyperparameters (scalars, small vectors), not per-example
    weights. ``antithetic=True`` cancels the even-order terms of each sample and
    usually has much less variance per training run.

    Cost: the training run, then ``2 * samples`` more runs in the backward pass
    (``samples`` with ``antithetic=False``), under ``torch.no_grad`` and without
    second derivatives. Memory: a few copies of the weights. Batches from
    iterators are stored for the re-runs. The gradient with respect to the
    initial weights is not computed (asking for it raises).

    Randomness: the directions come from the method's own ``torch.Generator``,
    created with the method and seeded by ``seed`` (a random seed when ``None``),
    so the global RNG is untouched. Each backward pass draws fresh directions
    from it, so an outer loop does not reuse the same directions at every step;
    the same seed and the same sequence of calls give the same estimates.

    Args:
        samples: number of random directions ``N``, an int >= 1.
        sigma: perturbation scale ``\sigma`` > 0, in the units of the
            hyperparameters (shared by all of them: rescale hyperparameters of
            very different magnitudes). For non-differentiable training, choose
            it larger than the gaps between the jumps of ``W(\lambda)``.
        antithetic: use the central pair ``\lambda \pm \sigma\varepsilon_i``;
            ``False`` uses one-sided differences against the unperturbed run.
        seed: seed of the direction generator, or ``None``.

    Examples:
        >>> w = ng.train(train_loss, params, opt, data, steps=200, hparams=threshold,
        ...              method=ng.ZerothOrder(samples=32, sigma=0.1, seed=0))
        >>> (d_threshold,) = torch.autograd.grad(val_loss(w), threshold)

    References:
        Nesterov and Spokoiny, "Random gradient-free minimization of convex functions", 2017;
        Salimans et al., "Evolution strategies as a scalable alternative to reinforcement learning", 2017.
    """

    samples: int
    sigma: float
    antithetic: bool = True
    seed: int | None = None
    differentiates_params = False
    needs_path: ClassVar[bool] = False  # it estimates through cut paths: that is what it is for
    nonfinite_hint: ClassVar[str] = (
        "A perturbed training run at hparams ± sigma·ε overflowed in the outer loss's linearization: lower sigma."
    )

    @property
    def rereads(self) -> frozenset[str]:  # type: ignore[override]
        """Re-runs start again from the initial params and state; one-sided differences reuse the trained weights."""
        return frozenset({"params", "state", "hparams", "frozen", *(() if self.antithetic else ("trained",))})

    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, s = self.samples, self.sigma
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"nestgrad.ZerothOrder: samples must be an int >= 1; got {n!r}.")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"nestgrad.ZerothOrder: sigma must be a finite float > 0, the perturbation scale in "
                f"units of the hyperparameters; got {s!r}."
            )
        if not isinstance(self.antithetic, bool):
            raise TypeError(f"nestgrad.ZerothOrder: antithetic must be True or False; got {self.antithetic!r}.")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"nestgrad.ZerothOrder: seed must be an int or None; got {seed!r}.")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        object.__setattr__(self, "_generator", generator)

    def state_dict(self) -> dict[str, Any]:
        """The settings and the direction generator's state, as tensors, numbers and strings.

        ``torch.save`` writes it and ``torch.load(path, weights_only=True)`` reads it back. A method
        created with the same settings that loads it draws the same directions as this one would
        next, so a resumed outer loop gives the same estimates.

        Examples:
            >>> torch.save(method.state_dict(), "zo.pt")
            >>> method = ng.ZerothOrder(samples=8, sigma=0.1, seed=0)
            >>> method.load_state_dict(torch.load("zo.pt", weights_only=True))
        """
        return {
            "method": "ZerothOrder",
            "samples": self.samples,
            "sigma": self.sigma,
            "antithetic": self.antithetic,
            "seed": self.seed,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the direction generator saved by ``state_dict()`` (the settings must match)."""
        if not isinstance(state_dict, dict) or state_dict.get("method") != "ZerothOrder":
            got = state_dict.get("method", sorted(state_dict)) if isinstance(state_dict, dict) else state_dict
            raise ValueError(
                f"nestgrad.ZerothOrder.load_state_dict: expected the dict that ZerothOrder.state_dict() returns; "
                f"got {got!r}."
            )
        for k in ("samples", "sigma", "antithetic"):
            if state_dict.get(k) != getattr(self, k):
                raise ValueError(
                    f"nestgrad.ZerothOrder.load_state_dict: the state was saved with {k}={state_dict.get(k)!r}, "
                    f"but this method has {k}={getattr(self, k)!r}. Create ZerothOrder with the saved settings "
                    f"(samples={state_dict.get('samples')!r}, sigma={state_dict.get('sigma')!r}, "
                    f"antithetic={state_dict.get('antithetic')!r}) to continue its sequence of directions."
                )
        generator = state_dict.get("generator")
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            got = f"a {generator.dtype} Tensor" if isinstance(generator, Tensor) else type(generator).__name__
            raise TypeError(
                f"nestgrad.ZerothOrder.load_state_dict: 'generator' must be the uint8 Tensor of "
                f"torch.Generator.get_state(); got {got}."
            )
        expected = self._generator.get_state()
        if generator.shape != expected.shape:
            raise ValueError(_GENERATOR_SIZE.format(shape=tuple(generator.shape), expected=tuple(expected.shape)))
        scratch = torch.Generator()  # validated on a throwaway generator: a bad state leaves this one as it was
        try:
            scratch.set_state(generator)
        except RuntimeError as err:
            raise ValueError(_GENERATOR_INVALID.format(err=str(err).splitlines()[0])) from err
        self._generator.set_state(generator)

    def batches(self, data: Any, steps: int) -> Batches:
        return Batches(data, steps, keep=True)

    def forward(self, problem: Problem, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any, Any]:
        start = rng_state()
        initial = {k: v.detach() for k, v in params.items()}
        threads = [threading.active_count()]  # the most threads seen running, for the error message

        def count(*_: Any) -> None:
            threads[0] = max(threads[0], threading.active_count())

        trained, state = problem.fit(params, before_step=count)
        end = rng_key(rng_state())
        # The re-runs replay the random numbers training drew; a run that drew none leaves the RNG alone.
        rng = _Rng(start, end, threads[0]) if end != rng_key(start) else None
        return trained, state, (initial, rng, trained)

    def backward(
        self, problem: Problem, saved: Any, grads: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        initial, rng, trained = saved
        tensors = [x.detach() for x in problem.hparam_tensors()]
        wanted = [i for i, x in enumerate(problem.hparam_tensors()) if x.requires_grad]
        v = {k: g for k, g in grads.items() if g is not None}
        quiet = dataclasses.replace(problem, progress=False)

        def run(shift: list[Tensor], sign: float) -> dict[str, Tensor]:
            moved = list(tensors)
            for i, d in zip(wanted, shift):
                moved[i] = tensors[i] + (sign * self.sigma) * d
            with torch.no_grad(), replay_rng(None if rng is None else rng.start):
                try:
                    out = quiet.with_hparam_tensors(moved).fit(initial)[0]
                except (NonFiniteError, ValueError) as err:  # the unperturbed run worked: the shift is to blame
                    sign_ = "+" if sign > 0 else "-"
                    raise type(err)(_PERTURBED.format(sigma=self.sigma, sign=sign_, err=err)) from err
                if rng is not None:
                    rng.check(rng_state())
            return out

        total = [torch.zeros_like(tensors[i]) for i in wanted]
        moved = False  # whether any perturbed run changed the outer loss's linearization at all
        for _ in range(self.samples):
            shift = [
                torch.randn(tensors[i].shape, generator=self._generator, dtype=tensors[i].dtype).to(tensors[i].device)
                for i in wanted
            ]
            plus = run(shift, 1.0)
            minus = run(shift, -1.0) if self.antithetic else trained
            scale = 2 * self.sigma if self.antithetic else self.sigma
            slope = sum(((v[k] * (plus[k] - minus[k])).sum() for k in v), torch.zeros(())) / scale
            moved = moved or bool(slope != 0)
            for acc, d in zip(total, shift):
                acc.add_(d * slope.to(d))
        if not moved and v:
            warnings.warn(_FLAT.format(samples=self.samples, sigma=self.sigma), RuntimeWarning, stacklevel=2)
        supply = iter(acc / self.samples for acc in total)
        return {}, [next(supply) if i in wanted else None for i in range(len(tensors))]


@dataclass(frozen=True)
class _Rng:
    """Where the global RNG stood before and after training, to replay it and check each re-run."""

    start: RngState
    end: bytes
    threads: int

    def check(self, now: RngState) -> None:
        key = rng_key(now)
        if key != self.end and key != rng_key(self.start):  # a re-run that drew no random numbers is fine
            raise ReplayError(_RNG_DIFFERS.format(cause=threads_cause(self.threads)))


_GENERATOR_SIZE = (
    "nestgrad.ZerothOrder.load_state_dict: 'generator' has shape {shape}, but the state of the direction "
    "generator (torch.Generator.get_state()) has shape {expected}: the checkpoint is truncated or holds "
    "another tensor. Nothing was loaded. Pass the dict that ZerothOrder.state_dict() returned, unchanged."
)

_GENERATOR_INVALID = (
    "nestgrad.ZerothOrder.load_state_dict: 'generator' has the right size but is not a valid state of "
    "torch.Generator (torch says: {err}): the checkpoint is corrupted. Nothing was loaded. Pass the dict "
    "that ZerothOrder.state_dict() returned, unchanged."
)

_RNG_DIFFERS = (
    "nestgrad.ZerothOrder: a re-run of the training at perturbed hyperparameters drew other random numbers "
    "than training did (the global generator ended in another state), so the estimate would compare runs "
    "on different noise. {cause}"
)

_PERTURBED = (
    "nestgrad.ZerothOrder: a re-run of training at hparams {sign} sigma * direction (sigma={sigma:g}) failed, "
    "although the run at the hparams themselves did not. The perturbation moved the hparams out of their range "
    "or to where training diverges (e.g. a learning rate pushed negative or too high): lower sigma, or "
    "reparametrize the hparams (a learning rate on a log scale). The re-run said: {err}"
)

_FLAT = (
    "nestgrad.ZerothOrder: all {samples} perturbed training runs (sigma={sigma:g}) moved the outer loss "
    "by exactly 0, so the estimate is exactly 0. Either the outer loss does not depend on these "
    "hyperparameters, or it depends on them only through piecewise-constant operations (argmax, "
    "rounding, thresholds) whose output did not change at this scale. Raise sigma until perturbations "
    "of that size change their output (e.g. flip some argmax labels), or raise samples."
)
