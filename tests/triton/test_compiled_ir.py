"""What the interpreter cannot show, read from the Triton IR compiled for sm_90 (front end only,
about a second a kernel, no ptxas): the input precision of every fp32 product (per kernel:
utils.f32_precision, never plain TF32) and 64-bit row offsets (rows x row stride passes 2^31 in
flash-attn layouts and materialised masks: every row stride is widened to i64 before it
multiplies a row index; only the tile's own rows, tl.arange, meet a row stride in 32 bits).
Run in a subprocess without TRITON_INTERPRET (this process has it set; it replaces the
compiler)."""
import json
import os
import re
import subprocess
import sys

import pytest

# the strides that multiply a row (or batch/head) index: everything else is small
ROW_STRIDES = ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt",
               "stride_vb", "stride_vh", "stride_vt", "stride_ob", "stride_oh", "stride_ot",
               "stride_dob", "stride_doh", "stride_dot", "stride_dqb", "stride_dqh",
               "stride_dqt", "stride_dkb", "stride_dkh", "stride_dkt", "stride_dvb",
               "stride_dvh", "stride_dvt", "stride_mb", "stride_mh", "stride_mq", "stride_mk",
               "stride_dmb", "stride_dmh", "stride_dmq", "stride_dmk", "stride_lb", "stride_lh",
               "stride_pgt", "stride_pbt")
# ops a tile-local index passes through from its tl.arange
LOCAL_OPS = ("tt.make_range", "tt.expand_dims", "tt.broadcast")


