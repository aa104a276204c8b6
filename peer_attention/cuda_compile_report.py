"""CUDA compile report: the kernels of csrc/ compiled for a GPU architecture without a GPU.

    python -m peer_attention.cuda_compile_report --arch sm80 [--arch sm90a ...]
        [--head-dims 128] [--dtypes fp16] [--flash-attn PATH] [--json]

Each kernel instantiation is compiled to a cubin with build_cuda's nvcc flags (`nvcc -cubin
-Xptxas -v`, one source file at a time) and reported with: registers, spill bytes (stores +
loads, from ptxas), shared memory (static from ptxas + the launcher's dynamic bytes, read from the
Config structs by a small host program) against the architecture's per-block limit, blocks per SM
(registers, shared memory, threads and the block limit; CUDA programming guide tables), and the
static SASS of the main loop (`cuobjdump -sass`): the loop closed by a backward branch that
issues the most HMMA (ties: the shortest one, the steady state), with its instruction count,
HMMA, LDSM, instructions per HMMA, LDSM per HMMA, branches and the spill traffic it issues
(LDL + STL). Counts are static (the loop body
as compiled), not a dynamic trace.

`--flash-attn PATH` (an unpacked or packed flash-attn 2.8.3 source distribution: `pip download
--no-deps --no-binary :all: flash-attn==2.8.3`) also compiles FlashAttention-2's hd128 fp16
forward `Flash_fwd_kernel_traits<128, 128, 64, 4>` and backward
`Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2>` (sm_80; non-causal, no dropout, even M/N
and K: their plain paths) with the same nvcc flags plus its own `--expt-extended-lambda`, as
the yardstick, and prints our backward's loop instructions per unit of work against its (the
split dQ + dK/dV kernels, and the fused one).
Needs nvcc on PATH (cuobjdump from the toolkit, else the one triton ships); runs from a checkout
(csrc/ is not in the wheel). Results for the record: docs/cuda.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# nvcc flags of build_cuda.py's extension (device side)
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one architecture (CUDA C++ programming guide, compute capabilities)."""
    gencode: str               # nvcc -gencode value
    smem_per_block: int        # opt-in dynamic + static shared memory per block, bytes
    smem_per_sm: int
    threads_per_sm: int
    blocks_per_sm: int
    registers_per_sm: int = 65536
    smem_reserved_per_block: int = 1024  # the runtime's own share per resident block (sm_80+)


ARCHS: Dict[str, ArchLimits] = {
    "sm80": ArchLimits("arch=compute_80,code=sm_80", 166912, 167936, 2048, 32),
    "sm86": ArchLimits("arch=compute_86,code=sm_86", 101376, 102400, 1536, 16),
    "sm89": ArchLimits("arch=compute_89,code=sm_89", 101376, 102400, 1536, 24),
    "sm90a": ArchLimits("arch=compute_90a,code=sm_90a", 232448, 233472, 2048, 32),
    "sm100": ArchLimits("arch=compute_100,code=sm_100", 232448, 233472, 2048, 32),
    "sm120": ArchLimits("arch=compute_120,code=sm_120", 101376, 102400, 1536, 32),
}

DTYPE_NAMES = {"__half": "fp16", "__nv_bfloat16": "bf16", "cutlass::half_t": "fp16"}


