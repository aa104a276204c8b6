"""The one correctness check of each provider before it is timed.

The provider's outputs (and, for the backward modes, the gradients of every query, key, value,
gate and bias) are compared with the reference of peer_attention.reference computed in float64.
The rule is SPEC section 8's: the max abs error must be at most 2x the error of the same
reference computed in the input dtype, plus 1e-5 (for float32 at least 1e-4). Big cases are
checked on the same options at shorter lengths (batch 1); dropout cases are checked with
dropout off, because every provider draws its own random mask.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch

from peer_attention.reference import peer_attention_reference

from .common import Case, Inputs, make_inputs

CHECK_MAX_SCORES = 1 << 24   # B * Hq * sum(L_s * M_p) above this: check at reduced lengths
CHECK_MAX_TOKENS = 512


def check_case(case: Case) -> Tuple[Case, str]:
    """The case the check runs on, and a note when it differs from `case`."""
    notes = []
    checked = case
    if case.dropout_p > 0:
        checked = dataclasses.replace(checked, dropout_p=0.0)
        notes.append("checked without dropout")
    if score_elements(case) > CHECK_MAX_SCORES:
        checked = checked.scaled(CHECK_MAX_TOKENS)
        notes.append("checked at L=" + "x".join(str(n) for n in checked.q_lens) + ", B=1")
    return checked, "; ".join(notes)


def score_elements(case: Case) -> int:
    return case.batch * case.q_heads * sum(case.q_lens[s] * case.kv_lens[p] for s, p in case.attended_pairs())


def reference_outputs(case: Case, x: Inputs) -> List[torch.Tensor]:
    return peer_attention_reference(
        x.queries, x.keys, x.values, peers=case.peer_table(), gate=x.gate, bias=x.bias,
        normalize=case.normalize, is_causal=case.is_causal, kv_lengths=x.kv_lengths,
        attn_mask=x.attn_mask)


def outputs_and_grads(run: Callable[[], List[torch.Tensor]], x: Inputs, with_grads: bool):
    outs = run()
    if not with_grads:
        return [o.detach() for o in outs], []
    pairs = [(o, g) for o, g in zip(outs, x.grad_outputs) if o.requires_grad]
    wanted = x.differentiable()
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g.to(o.dtype) for o, g in pairs],
                                allow_unused=True) if pairs else [None] * len(wanted)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]
    return [o.detach() for o in outs], [g.detach() for g in grads]


class Oracle:
    """Reference results of one checked case: float64 truth and the input-dtype baseline error."""

    def __init__(self, case: Case, with_grads: bool):
        self.case, self.with_grads = case, with_grads
        self.note = ""  # set by the runner when the checked case differs from the timed one
        self.inputs = make_inputs(case, requires_grad=with_grads)
        x64 = self.inputs.converted(torch.float64, with_grads)
        self.truth = outputs_and_grads(lambda: reference_outputs(case, x64), x64, with_grads)
        x_low = self.inputs.converted(case.torch_dtype, with_grads)
        baseline = outputs_and_grads(lambda: reference_outputs(case, x_low), x_low, with_grads)
        self.baseline_err = [_max_abs(a, b) for a, b in zip(_flat(baseline), _flat(self.truth))]

    def tolerances(self) -> List[float]:
        floor = 1e-4 if self.case.dtype == "float32" else 0.0
        return [max(floor, 2.0 * e + 1e-5) for e in self.baseline_err]

    def compare(self, run: Callable[[], List[torch.Tensor]]) -> Tuple[bool, float, Optional[str]]:
        """(correct, worst max-abs error, what failed)."""
        got = _flat(outputs_and_grads(run, self.inputs, self.with_grads))
        want = _flat(self.truth)
        if len(got) != len(want):
            return False, float("inf"), f"{len(got)} tensors returned, expected {len(want)}"
        labels = self._labels()
        worst, failure = 0.0, None
        for label, a, b, tol in zip(labels, got, want, self.tolerances()):
            if a.shape != b.shape:
                return False, float("inf"), f"{label}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            err = _max_abs(a, b)
            worst = max(worst, err)
            if not err <= tol and failure is None:  # `not <=` also catches NaN
                failure = f"{label}: max abs error {err:.3g} > tolerance {tol:.3g}"
        return failure is None, worst, failure

    def _labels(self) -> List[str]:
        n = self.case.num_streams
        labels = [f"out[{s}]" for s in range(n)]
        if self.with_grads:
            labels += [f"d{role}[{s}]" for role in ("q", "k", "v") for s in range(n)]
            labels += [name for name, t in (("dgate", self.inputs.gate), ("dbias", self.inputs.bias))
                       if t is not None]
        return labels


def _flat(pair) -> List[torch.Tensor]:
    outs, grads = pair
    return list(outs) + list(grads)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max().item()
    return diff