def ttir(fn, args, kwargs, config, arch=90):
    """The TTIR (after Triton's own TTIR passes) of `fn` launched with args/kwargs/config on
    `arch`, bound exactly as a launch binds it (fit.bind, which fit.compile_launch uses)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from peer_attention.triton_kernels.fit import bind

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = bind(fn, args, kwargs, config, backend)
    src = ASTSource(fn, signature, constexprs, attrs)
    opts = backend.parse_options(options.__dict__)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                         backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, opts, src.language)
    return str(stages["ttir"](module, {}))


# the kernels take one strides tuple per tensor (triton_kernels/launch.py): the name of each
# element, in order (opt_strides: the optional inputs' tuples, in turn)
STRIDE_BUNDLES = {
    "q_strides": "qb qh qt qe", "k_strides": "kb kh kt ke", "v_strides": "vb vh vt ve",
    "o_strides": "ob oh ot oe", "do_strides": "dob doh dot doe", "dq_strides": "dqb dqh dqt dqe",
    "dk_strides": "dkb dkh dkt dke", "dv_strides": "dvb dvh dvt dve", "lse_strides": "lb lh ls",
    "pg_strides": "pgt pgb pgs pgp pgh", "pb_strides": "pbt pbb pbs pbp pbh",
    "dm_strides": "dmb dmh dmq dmk",
    "opt_strides": "gb gs gp gh ge | bb bs bp bh | klb kls | mb mh mq mk | ab ah",
}


def _leaves(name, value):
    """(element name, value) of a kernel argument, tuples flattened as Triton flattens them."""
    if not isinstance(value, tuple):
        return [(name, value)]
    if name in STRIDE_BUNDLES:
        groups = [g.split() for g in STRIDE_BUNDLES[name].split("|")]
        if len(groups) == 1:
            return [(f"stride_{n}", x) for n, x in zip(groups[0], value, strict=True)]
        return [(f"stride_{n}", x) for g, t in zip(groups, value, strict=True)
                for n, x in zip(g, t, strict=True)]
    return [leaf for i, x in enumerate(value) for leaf in _leaves(f"{name}_{i}", x)]


def with_stride_names(text, fn, args):
    """The TTIR with each function argument named as the kernel's stride it is (stride_qt, ...):
    tuple elements are numbered by Triton (%q_strides_3); an int argument equal to 1 is
    specialised into a constant and is no argument."""
    leaves = [leaf for param, value in zip(fn.arg_names, args)
              for leaf in _leaves(param, value)]
    leaves = [n for n, x in leaves if not (type(x) is int and x == 1) and x is not None]
    header = next(line for line in text.splitlines() if "tt.func public" in line)
    names = re.findall(r"(%[\w#.]+): ", header)
    assert len(names) == len(leaves), (names, leaves)
    rename = dict(zip(names, leaves))
    pattern = "|".join(re.escape(n) for n in sorted(rename, key=len, reverse=True))
    return re.sub(f"({pattern})\\b", lambda m: "%" + rename[m.group(1)], text)  # one pass


def dot_precisions(text):
    """The input precision of every fp32 x fp32 tt.dot (IEEE is the default, printed as none)."""
    found = []
    for line in text.splitlines():
        if "tt.dot " in line and re.search(r": tensor<[0-9x]+xf32> \* tensor<[0-9x]+xf32>", line):
            match = re.search(r"inputPrecision = (\w+)", line)
            found.append(match.group(1) if match else "ieee")
    return found


def offset_problems(text):
    """Row strides multiplied in 32 bits by anything but a tile-local tl.arange."""
    defs, problems = {}, []
    for line in text.splitlines():
        match = re.match(r"\s*(%[\w#.]+) = (\S+) (.*)", line)
        if not match:
            continue
        name, op, rest = match.groups()
        defs[name] = (op, rest)
        if op != "arith.muli" or not re.search(r": (tensor<[0-9x]+xi32>|i32\b)", rest):
            continue
        operands = re.findall(r"%[\w#.]+", rest.split(":")[0])
        for a, b in (operands, operands[::-1]):
            stride = a[1:] if a[1:] in ROW_STRIDES else None
            if stride is None and defs.get(a, ("",))[0] == "tt.splat":
                inner = re.findall(r"%[\w#.]+", defs[a][1])[0]
                stride = inner[1:] if inner[1:] in ROW_STRIDES else None
            if stride is None:
                continue
            x = b
            while defs.get(x, ("",))[0] in LOCAL_OPS[1:]:
                x = re.findall(r"%[\w#.]+", defs[x][1])[0]
            if defs.get(x, ("",))[0] != "tt.make_range":
                problems.append(f"{stride} x {b} in 32 bits: {line.strip()[:160]}")
    return problems


def report():
    """kernel/problem -> (fp32 dot precisions, 32-bit row offset multiplies, widened strides)."""
    import torch

    from peer_attention.triton_kernels import compile_check as cc
    from peer_attention.triton_kernels.utils import F32_DOT_PRECISIONS

    problems = cc.feature_problems(dim=64, seq=96, dtype=torch.float32)
    problems["bf16_joint3"] = cc.feature_problems(dim=64, seq=96)["joint3_everything"]
    rows = {}
    # sm90 loads through tensor descriptors where strides allow, sm80 through pointers
    for arch, variant in [(90, "joint3_everything"), (90, "float_mask_dropout_gqa"),
                          (90, "peer3_gate"), (90, "bf16_joint3"), (80, "joint3_everything"),
                          (80, "float_mask_dropout_gqa"), (90, "fp32_d256_odd")]:
        problem = problems[variant]
        for name, fn, args, kwargs in cc.kernel_launches(problem, True, arch):
            config = cc.first_config(name.replace("bwd_", ""), problem, arch)
            text = with_stride_names(ttir(fn, args, kwargs, config, arch), fn, args)
            widened = sorted(set(re.findall(r"arith.extsi %(stride_\w+) : i32 to i64", text)))
            rows[f"{name} {variant} sm{arch}"] = dict(
                dots=dot_precisions(text), precision=F32_DOT_PRECISIONS[
                    kwargs["F"].F32_DOT if "F" in kwargs else kwargs["F32_DOT"]],
                offsets32=offset_problems(text), widened=widened)
    return rows


@pytest.fixture(scope="module")
def ir_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "tests.triton.test_compiled_ir"], env=env,
                            cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fp32_products_use_the_chosen_precision(ir_report):
    import torch

    from peer_attention.triton_kernels.utils import f32_precision

    assert ir_report["bwd_dkdv fp32_d256_odd sm90"]["precision"] == "ieee"
    assert ir_report["bwd_dkdv joint3_everything sm90"]["precision"] == "tf32x3"
    assert ir_report["bwd_dq fp32_d256_odd sm90"]["precision"] == "tf32x3"
    for kernel, row in ir_report.items():
        if "bf16" in kernel:  # 16-bit products: no fp32 dot
            assert row["dots"] == [], kernel
        elif "preprocess" not in kernel or "joint3" in kernel or "peer" in kernel:
            assert row["dots"], kernel
        dim = 256 if "d256" in kernel else 64
        expected = "" if "bf16" in kernel else f32_precision(
            torch.float32, dim, dim, kernel.split()[0].replace("bwd_", ""))
        assert row["precision"] == expected, (kernel, row["precision"])
        assert set(row["dots"]) <= {expected}, (kernel, row["dots"])


def test_row_offsets_are_64_bit(ir_report):
    problems = [f"{kernel}: {p}" for kernel, row in ir_report.items() for p in row["offsets32"]]
    assert not problems, "\n".join(problems)
    for kernel, row in ir_report.items():  # the analysis sees the widened strides
        assert {"stride_qt", "stride_dot"} & set(row["widened"]) or "fwd" in kernel, kernel
        if kernel.startswith("fwd"):
            assert "stride_qt" in row["widened"] or "stride_ot" in row["widened"], kernel


if __name__ == "__main__":
    print(json.dumps(report()))
