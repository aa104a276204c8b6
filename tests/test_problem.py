"""The problem's field table (peer_attention/problem.py) and what is derived from it."""
import ast
import os

import pytest
import torch

from peer_attention import entry, ops
from peer_attention.problem import (FIELD_NAMES, FIELDS, AttentionProblem, causal_band,
                                    problem_builder)
from peer_attention.validation import check_problem_variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the compiled extension (csrc/binding.cpp) implements exactly this signature: the table must
# derive it byte for byte (a change here is a change of the C++ binding too)
PROBLEM_SCHEMA_LITERAL = (
    "Tensor q, Tensor k, Tensor v, SymInt[] q_lens, SymInt[] kv_lens, int[] peers, "
    "Tensor? gate, Tensor? bias, Tensor? kv_lengths, Tensor? attn_mask, Tensor? dropout_seed, "
    "float dropout_p, bool is_causal, float scale, str normalize, "
    "int window_left, int window_right, bool bottom_right, float softcap, "
    "Tensor? alibi_slopes, Tensor? sinks"
)


def test_schema_is_derived_byte_for_byte():
    assert ops.PROBLEM_SCHEMA == PROBLEM_SCHEMA_LITERAL
    assert ops.BWD_SCHEMA == (
        f"(Tensor grad_out, Tensor out, Tensor lse, {PROBLEM_SCHEMA_LITERAL}, bool[] needs_grad, "
        "SymInt[]? dmask_shape=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert ops.NUM_PROBLEM_ARGS == 21 == len(AttentionProblem._fields)
    assert AttentionProblem._fields == FIELD_NAMES


def test_positions_are_derived():
    assert ops.GRAD_INPUTS == (0, 1, 2, 6, 7, 9, 20)  # q, k, v, gate, bias, attn_mask, sinks
    assert ops.TENSOR_POSITIONS == (0, 1, 2, 6, 7, 8, 9, 10, 19, 20)
    assert ops.AUTOCAST_POSITIONS == (0, 1, 2, 9)  # q, k, v, attn_mask (as torch's SDPA)
    variants = [f.name for f in FIELDS if f.default is not FIELDS[0].default]
    assert variants == ["window_left", "window_right", "bottom_right", "softcap", "alibi_slopes",
                        "sinks"]


def _plain(**changes):
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    fields = dict(q=q, k=q, v=q, q_lens=(3,), kv_lens=(3,), peers=(1,), gate=None, bias=None,
                  kv_lengths=None, attn_mask=None, dropout_seed=None, dropout_p=0.0,
                  is_causal=False, scale=0.5, normalize="joint")
    fields.update(changes)
    return AttentionProblem(**fields)


@pytest.mark.parametrize("variant", [dict(window_left=2), dict(window_right=0),
                                     dict(bottom_right=True), dict(softcap=3.0),
                                     dict(alibi_slopes=torch.ones(1, 2)),
                                     dict(sinks=torch.zeros(2))])
def test_has_variants_reads_the_table(variant):
    assert not _plain().has_variants
    assert _plain(**variant).has_variants


def test_builder_names_its_fields():
    build = problem_builder("q", "k", "v", "q_lens", "kv_lens", "scale", peers=(1,), gate=None,
                            bias=None, kv_lengths=None, attn_mask=None, dropout_seed=None,
                            dropout_p=0.0, is_causal=True, normalize="joint")
    plain = _plain()
    built = build(plain.q, plain.k, plain.v, (3,), (3,), 0.5)
    assert type(built) is AttentionProblem
    assert built == plain._replace(is_causal=True)
    with pytest.raises(ValueError, match="missing fields"):
        problem_builder("q", "k")
    with pytest.raises(ValueError, match="unknown fields"):
        problem_builder(*FIELD_NAMES[:15], softcapp=1.0)


def test_causal_band():
    assert causal_band(True, (-1, -1)) == (True, -1, -1)
    assert causal_band(False, (3, 0)) == (True, 3, -1)
    assert causal_band(False, (3, 2)) == (False, 3, 2)


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf")])
def test_entry_run_rejects_a_bad_softcap(softcap):
    with pytest.raises(ValueError, match="softcap"):
        entry.run(_plain(softcap=softcap))


def test_entry_run_checks_variants_and_matches_the_api():
    with pytest.raises(TypeError, match="window_left"):
        check_problem_variants(_plain(window_left=1.5))
    with pytest.raises(ValueError, match="sinks"):
        entry.run(_plain(sinks=torch.zeros(3, dtype=torch.float64)))
    p = _plain(softcap=2)  # an int: the kernels get a float
    assert type(check_problem_variants(p).softcap) is float
    import peer_attention as pa
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    out, lse = entry.run(pa.api.sdpa_problem(q, q, q, is_causal=True)._replace(softcap=2.0))
    expected = pa.peer_attention([q], [q], [q], is_causal=True, softcap=2.0)[0]
    torch.testing.assert_close(out, expected)
    assert lse.shape == (1, 2, 5)


def test_entry_check_backend_name():
    assert entry.check_backend_name(None) is None
    assert entry.check_backend_name("auto") is None
    assert entry.check_backend_name("reference") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        entry.check_backend_name("fast")


def _sources():
    """The package's Python files (peer_attention/, its triton_kernels link not followed) and
    scripts/."""
    for top in ("peer_attention", "scripts"):
        for folder, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def test_no_positional_problem_construction():
    """AttentionProblem is built with keywords (or problem_builder / _make from op arguments):
    the field order is written only in problem.FIELDS."""
    offenders = []
    for path in _sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
                    and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "AttentionProblem" and node.args):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, f"positional AttentionProblem(...) construction: {offenders}"


def test_problem_import_has_no_cycle_through_ops():
    """backends/torch_dropout.py takes empty_grad from problem.py, not from ops.py (the cycle
    ops -> double_backward -> backends/torch_dropout -> ops)."""
    path = os.path.join(ROOT, "peer_attention", "backends", "torch_dropout.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "ops" not in modules