def tool(name: str) -> str:
    """A CUDA binary tool: the toolkit's (next to nvcc), else the copy triton ships."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        for folder in (Path(nvcc).resolve().parent, Path("/usr/local/cuda/bin")):
            if (folder / name).is_file():
                return str(folder / name)
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.is_file():
            return str(path)
    if shutil.which(name):
        return shutil.which(name)
    raise SystemExit(f"cuda_compile_report: {name} not found (nvcc's toolkit or triton)")


# --- SASS -----------------------------------------------------------------------------------

@dataclass
class LoopStats:
    instructions: int = 0
    hmma: int = 0
    ldsm: int = 0
    branches: int = 0
    local: int = 0  # LDL + STL: register spills that the loop itself issues

    @property
    def per_hmma(self) -> Optional[float]:
        return self.instructions / self.hmma if self.hmma else None

    @property
    def ldsm_per_hmma(self) -> Optional[float]:
        return self.ldsm / self.hmma if self.hmma else None


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    """cuobjdump -sass output -> {mangled function name: [(address, instruction)]}."""
    functions: Dict[str, List[Tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = functions.setdefault(head.group(1), [])
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins and current is not None:
            current.append((int(ins.group(1), 16), ins.group(2)))
    return functions


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split(" ")[0]


def main_loop(instructions: List[Tuple[int, str]]) -> LoopStats:
    """Statistics of the innermost loop (backward branch) with the most HMMA; ties: the
    shortest. Innermost: a loop that holds another loop with HMMA (the per-peer loop around the
    plain forward's unmasked and masked tile loops) is not a candidate."""
    loops = []
    for address, text in instructions:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not target or int(target.group(1), 16) >= address:
            continue
        start = int(target.group(1), 16)
        body = [_opcode(t) for a, t in instructions if start <= a <= address]
        body = [op for op in body if op != "NOP"]
        stats = LoopStats(len(body), sum(op.startswith("HMMA") for op in body),
                          sum(op.startswith("LDSM") for op in body),
                          sum(op.startswith("BRA") for op in body),
                          sum(op.startswith(("LDL", "STL")) for op in body))
        loops.append((start, address, stats))
    best = LoopStats()
    for start, end, stats in loops:
        if any(start <= s and e <= end and (s, e) != (start, end) and inner.hmma
               for s, e, inner in loops):
            continue
        if (stats.hmma, -stats.instructions) > (best.hmma, -best.instructions):
            best = stats
    return best


# --- ptxas -v ---------------------------------------------------------------------------------

@dataclass
class PtxasInfo:
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0


def parse_ptxas(log: str) -> Dict[str, PtxasInfo]:
    infos: Dict[str, PtxasInfo] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line)
        if entry:
            current = infos.setdefault(entry.group(1), PtxasInfo())
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current.spill_stores, current.spill_loads = map(int, spills.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_smem = int(smem.group(1)) if smem else 0
    return infos


def blocks_per_sm(limits: ArchLimits, registers: int, threads: int, smem: int) -> int:
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp, 256 at a time
    by_regs = limits.registers_per_sm // (regs_per_warp * warps)
    by_smem = limits.smem_per_sm // (smem + limits.smem_reserved_per_block)
    by_threads = limits.threads_per_sm // threads
    return max(0, min(by_regs, by_smem, by_threads, limits.blocks_per_sm))


# --- compiling --------------------------------------------------------------------------------

def compile_cubin(source: Path, arch: str, out_dir: Path, includes: List[Path],
                  extra_flags: Tuple[str, ...] = ()) -> Tuple[Path, str]:
    cubin = out_dir / f"{source.stem}.{arch}.cubin"
    command = [tool("nvcc"), "-cubin", "-gencode", ARCHS[arch].gencode, *NVCC_FLAGS,
               *extra_flags, "-Xptxas", "-v", *[f"-I{i}" for i in includes], "-o", str(cubin),
               str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cuda_compile_report: nvcc failed on {source} for {arch}:\n"
                         f"{done.stderr[-4000:]}")
    return cubin, done.stderr + done.stdout


def run_host_probe(source_text: str, out_dir: Path, includes: List[Path], name: str,
                   extra_flags: Tuple[str, ...] = ()) -> str:
    """Compile and run a host program (constants of the headers; no GPU needed)."""
    source = out_dir / f"{name}.cu"
    source.write_text(source_text)
    binary = out_dir / name
    command = [tool("nvcc"), "-gencode", ARCHS["sm80"].gencode, *NVCC_FLAGS, *extra_flags,
               *[f"-I{i}" for i in includes], "-o", str(binary), str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cuda_compile_report: the host probe {name} failed:\n"
                         f"{done.stderr[-4000:]}")
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout


# the launchers' dynamic shared memory and threads per block, per kernel template and head dim
OURS_PROBE = r"""
#include <cstdio>
#include "backward.cuh"
#include "forward.cuh"
#include "launch.h"
using namespace peer_attention;
template <int D, typename T> void print(const char* dtype) {
  if constexpr (D <= 128) {
    std::printf("forward_plain_kernel %d %s %d %d\n", D, dtype, ForwardPlainConfig<D>::template smem_bytes<T>(), kThreads);
    std::printf("forward_plain_kernel:features %d %s %d %d\n", D, dtype, ForwardPlainConfig<D>::template smem_bytes<T, true>(), kThreads);
    std::printf("bwd_fused_kernel %d %s %d %d\n", D, dtype, FusedBwdConfig<D>::template smem_bytes<T>(), kThreads);
  }
  std::printf("forward_kernel %d %s %d %d\n", D, dtype, ForwardConfig<D>::template smem_bytes<T>(), kThreads);
  std::printf("dq_kernel %d %s %d %d\n", D, dtype, DqConfig<D>::template smem_bytes<T>(), kThreads);
  std::printf("dkdv_kernel %d %s %d %d\n", D, dtype, DkdvConfig<D>::template smem_bytes<T>(), kThreads);
}
template <int I = 0> void all() {
  constexpr int n = sizeof(kHeadDims) / sizeof(kHeadDims[0]);
  if constexpr (I < n) {
    print<kHeadDims[I], __half>("fp16");
    print<kHeadDims[I], __nv_bfloat16>("bf16");
    all<I + 1>();
  }
}
int main() { all(); }
"""

FA2_TRAITS = "Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::half_t>"
FA2_KERNEL = f"""#include "flash_fwd_launch_template.h"
// FlashAttention-2's hd128 fp16 sm_80 forward, non-causal, no dropout/alibi/softcap, even M/N/K
template __global__ void FLASH_NAMESPACE::flash_fwd_kernel<{FA2_TRAITS}, false, false, false,
    false, true, true, false, false>(KERNEL_PARAM_MODIFIER const Flash_fwd_params params);
"""
FA2_PROBE = f"""#include <cstdio>
#include "kernel_traits.h"
int main() {{ std::printf("%d %d\\n", int({FA2_TRAITS}::kSmemSize), int({FA2_TRAITS}::kNThreads)); }}
"""
# FlashAttention-2's hd128 fp16 backward on sm_80 (>= 144 KiB shared memory): one fused loop
# over 64-query tiles of a 128-key block, 8 warps, dQ by float32 atomics; non-causal, no
# dropout/alibi/softcap/local, even M/N and K
FA2_BWD_TRAITS = "Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2, false, false, cutlass::half_t>"
FA2_BWD_KERNEL = f"""#include "flash_bwd_launch_template.h"
template __global__ void FLASH_NAMESPACE::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<
    {FA2_BWD_TRAITS}, false, false, false, false, true, true, false>(
    KERNEL_PARAM_MODIFIER const Flash_bwd_params params);
"""
FA2_BWD_PROBE = f"""#include <cstdio>
#include "kernel_traits.h"
int main() {{ std::printf("%d %d\\n", int({FA2_BWD_TRAITS}::kSmemSize1colblock),
                          int({FA2_BWD_TRAITS}::kNThreads)); }}
"""


@dataclass
class Row:
    arch: str
    kernel: str
    head_dim: int
    dtype: str
    threads: int
    registers: int
    spill_bytes: int
    smem: int
    smem_limit: int
    blocks_per_sm: int
    loop: Dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.smem <= self.smem_limit


def demangled(names: List[str]) -> Dict[str, str]:
    """Readable names (cu++filt, else binutils' c++filt: the same Itanium mangling)."""
    filt = next((f for f in ("cu++filt", "c++filt") if shutil.which(f)), None)
    if not names or filt is None:
        return {n: n for n in names}
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = done.stdout.splitlines() if done.returncode == 0 else names
    return dict(zip(names, lines))


# the switches of forward_plain_kernel<D, T, kGate, kBias, kPeer>, by position
PLAIN_FORWARD_SWITCHES = ("gate", "bias", "peer")


def _describe(name: str) -> Tuple[str, int, str]:
    """(kernel, head dim, dtype) of a demangled instantiation name; the kernel name carries its
    feature switches ("forward_kernel plain" for kFeatures = false, "... features" for true,
    "... features+mask" when kMask is true too; forward_plain_kernel's by name: "gate",
    "gate+bias", "bias+peer", ..., and none for the plain path)."""
    found = re.search(r"(\w+)<(\d+), ([\w:]+)((?:, (?:true|false))*)>", name)
    if found:
        kernel = found.group(1)
        switches = [v == "true" for v in re.findall(r"true|false", found.group(4))]
        if kernel == "forward_plain_kernel":
            on = [n for n, v in zip(PLAIN_FORWARD_SWITCHES, switches) if v]
            kernel += f" {'+'.join(on)}" if on else ""
        elif switches:
            kernel += " features" if switches[0] else " plain"
            if len(switches) > 1 and switches[1]:
                kernel += "+mask"
        return kernel, int(found.group(2)), DTYPE_NAMES.get(found.group(3), found.group(3))
    return re.sub(r"\(.*", "", name).split("::")[-1], 0, "-"


def _launch_key(kernel: str) -> str:
    """The host probe's name for a row's launch bytes: forward_plain_kernel with any switch on
    asks for its PeerTerms too ("forward_plain_kernel:features")."""
    base = kernel.split()[0]
    return f"{base}:features" if base == "forward_plain_kernel" and " " in kernel else base


def _loop_dict(stats: LoopStats) -> Dict[str, float]:
    return dict(instructions=stats.instructions, hmma=stats.hmma, ldsm=stats.ldsm,
                branches=stats.branches, local=stats.local,
                per_hmma=round(stats.per_hmma, 2) if stats.per_hmma else None,
                ldsm_per_hmma=round(stats.ldsm_per_hmma, 2) if stats.ldsm_per_hmma else None)


def rows_of_cubin(cubin: Path, log: str, arch: str,
                  launch: Dict[Tuple[str, int, str], Tuple[int, int]]) -> List[Row]:
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    functions = parse_sass(sass)
    ptxas = parse_ptxas(log)
    names = demangled(sorted(functions))
    limits = ARCHS[arch]
    rows = []
    for mangled, body in sorted(functions.items(), key=lambda kv: names.get(kv[0], kv[0])):
        kernel, dim, dtype = _describe(names.get(mangled, mangled))
        info = ptxas.get(mangled, PtxasInfo())
        dynamic, threads = launch.get((_launch_key(kernel), dim, dtype), (0, 128))
        smem = dynamic + info.static_smem
        rows.append(Row(arch, kernel, dim, dtype, threads, info.registers,
                        info.spill_stores + info.spill_loads, smem, limits.smem_per_block,
                        blocks_per_sm(limits, info.registers, threads, smem),
                        _loop_dict(main_loop(body))))
    return rows


def _sources(head_dims: Optional[List[int]]) -> List[Path]:
    files = sorted(CSRC.glob("fwd_hdim*.cu")) + sorted(CSRC.glob("bwd_hdim*.cu"))
    if head_dims:
        files = [f for f in files if int(re.search(r"hdim(\d+)", f.name).group(1)) in head_dims]
    return files


def report_ours(archs: List[str], head_dims: Optional[List[int]], dtypes: Optional[List[str]],
                work: Path, jobs: int) -> List[Row]:
    if not CSRC.is_dir():
        raise SystemExit(f"cuda_compile_report: {CSRC} not found (run from a checkout)")
    probe = run_host_probe(OURS_PROBE, work, [CSRC], "ours_probe")
    launch = {}
    for line in probe.split("\n"):
        if line.strip():
            kernel, dim, dtype, smem, threads = line.split()
            launch[(kernel, int(dim), dtype)] = (int(smem), int(threads))
    tasks = [(src, arch) for arch in archs for src in _sources(head_dims)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        compiled = list(pool.map(lambda t: (t[1], *compile_cubin(t[0], t[1], work, [CSRC])),
                                 tasks))
    rows = []
    for arch, cubin, log in compiled:
        rows += rows_of_cubin(cubin, log, arch, launch)
    if dtypes:
        rows = [r for r in rows if r.dtype in dtypes]
    return rows


def _flash_attn_csrc(path: Path, work: Path) -> Path:
    if path.is_file():  # the .tar.gz itself
        with tarfile.open(path) as archive:
            archive.extractall(work / "flash_attn_sdist")
        found = list((work / "flash_attn_sdist").glob("*/csrc"))
        if not found:
            raise SystemExit(f"cuda_compile_report: no csrc/ in {path}")
        return found[0]
    for candidate in (path / "csrc", path):
        if (candidate / "flash_attn" / "src" / "flash_fwd_kernel.h").is_file():
            return candidate
    raise SystemExit(f"cuda_compile_report: {path} is not a flash-attn source tree "
                     "(expected csrc/flash_attn/src/flash_fwd_kernel.h)")


def _torch_includes() -> List[Path]:
    """FlashAttention's headers include ATen (philox) and c10: torch's include folders."""
    sys.path.insert(0, str(ROOT))
    from build_cuda import find_cuda_home, nvidia_pip_include_dirs

    home = find_cuda_home()
    if home is not None:  # torch reads it at import, else it guesses (and warns)
        os.environ.setdefault("CUDA_HOME", str(home))
    from torch.utils.cpp_extension import include_paths

    return [Path(p) for p in include_paths()] + [Path(p) for p in nvidia_pip_include_dirs()]


def report_flash_attn(path: Path, work: Path) -> List[Row]:
    """FlashAttention-2's hd128 fp16 sm_80 forward and backward kernels, compiled like ours."""
    csrc = _flash_attn_csrc(path, work)
    includes = [csrc / "flash_attn" / "src", csrc / "cutlass" / "include"] + _torch_includes()
    extra = ("--expt-extended-lambda",)
    rows = []
    for name, kernel, probe, label in (
            ("fa2_fwd_hdim128_fp16", FA2_KERNEL, FA2_PROBE, "FA2 flash_fwd_kernel 128x64 w4"),
            ("fa2_bwd_hdim128_fp16", FA2_BWD_KERNEL, FA2_BWD_PROBE,
             "FA2 flash_bwd_dq_dk_dv 64x128 w8")):
        source = work / f"{name}.cu"
        source.write_text(kernel)
        cubin, log = compile_cubin(source, "sm80", work, includes, extra)
        smem, threads = map(int, run_host_probe(probe, work, includes, f"{name}_probe",
                                                extra).split())
        (row,) = rows_of_cubin(cubin, log, "sm80", {})
        row.kernel, row.head_dim, row.dtype, row.threads = label, 128, "fp16", threads
        row.smem += smem
        row.blocks_per_sm = blocks_per_sm(ARCHS["sm80"], row.registers, threads, row.smem)
        rows.append(row)
    return rows


def _loop_instructions(rows: List[Row], kernel: str) -> Optional[int]:
    found = [r for r in rows if r.arch == "sm80" and r.head_dim == 128 and r.dtype == "fp16"
             and r.kernel == kernel]
    return found[0].loop.get("instructions") if found else None


def backward_per_unit(rows: List[Row]) -> Optional[float]:
    """Our split backward's static loop instructions per unit of work against FlashAttention-2's,
    hd128 fp16 sm_80 (plain path): a unit is a 64-query x 64-key tile pair (its five products).
    Our dQ and dK/dV loops each cover one unit per block of 4 warps; FA2's fused loop covers two
    (64 x 128) per block of 8 warps: (dq + dkdv) * 4 / (fa2 * 8 / 2) = (dq + dkdv) / fa2."""
    dq, dkdv = (_loop_instructions(rows, k) for k in ("dq_kernel plain", "dkdv_kernel plain"))
    fa2 = _loop_instructions(rows, "FA2 flash_bwd_dq_dk_dv 64x128 w8")
    return round((dq + dkdv) / fa2, 2) if dq and dkdv and fa2 else None


def fused_backward_per_unit(rows: List[Row]) -> Optional[float]:
    """The same for our fused backward (bwd_fused_kernel, the plain path's backward where atomics
    are allowed): one unit per loop iteration of a 4-warp block, so fused * 4 / (fa2 * 8 / 2) =
    fused / fa2."""
    fused = _loop_instructions(rows, "bwd_fused_kernel")
    fa2 = _loop_instructions(rows, "FA2 flash_bwd_dq_dk_dv 64x128 w8")
    return round(fused / fa2, 2) if fused and fa2 else None


HEADER = ("| arch | kernel | D | dtype | threads | regs | spill B | smem B / limit | blocks/SM "
          "| loop instrs | HMMA | LDSM | instrs/HMMA | LDSM/HMMA | branches | loop LDL+STL |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: Row) -> str:
    loop = r.loop
    fit = "" if r.fits else " (does not fit)"
    return (f"| {r.arch} | {r.kernel} | {r.head_dim} | {r.dtype} | {r.threads} | {r.registers} "
            f"| {r.spill_bytes} | {r.smem} / {r.smem_limit}{fit} | {r.blocks_per_sm} "
            f"| {loop.get('instructions', '-')} | {loop.get('hmma', '-')} | {loop.get('ldsm', '-')} "
            f"| {loop.get('per_hmma') or '-'} | {loop.get('ldsm_per_hmma') or '-'} "
            f"| {loop.get('branches', '-')} | {loop.get('local', '-')} |")


def _arch(text: str) -> str:
    key = text.lower().replace("_", "")
    key = key if key.startswith("sm") else f"sm{key}"
    if key == "sm90":
        key = "sm90a"
    if key not in ARCHS:
        raise argparse.ArgumentTypeError(f"--arch: expected one of {sorted(ARCHS)}, got {text!r}")
    return key


def main(argv=None) -> List[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=_arch, action="append",
                        help=f"one of {', '.join(ARCHS)} (repeatable; default sm80)")
    parser.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")],
                        default=None, help="e.g. 128 or 64,128 (default: every kernel)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                        help="fp16, bf16 or both (default both)")
    parser.add_argument("--flash-attn", type=Path, default=None,
                        help="flash-attn 2.8.3 sdist (.tar.gz or unpacked): its hd128 fp16 sm80 "
                             "forward as the yardstick")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel nvcc processes")
    parser.add_argument("--keep", type=Path, default=None, help="keep the cubins in this folder")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    opts = parser.parse_args(argv)
    archs = opts.arch or ["sm80"]
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = report_ours(archs, opts.head_dims, opts.dtypes, work, opts.jobs)
        if opts.flash_attn is not None:
            rows += report_flash_attn(opts.flash_attn, work)
    print(HEADER)
    for r in rows:
        print(format_row(r))
    ratio = backward_per_unit(rows)
    if ratio is not None:
        print(f"\nbackward (hd128 fp16 sm80, plain): (dq + dkdv loop instructions) per unit of "
              f"work / FlashAttention-2's = {ratio}")
    fused = fused_backward_per_unit(rows)
    if fused is not None:
        print(f"fused backward (hd128 fp16 sm80): bwd_fused_kernel loop instructions per unit of "
              f"work / FlashAttention-2's = {fused}")
    if opts.json:
        print(json.dumps([dict(asdict(r), fits=r.fits) for r in rows]))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
