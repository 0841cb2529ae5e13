"""Benchmark: the forum thread's three-level pipeline at (close to) its real size.

Two Bert2Bert models (``EncoderDecoderModel`` of two ``BertConfig``s, random weights, nothing
downloaded). Level 1 trains M1 on 2 sequences of 2 tokens, each sequence's loss weighted by
``sigmoid(A)``; level 2 trains M2 with M1's last decoder hidden states as its
``decoder_inputs_embeds`` and M1's argmax predictions as labels; level 3 is M2's loss on a
validation pair, differentiated back to ``A`` through both training runs. Both levels take
``--steps`` (T) steps of SGD(lr=1e-3), float32, one thread.

Variants (methods of level 1 / level 2):

* ``unroll``: ``ng.Unroll()`` / ``ng.Unroll()``
* ``reverse``: ``ng.Reverse()`` / ``ng.Reverse()``
* ``hand-written``: ``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)``
  at both levels, written out by hand.

Each variant runs in a fresh subprocess; the table gives its wall time and the rise of the peak
RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS after the models were built. The
subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--system-malloc`` to turn it off), so
that freed memory goes back to the system and the RSS follows the tensors. The
hypergradients are checked against each other first (at T=2, in the main process).

Sizes: ``--hidden 384 --layers 6`` (default) is 49M parameters per model; ``--hidden 768
--layers 12`` is ``BertConfig()``'s default, bert-base: 247M per model (needs about 16 GiB).

Usage::

    python benchmarks/bench_seed_scale.py                          # 49M per model, T = 2 and 4
    python benchmarks/bench_seed_scale.py --steps 2,4,8 --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestgrad as ng
from bench_unroll import _reset_peak_rss, _status_kib, machine

Params = dict[str, Tensor]
LR = 1e-3
VOCAB = 30522  # BertConfig's default


@dataclass
class Seed:
    m1: nn.Module
    m2: nn.Module
    batch1: tuple[Tensor, Tensor, Tensor]  # encoder ids, decoder ids, labels: (2, 2) each
    x2: Tensor  # encoder ids from which M1 makes M2's training data
    val: tuple[Tensor, Tensor, Tensor]
    A: Tensor


def build(hidden: int, layers: int, seed: int = 0) -> Seed:
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    heads = max(1, hidden // 64)
    size = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden)

    def model(s: int) -> nn.Module:
        torch.manual_seed(s)
        config = EncoderDecoderConfig.from_encoder_decoder_configs(
            BertConfig(**size), BertConfig(**size, is_decoder=True, add_cross_attention=True)
        )
        config.decoder_start_token_id, config.pad_token_id = 1, 0
        return EncoderDecoderModel(config=config).eval()

    g = torch.Generator().manual_seed(seed)

    def ids() -> Tensor:
        return torch.randint(2, VOCAB, (2, 2), generator=g)

    return Seed(
        model(1), model(2), (ids(), ids(), ids()), ids(), (ids(), ids(), ids()), torch.zeros(2, requires_grad=True)
    )


def params(m: nn.Module) -> Params:
    return {k: v.detach().requires_grad_() for k, v in m.named_parameters()}


def loss1(s: Seed, w: Params, batch: tuple[Tensor, Tensor, Tensor], A: Tensor, call=ng.call) -> Tensor:
    enc, dec, labels = batch
    logits = call(s.m1, w, input_ids=enc, decoder_input_ids=dec).logits
    per_seq = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).mean(1)
    return (torch.sigmoid(A) * per_seq).mean()


def loss2(s: Seed, w2: Params, x: Tensor, w1: Params, call=ng.call) -> Tensor:
    out = call(s.m1, w1, input_ids=x, decoder_input_ids=x, output_hidden_states=True)
    embeds, labels = out.decoder_hidden_states[-1], out.logits.argmax(-1)
    logits = call(s.m2, w2, input_ids=x, decoder_inputs_embeds=embeds).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def loss3(s: Seed, w2: Params, call=ng.call) -> Tensor:
    enc, dec, labels = s.val
    return F.cross_entropy(call(s.m2, w2, input_ids=enc, decoder_input_ids=dec).logits.flatten(0, 1), labels.flatten())


def run_nestgrad(s: Seed, steps: int, method: type[ng.Method]) -> Tensor:
    w1 = ng.train(lambda w, b, A: loss1(s, w, b, A), params(s.m1), ng.optim.SGD(lr=LR), [s.batch1],
                  steps=steps, hparams=s.A, method=method())  # fmt: skip
    w2 = ng.train(lambda w, x, h: loss2(s, w, x, h), params(s.m2), ng.optim.SGD(lr=LR), [s.x2],
                  steps=steps, hparams=w1, method=method())  # fmt: skip
    (grad,) = torch.autograd.grad(loss3(s, w2), s.A)
    return grad


def run_hand_written(s: Seed, steps: int) -> Tensor:
    """By hand; on the math attention kernel, since the fused ones have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _hand_written(s, steps)


