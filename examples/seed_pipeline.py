"""The forum thread's three-level pipeline, runnable: learn per-example weights A through two trainings.

The user story (a PyTorch forum thread): two Bert2Bert models, M1 and M2.

1. M1 trains on a loss whose per-example terms are weighted by A (here ``sigmoid(A)``).
2. M2 trains on data made by the trained M1: M1's last decoder hidden states are M2's
   ``decoder_inputs_embeds`` and M1's argmax predictions are M2's labels.
3. A moves to lower M2's validation loss L3, so dL3/dA passes through both trainings.

Each level is one ``ng.train`` call; the level-2 call takes M1's trained weights as its
``hparams``. Each level may use its own hypergradient method (``--method1``, ``--method2``).

``--variant argmax-only`` feeds M2 fixed decoder ids instead of M1's hidden states, so M1
reaches M2 only through ``argmax``, which has no derivative: every exact method then finds
no path from A to L3 (``ng.train`` raises ``nestgrad.DisconnectedError``, pointing at the argmax). ``--method2 zeroth``
replaces level 2's derivative by a ZerothOrder (evolution strategies) estimate: it re-trains
M2 on labels from randomly perturbed M1 weights, which does see argmax flips. It perturbs
all of M1's weights (tens of thousands of numbers), so the estimate is noisy: it gives a
usable direction only because the models are tiny and the runs short.

``--variant probe`` freezes M2's body and trains only a linear head on its decoder states
(which depend on M1's weights) with an L2 penalty, to convergence: a strongly convex level,
where ``--method2 implicit`` is exact (it is an approximation on the short BERT runs, and
warns that they have not reached an optimum).

The models are built from a tiny ``BertConfig`` (hidden size 32, 2 layers); nothing is
downloaded. Both are in eval mode (no dropout).

    python examples/seed_pipeline.py                       # Unroll at both levels
    python examples/seed_pipeline.py --method1 forward --method2 reverse
    python examples/seed_pipeline.py --variant argmax-only --method2 zeroth
    python examples/seed_pipeline.py --variant probe --method2 implicit
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

import nestgrad as ng

VOCAB = 13  # token ids 0 (pad) and 1 (decoder start) are never data
SEQ = 5
N1 = 8  # M1's training examples: one weight in A each
STEPS1 = 4  # M1's training steps (full batch)
STEPS2 = 3  # M2's training steps (cycling over M2's batches)
PROBE_STEPS = 300  # "probe" variant: M2's head trains to convergence (gradient norm ~1e-12 in float64)
PROBE_L2 = 0.1  # its L2 penalty: a strongly convex level, where Implicit is exact
VARIANTS = ("hidden", "argmax-only", "probe")

Params = dict[str, Tensor]

# A command-line name -> a fresh method object (ZerothOrder carries its own random generator).
METHODS: dict[str, Callable[[], ng.Method]] = {
    "unroll": lambda: ng.Unroll(),
    "reverse": lambda: ng.Reverse(),
    # Forward carries one tangent per hyperparameter: fine for A (N1 numbers) at level 1,
    # refused (ValueError) for M1's weights at level 2 (except in the "probe" variant, where
    # level 2's hyperparameters are M2's 40x32 decoder states: 1280, under max_hparams).
    "forward": lambda: ng.Forward(),
    # Implicit assumes the level is trained to an optimum: exact at level 2 of the "probe"
    # variant; on the short BERT runs an approximation, with a ConvergenceWarning saying so.
    "implicit": lambda: ng.Implicit(solver=ng.CG(max_steps=20, tol=1e-6)),
    "finitediff": lambda: ng.FiniteDiff(eps=1e-2),
    "zeroth": lambda: ng.ZerothOrder(samples=16, sigma=5e-2, seed=0),
}


def make_model(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    size = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=VOCAB, max_position_embeddings=16,
    )  # fmt: skip
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**size), BertConfig(**size, is_decoder=True, add_cross_attention=True)
    )
    config.decoder_start_token_id = 1
    config.pad_token_id = 0
    return EncoderDecoderModel(config=config).eval().to(dtype)


@dataclass
class Pipeline:
    model1: nn.Module
    model2: nn.Module
    batch1: tuple[Tensor, ...]  # M1's training set: enc ids, enc mask, dec ids, dec mask, labels
    data2: list[Tensor]  # encoder ids from which M1 makes M2's training data (one batch per step)
    val: tuple[Tensor, ...]  # M2's validation set: enc ids, dec ids, labels
    A: Tensor  # one raw weight per M1 training example; the loss weight is sigmoid(A)


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> Pipeline:
    model1, model2 = make_model(2 * seed + 1, dtype), make_model(2 * seed + 2, dtype)
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> Tensor:
        return torch.randint(2, VOCAB, (n, SEQ), generator=g)

    enc_mask = torch.ones(N1, SEQ, dtype=torch.long)
    enc_mask[0, -2:] = 0  # some padding, so the attention masks are not trivial
    dec_mask = torch.ones(N1, SEQ, dtype=torch.long)
    dec_mask[1, -1] = 0
    batch1 = (ids(N1), enc_mask, ids(N1), dec_mask, ids(N1))
    A = torch.randn(N1, generator=g, dtype=dtype).requires_grad_()
    return Pipeline(model1, model2, batch1, [ids(4), ids(4)], (ids(8), ids(8), ids(8)), A)


# ------------------------------------------------------------------ level 1: M1, weighted by A
def loss1(pl: Pipeline, w1: Params, batch: tuple[Tensor, ...], A: Tensor) -> Tensor:
    enc, enc_mask, dec, dec_mask, labels = batch
    logits = ng.call(
        pl.model1, w1, input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    ).logits
    # Flattened tokens: torch 2.13's 2-D NLL loss has no double backward for the non-contiguous
    # cotangents that ng.Forward passes (see its docstring); the values are the same.
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    per_example = (per_token * dec_mask).sum(1) / dec_mask.sum(1)
    return (torch.sigmoid(A) * per_example).mean()


def train1(pl: Pipeline, A: Tensor, method: ng.Method) -> Params:
    return ng.train(
        lambda w1, batch, A: loss1(pl, w1, batch, A),
        dict(pl.model1.named_parameters()),
        ng.optim.SGD(lr=0.2, momentum=0.9),
        [pl.batch1],
        steps=STEPS1,
        hparams=A,
        method=method,
    )


# ------------------------------------------------------------- level 2: M2, on M1's outputs
def m1_outputs(pl: Pipeline, w1: Params, x: Tensor) -> tuple[Tensor, Tensor]:
    """M2's training data, made by M1: its last decoder hidden states and its argmax labels."""
    out = ng.call(pl.model1, w1, input_ids=x, decoder_input_ids=x, output_hidden_states=True)
    return out.decoder_hidden_states[-1], out.logits.argmax(-1)