def _hand_written(s: Seed, steps: int) -> Tensor:
    def call(m: nn.Module, w: Params, **kwargs: Any) -> Any:
        # A tied weight (the decoder's word embeddings and its LM head) is one entry of
        # named_parameters(); functional_call must get it under every name that holds it, or the
        # other slot silently keeps the module's own weight (and tie_weights=True would leave the
        # module holding the fast one, pytorch#164759).
        first = {}
        for name, p in m.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        full = {n: w[first[id(p)]] for n, p in m.named_parameters(remove_duplicate=False) if first[id(p)] in w}
        return torch.func.functional_call(m, full, (), kwargs, tie_weights=False)

    def sgd(w: Params, loss: Tensor) -> Params:
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True, allow_unused=True)
        return {k: v if g is None else v - LR * g for (k, v), g in zip(w.items(), grads, strict=True)}

    w1 = params(s.m1)
    for _ in range(steps):
        w1 = sgd(w1, loss1(s, w1, s.batch1, s.A, call))
    w2 = params(s.m2)
    for _ in range(steps):
        w2 = sgd(w2, loss2(s, w2, s.x2, w1, call))
    (grad,) = torch.autograd.grad(loss3(s, w2, call), s.A)
    return grad


VARIANTS = {
    "unroll": lambda s, t: run_nestgrad(s, t, ng.Unroll),
    "reverse": lambda s, t: run_nestgrad(s, t, ng.Reverse),
    "hand-written": run_hand_written,
}


def measure_one(name: str, steps: int, hidden: int, layers: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    s = build(hidden, layers)
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    grad = VARIANTS[name](s, steps)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"peak_gib": (peak - before) / 2**20, "seconds": seconds, "hwm_reset": reset, "grad": grad.tolist()}


def measure(name: str, steps: int, hidden: int, layers: int, malloc: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps),
           "--hidden", str(hidden), "--layers", str(layers)]  # fmt: skip
    # A fixed mmap threshold makes glibc return freed blocks at once, so that the peak RSS follows the
    # tensors instead of what the allocator kept from earlier steps (which varied by 0.2-0.8 GiB per run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if malloc else None
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", default="2,4", help="comma-separated T values")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default (dynamic) mmap threshold")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, int(args.steps), args.hidden, args.layers)))
        return
    torch.set_num_threads(1)
    names = args.variants.split(",")
    n_params = sum(v.numel() for v in build(args.hidden, args.layers).m1.parameters())
    print(f"# bench_seed_scale.py, {datetime.date.today()}, torch {torch.__version__}, {machine()}, one thread")
    print(f"# command: python {' '.join(sys.argv)}")
    print(
        f"# two Bert2Bert models, hidden {args.hidden}, {args.layers} layers: {n_params / 1e6:.1f}M parameters each\n"
    )
    print("| T | variant | wall s | peak RSS rise (GiB) | vs unroll | dL3/dA |")
    print("|--:|---|--:|--:|--:|---|")
    for steps in [int(t) for t in args.steps.split(",")]:
        results = {name: measure(name, steps, args.hidden, args.layers, not args.system_malloc) for name in names}
        base = results.get("unroll", {}).get("peak_gib")
        for name, r in results.items():
            if "error" in r:
                print(f"| {steps} | {name} | - | - | - | error: {r['error']} |")
                continue
            ratio = f"{r['peak_gib'] / base:.2f}x" if base else "-"
            grad = ", ".join(f"{g:.4e}" for g in r["grad"])
            print(f"| {steps} | {name} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {ratio} | {grad} |", flush=True)


if __name__ == "__main__":
    main()