def loss2(pl: Pipeline, w2: Params, x: Tensor, w1: Params, variant: str) -> Tensor:
    embeds, labels = m1_outputs(pl, w1, x)
    if variant == "hidden":
        logits = ng.call(pl.model2, w2, input_ids=x, decoder_inputs_embeds=embeds).logits
    else:  # "argmax-only": M1 reaches M2 through the labels alone
        logits = ng.call(pl.model2, w2, input_ids=x, decoder_input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def train2(pl: Pipeline, w1: Params, method: ng.Method, variant: str = "hidden") -> Params:
    return ng.train(
        lambda w2, x, w1: loss2(pl, w2, x, w1, variant),
        dict(pl.model2.named_parameters()),
        ng.optim.SGD(lr=0.2, momentum=0.9),
        pl.data2,
        steps=STEPS2,
        hparams=w1,
        method=method,
    )


# ----------------------------------- level 2, "probe" variant: a linear head trained to convergence
def decoder_features(pl: Pipeline, enc: Tensor, **decoder_inputs: Tensor) -> Tensor:
    """M2's frozen body: its last decoder hidden states, one row per token."""
    out = pl.model2(input_ids=enc, output_hidden_states=True, **decoder_inputs)
    return out.decoder_hidden_states[-1].flatten(0, 1)


def probe_loss(head: Params, labels: Tensor, features: Tensor) -> Tensor:
    logits = features @ head["weight"].T + head["bias"]
    penalty = sum(w.square().sum() for w in head.values())
    return F.cross_entropy(logits, labels) + PROBE_L2 / 2 * penalty


def train_probe(pl: Pipeline, w1: Params, method: ng.Method) -> Params:
    """Level 2 of the "probe" variant: M2's body is frozen and only a linear head on it trains.

    The head's inputs are M2's decoder states on M1's hidden states, so they depend on M1's
    weights, and its labels are M1's argmax predictions. With the L2 penalty this level is
    strongly convex and converges in ``PROBE_STEPS`` steps, so ``Implicit`` is exact here.
    """
    features, labels = [], []
    for x in pl.data2:
        embeds, y = m1_outputs(pl, w1, x)
        features.append(decoder_features(pl, x, decoder_inputs_embeds=embeds))
        labels.append(y.flatten())
    g = torch.Generator().manual_seed(0)
    like = dict(dtype=features[0].dtype, device=features[0].device)
    head = {
        "weight": (0.1 * torch.randn(VOCAB, features[0].shape[-1], generator=g, **like)).requires_grad_(),
        "bias": torch.zeros(VOCAB, **like).requires_grad_(),
    }
    return ng.train(
        probe_loss,
        head,
        ng.optim.SGD(lr=0.5, momentum=0.5),
        [torch.cat(labels)],
        steps=PROBE_STEPS,
        hparams=torch.cat(features),
        method=method,
    )


# ------------------------------------------------------------ level 3: M2's validation loss
def loss3(pl: Pipeline, w2: Params) -> Tensor:
    enc, dec, labels = pl.val
    logits = ng.call(pl.model2, w2, input_ids=enc, decoder_input_ids=dec).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def loss3_probe(pl: Pipeline, head: Params) -> Tensor:
    enc, dec, labels = pl.val
    with torch.no_grad():  # M2's body is frozen and the validation inputs are fixed
        features = decoder_features(pl, enc, decoder_input_ids=dec)
    return F.cross_entropy(features @ head["weight"].T + head["bias"], labels.flatten())


def run(
    pl: Pipeline, A: Tensor, method1: ng.Method, method2: ng.Method, variant: str = "hidden"
) -> tuple[Tensor, list[Tensor]]:
    """L3 as a function of A, and the argmax labels M1 made for M2 (to check they did not flip)."""
    w1 = train1(pl, A, method1)
    if variant == "probe":
        L3 = loss3_probe(pl, train_probe(pl, w1, method2))
    else:
        L3 = loss3(pl, train2(pl, w1, method2, variant))
    with torch.no_grad():
        labels = [m1_outputs(pl, w1, x)[1] for x in pl.data2]
    return L3, labels


def hypergradient(
    pl: Pipeline, method1: ng.Method, method2: ng.Method, variant: str = "hidden", A: Tensor | None = None
) -> Tensor:
    """dL3/dA. Raises torch's RuntimeError when no differentiable path joins A to L3."""
    A = pl.A if A is None else A
    L3, _ = run(pl, A, method1, method2, variant)
    (grad,) = torch.autograd.grad(L3, A)
    return grad


# -------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method1", choices=sorted(METHODS), default="unroll", help="level 1 (M1's training)")
    p.add_argument("--method2", choices=sorted(METHODS), default="unroll", help="level 2 (M2's training)")
    p.add_argument("--outer-steps", type=int, default=10)
    p.add_argument("--variant", choices=VARIANTS, default="hidden")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of the outer Adam on A")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Run the outer loop; return L3 before each outer step (and after the last one)."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it saves
    pl = build(args.seed, torch.float64 if args.float64 else torch.float32)
    method1, method2 = METHODS[args.method1](), METHODS[args.method2]()
    outer = torch.optim.Adam([pl.A], lr=args.lr)
    history: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(args.outer_steps), desc="outer steps"):
        outer.zero_grad()
        try:
            L3, _ = run(pl, pl.A, method1, method2, args.variant)
            L3.backward(inputs=[pl.A])  # dL3/dA, through both trainings
        except ValueError as err:  # Forward at level 2: M1's ~40k weights are too many hyperparameters
            raise SystemExit(
                f"{err}\n\n--method2 forward needs few level-2 hyperparameters; with --variant probe they are "
                f"M2's 40x32 decoder states, which Forward accepts."
            ) from None
        except RuntimeError as err:  # nestgrad.DisconnectedError when no differentiable path joins A to L3
            raise SystemExit(
                f"{err}\n\nNo gradient path from A to L3 with --method1 {args.method1} --method2 {args.method2} "
                f"--variant {args.variant}. In the argmax-only variant, use --method2 zeroth."
            ) from None
        history.append(L3.item())
        tqdm.write(f"step {step:3d}  L3 = {L3.item():.6f}  |dL3/dA| = {pl.A.grad.norm().item():.3e}")
        outer.step()
    with torch.no_grad():
        final, _ = run(pl, pl.A, method1, method2, args.variant)
    history.append(final.item())
    print(f"final    L3 = {final.item():.6f}   ({time.perf_counter() - start:.1f} s)")
    print("sigmoid(A) =", " ".join(f"{w:.3f}" for w in torch.sigmoid(pl.A).tolist()))
    return history


if __name__ == "__main__":
    main()
