#!/usr/bin/env python3
"""Static evidence, without a GPU, of how well the CUDA kernels of csrc/cuda use the SM (issue 15, items 6-7).

1. Resources: every kernel instantiation of every csrc/cuda/*.cu is compiled to a cubin for each --arch
   with `ptxas -v`; the table gives registers per thread, spill bytes, static and dynamic shared memory
   and the resulting occupancy (blocks and warps per SM).
2. Main loops: the SASS of every tensor-core kernel (one with HMMA instructions) and of FlashAttention-2's
   forward and backward kernels, as they ship compiled in torch's CUDA wheel, for the same head dim and
   dtype. The main loop is the innermost loop (a backward branch) with the most HMMA instructions; the
   table counts, in its body, HMMA, shared-memory traffic, global loads, barriers and local memory per HMMA.

Reproduce (from the repository root, with the CUDA venv of scripts/ci_cuda_build.sh plus the
nvidia-cuda-cuobjdump wheel, a CUDA 13 toolkit with nvcc on PATH, no GPU needed):

    .venv-cuda/bin/python scripts/cuda_static_evidence.py --arch 80 90 --out build/static-evidence/report.md

`--ref REV` analyses the kernels of a git revision (extracted to build/static-evidence/tree-<sha>/)
instead of the working tree, e.g. `--ref HEAD` while the working tree is being edited; `--sources REGEX`
keeps the .cu files whose name matches (each nvcc job takes minutes: `--sources '_mma_'` for the
tensor-core kernels only). The table of docs/cuda.md ("Static evidence") lists its exact command.

Dynamic shared memory is chosen at launch, so ptxas cannot report it: give it per kernel with
`--smem REGEX=BYTES` (REGEX is searched in the demangled kernel name; the first match wins). Kernels
without one get occupancy from registers and static shared memory alone (marked "regs only").
FlashAttention-2's sizes are built in (FA2_DYNAMIC_SMEM). Outputs are cached in build/static-evidence/:
a .cu is recompiled only when it, a header under csrc/ or the compile command is newer than its cubin.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
OUT_DIR = os.path.join(ROOT, "build", "static-evidence")
THREADS_PER_BLOCK = 128  # kThreads of csrc/cuda/kernel_traits.cuh; FA2's own counts are in FA2_PICKS


@dataclasses.dataclass(frozen=True)
class SmLimits:
    regs_per_sm: int = 65536
    reg_alloc_per_warp: int = 256  # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    smem_per_sm: int = 0
    smem_per_block: int = 0  # the opt-in maximum of one block
    smem_reserved_per_block: int = 1024  # the driver's share of every block's shared memory (sm80+)


SM_LIMITS = {
    80: SmLimits(smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: SmLimits(smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}

# FlashAttention-2 as torch 2.14.1 runs it on A100/H100 (aten/src/ATen/native/transformers/cuda/flash_attn/
# flash_{fwd,bwd}_launch_template.h): no dropout, not causal, no local window, no ALiBi, sequence lengths
# and head dim that fill the tiles (Is_even_MN, Is_even_K), no softcap, no returned softmax. The traits are
# the ones it dispatches to for that case on GPUs with >= 144 KiB of shared memory per block.
# (kind, head dim) -> (kernel traits as demangled, template flags after them, threads per block).
FA2_PICKS = {
    ("fwd", 64): ("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, {T}>",
                  "false, false, false, false, true, true, false, false>", 128),
    ("fwd", 128): ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, {T}>",
                   "false, false, false, false, true, true, false, false>", 128),
    ("bwd", 64): ("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 4, 4, 4, false, false, {T}>",
                  "false, false, false, false, true, true, false>", 256),
    ("bwd", 128): ("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2, false, false, {T}>",
                   "false, false, false, false, true, true, false>", 256),
}
# Their dynamic shared memory (kSmemSize of FA2's kernel_traits.h): fwd Q + K + V tiles; bwd Q and dO
# (double-buffered, 3 tiles), K, V, dS, and the larger of P and dQ.
FA2_DYNAMIC_SMEM = {("fwd", 64): 48 * 1024, ("fwd", 128): 64 * 1024, ("bwd", 64): 144 * 1024, ("bwd", 128): 144 * 1024}
FA2_DTYPES = {"fp16": "half_t", "bf16": "bfloat16_t"}  # cutlass:: types, as short_name() spells them


# ---------------------------------------------------------------------------------------------- tools

@dataclasses.dataclass
class Tools:
    nvcc: str
    cuobjdump: str
    cxxfilt: str
    torch_lib_dir: str
    nvcc_flags: list


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def find_cuda_home() -> str:
    """The toolkit root: $CUDA_HOME, else the real bin directory of the nvcc on PATH (it may be a wrapper
    script, so ask `nvcc --dryrun`, which names it as _HERE_), as scripts/ci_cuda_build.sh does."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if not nvcc:
        sys.exit("cuda_static_evidence: no nvcc on PATH and no CUDA_HOME")
    dry = run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"])
    here = re.search(r"^#\$ _HERE_=(.*)$", dry.stdout + dry.stderr, re.M)
    return os.path.dirname(here.group(1).strip()) if here else os.path.dirname(os.path.dirname(nvcc))


def find_cuobjdump(cuda_home: str) -> str:
    """The toolkit's cuobjdump, else the one of the nvidia-cuda-cuobjdump wheel (site-packages/nvidia/cu*/bin)."""
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")]
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "cu*", "bin", "cuobjdump")), reverse=True)
            candidates += glob.glob(os.path.join(base, "cuda_cuobjdump", "bin", "cuobjdump"))
    except ImportError:
        pass
    found = [c for c in candidates if os.access(c, os.X_OK)] + [shutil.which("cuobjdump") or ""]
    if not found[0]:
        sys.exit("cuda_static_evidence: no cuobjdump (pip install nvidia-cuda-cuobjdump in this venv)")
    return found[0]


def use_git_revision(rev: str) -> str:
    """Points CSRC at csrc/ of `rev` (extracted once with git archive) and returns a label for the caches."""
    global CSRC
    sha = run(["git", "-C", ROOT, "rev-parse", "--short", rev]).stdout.strip() or sys.exit(f"cuda_static_evidence: no revision {rev!r}")
    tree = os.path.join(OUT_DIR, f"tree-{sha}")
    if not os.path.isdir(tree):
        os.makedirs(tree + ".tmp", exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha, "csrc", "mha_ext/_sources.py"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree + ".tmp"], input=archive, check=True)
        os.rename(tree + ".tmp", tree)
    CSRC = os.path.join(tree, "csrc")
    return f"ours-{sha}"


def torch_compile_flags() -> tuple[list, str]:
    """The flags torch's BuildExtension gives nvcc for mha_ext._C (setup.py), minus host-only ones:
    torch's common nvcc flags, C++20, the extension defines, mha_ext's own nvcc flags, include paths."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        sys.exit(f"cuda_static_evidence: torch {torch.__version__} is a CPU build; run with .venv-cuda/bin/python")
    spec = importlib.util.spec_from_file_location("mha_ext_sources", os.path.join(os.path.dirname(CSRC), "mha_ext", "_sources.py"))
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    flags = list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "-DTORCH_EXTENSION_NAME=_C",
                                                      "-DTORCH_API_INCLUDE_EXTENSION_H"]
    # (setup.py's -DMHA_EXT_CUDA_ARCHS="8.0;9.0" is left out: only host code reads it, and nvcc runs its
    # steps through a shell, where the ';' would split the command.)
    flags += sources.nvcc_flags()
    flags += [f"-I{d}" for d in sources.include_dirs()]
    includes = cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_path("include")]
    flags += [a for d in includes for a in ("-isystem", d)]
    # torch's CUDA headers include cuBLAS & co, which come with the nvidia-* wheels (as in ci_cuda_build.sh).
    import nvidia
    flags += [a for d in glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "include")) for a in ("-isystem", d)]
    return flags, os.path.join(os.path.dirname(torch.__file__), "lib")


def find_tools() -> Tools:
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home  # before torch's cpp_extension guesses it (wrongly, from a wrapper nvcc)
    flags, torch_lib = torch_compile_flags()
    return Tools(nvcc=os.path.join(cuda_home, "bin", "nvcc"), cuobjdump=find_cuobjdump(cuda_home),
                 cxxfilt=shutil.which("c++filt") or sys.exit("cuda_static_evidence: no c++filt (binutils)"),
                 torch_lib_dir=torch_lib, nvcc_flags=flags)


def demangle(names: list, tools: Tools) -> dict:
    if not names:
        return {}
    out = run([tools.cxxfilt], input="\n".join(names) + "\n").stdout.splitlines()
    return dict(zip(names, out))


# ----------------------------------------------------------------------------------- our kernels

def newest_source_mtime(cu: str) -> float:
    """A .cu depends on itself and (conservatively) on every header under csrc/."""
    headers = [p for ext in ("cuh", "h", "hpp") for p in glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)]
    return max(os.path.getmtime(p) for p in [cu] + headers)


def compile_cubin(cu: str, arch: int, tools: Tools, cache: str = "ours") -> tuple[str | None, str]:
    """Compiles the device code of `cu` for sm_<arch> to a cubin with `ptxas -v`, unless the cached cubin
    is newer than the sources and was built by the same command. Returns (cubin or None, ptxas log)."""
    stem = os.path.splitext(os.path.relpath(cu, os.path.join(CSRC, "cuda")))[0].replace(os.sep, "__")
    base = os.path.join(OUT_DIR, cache, f"{stem}.sm{arch}")
    cubin, log, cmd_file = base + ".cubin", base + ".ptxas.txt", base + ".cmd"
    cmd = [tools.nvcc, *tools.nvcc_flags, "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-o", cubin, os.path.abspath(cu)]
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if (os.path.exists(cubin) and os.path.exists(log) and os.path.exists(cmd_file)
            and os.path.getmtime(cubin) >= newest_source_mtime(cu) and open(cmd_file).read() == json.dumps(cmd)):
        return cubin, open(log).read()
    print(f"  nvcc {os.path.relpath(cu, ROOT)} sm_{arch}", file=sys.stderr, flush=True)
    result = run(cmd, cwd=ROOT)
    with open(log, "w") as f:
        f.write(result.stderr + result.stdout)
    if result.returncode != 0:
        for path in (cubin, cmd_file):
            if os.path.exists(path):
                os.remove(path)
        return None, result.stderr + result.stdout
    with open(cmd_file, "w") as f:
        f.write(json.dumps(cmd))
    return cubin, result.stderr + result.stdout


def parse_ptxas_log(text: str, arch: int) -> dict:
    """ptxas -v lines per entry function -> {mangled: {regs, spill_store, spill_load, stack, static_smem}}."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
        if m:
            current = m.group(1) if int(m.group(2)) == arch else None
            if current:
                kernels[current] = {"regs": 0, "spill_store": 0, "spill_load": 0, "stack": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_store=int(m.group(2)), spill_load=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[current]["static_smem"] = int(smem.group(1)) if smem else 0
    return kernels


def sass_by_function(cubin: str, tools: Tools, function: str | None = None) -> dict:
    """`cuobjdump -sass` of a cubin, split per function: {mangled: [SASS lines]}."""
    cmd = [tools.cuobjdump, "-sass"] + (["-fun", function] if function else []) + [cubin]
    functions, current = {}, None
    for line in run(cmd).stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    return functions


# --------------------------------------------------------------------------------------- SASS analysis

@dataclasses.dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. HMMA.16816.F32
    operands: str


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")


def parse_sass(lines: list) -> list:
    """`/*0a10*/  @P0 HMMA.16816.F32 R4, R8, R12, R4 ;  /* 0x... */` -> Instr(0xa10, 'HMMA.16816.F32', ...)."""
    instrs = []
    for line in lines:
        m = SASS_LINE.search(line)
        if m:
            instrs.append(Instr(int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return instrs


def branch_target(instr: Instr) -> int | None:
    if instr.opcode.split(".")[0] not in ("BRA", "JMP"):
        return None
    addresses = re.findall(r"0x([0-9a-f]+)", instr.operands)
    return int(addresses[-1], 16) if addresses else None


def hmma_equivalents(opcode: str) -> float:
    """An HMMA in units of m16n8k16 (2048 multiply-adds): HMMA.1688 = 0.5, HMMA.884 = 0.125."""
    m = re.match(r"HMMA\.(\d+)", opcode)
    shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}.get(m.group(1) if m else "")
    return shape[0] * shape[1] * shape[2] / 2048 if shape else 1.0


def loops(instrs: list) -> list:
    """Every loop as (start, end) addresses: the target and the last of the backward branches to it."""
    ends = {}
    for ins in instrs:
        target = branch_target(ins)
        if target is not None and target < ins.addr:
            ends[target] = max(ends.get(target, 0), ins.addr)
    return sorted(ends.items())


def find_main_loop(instrs: list) -> tuple | None:
    """Among the innermost HMMA loops (loops holding HMMA instructions and no other loop that holds any:
    not an outer loop around them, e.g. a grid-stride loop over work items, or one around the two loops
    of a kernel that peels its masking steps off its main loop), the one with the most HMMA; among those
    with as many, the smallest (the steady-state loop: masking steps add instructions). None when no
    loop holds an HMMA."""
    def hmma_in(start, end):
        return sum(1 for i in instrs if start <= i.addr <= end and i.opcode.startswith("HMMA"))

    hmma_loops = [(start, end) for start, end in loops(instrs) if hmma_in(start, end)]
    innermost = [(s, e) for s, e in hmma_loops
                 if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in hmma_loops)]
    best = None
    for start, end in innermost:
        key = (hmma_in(start, end), -(end - start))
        if best is None or key > best[0]:
            best = (key, (start, end))
    return best[1] if best else None


def lane_bytes(opcode: str, default: int = 4) -> int:
    """Bytes per lane of an LDS/STS/LDG/LDGSTS/STG from its width modifier (.U8 .S16 .64 .128, 32 bits by default)."""
    for mod in reversed(opcode.split(".")[1:]):
        if mod in ("U8", "S8"):
            return 1
        if mod in ("U16", "S16"):
            return 2
        if mod in ("32", "64", "128"):
            return int(mod) // 8
    return default


def ldsm_bytes(opcode: str) -> int:
    """LDSM.16.M88.4 / .MT88.4 loads four 8x8 16-bit matrices per warp (512 B); .2 two; no count one."""
    count = opcode.split(".")[-1]
    return 128 * (int(count) if count.isdigit() else 1)


@dataclasses.dataclass
class LoopStats:
    instructions: int = 0
    hmma: int = 0
    hmma_equiv: float = 0.0
    ldsm: Counter = dataclasses.field(default_factory=Counter)
    lds: int = 0
    smem_load_bytes: int = 0
    sts: int = 0
    sts_bytes: int = 0
    ldg: int = 0
    ldgsts: int = 0
    bar: int = 0
    ldl: int = 0
    stl: int = 0
    ld_generic: int = 0  # LD/ST through generic addresses: shared memory when the compiler could not tell
    st_generic: int = 0
    other: int = 0
    inner_loops: int = 0
    hmma_shapes: Counter = dataclasses.field(default_factory=Counter)

    def per_hmma(self, value: float) -> float:
        return value / self.hmma_equiv if self.hmma_equiv else math.nan


def count_loop(instrs: list, start: int, end: int) -> LoopStats:
    """Classifies the instructions of the loop body [start, end] (NOP padding excluded)."""
    s = LoopStats()
    body = [i for i in instrs if start <= i.addr <= end and i.opcode.split(".")[0] != "NOP"]
    s.inner_loops = sum(1 for a, b in loops(body) if (a, b) != (start, end))
    for ins in body:
        op = ins.opcode.split(".")[0]
        s.instructions += 1
        if op == "HMMA":
            s.hmma += 1
            s.hmma_equiv += hmma_equivalents(ins.opcode)
            s.hmma_shapes[ins.opcode] += 1
        elif op == "LDSM":
            s.ldsm[ins.opcode] += 1
            s.smem_load_bytes += ldsm_bytes(ins.opcode)
        elif op == "LDS":
            s.lds += 1
            s.smem_load_bytes += 32 * lane_bytes(ins.opcode)
        elif op == "STS":
            s.sts += 1
            s.sts_bytes += 32 * lane_bytes(ins.opcode)
        elif op == "LDG":
            s.ldg += 1
        elif op == "LDGSTS":
            s.ldgsts += 1
        elif op == "BAR":
            s.bar += 1
        elif op == "LDL":
            s.ldl += 1
        elif op == "STL":
            s.stl += 1
        elif op == "LD":
            # Counted as shared-memory traffic: in these kernels generic loads read shared tiles (WMMA's
            # load_matrix_sync compiles to them); global reads go through LDG.
            s.ld_generic += 1
            s.smem_load_bytes += 32 * lane_bytes(ins.opcode)
        elif op == "ST":
            s.st_generic += 1
        else:
            s.other += 1
    return s


# ------------------------------------------------------------------------------------ kernel naming

def without_parameters(demangled: str) -> str:
    """The demangled name up to its parameter list: the first '(' outside the template arguments (anonymous
    namespaces dropped; enum template arguments demangle as casts, '(KeyGrads)0', inside them)."""
    name = demangled.replace("(anonymous namespace)::", "")
    depth = 0
    for i, c in enumerate(name):
        depth += {"<": 1, ">": -1}.get(c, 0)
        if c == "(" and depth == 0:
            return name[:i]
    return name


def kernel_dtype(demangled: str) -> str:
    for pattern, name in ((r"c10::Half|__half\b|cutlass::half_t", "fp16"), (r"c10::BFloat16|__nv_bfloat16|cutlass::bfloat16_t", "bf16"),
                          (r"\bdouble\b", "fp64"), (r"\bfloat\b", "fp32")):
        if re.search(pattern, without_parameters(demangled)):
            return name
    return "?"


def kernel_head_dim(demangled: str) -> int | None:
    """The head-dim bucket: the first template argument that is 64, 128 or 256."""
    m = re.search(r"[<,]\s*(64|128|256)\s*[,>]", without_parameters(demangled))
    return int(m.group(1)) if m else None


def kernel_direction(demangled: str) -> str:
    return "bwd" if re.search(r"grad|backward|bwd", without_parameters(demangled).split("<")[0]) else "fwd"


def short_name(demangled: str) -> str:
    """`void mha_ext::cuda::forward_mma_kernel<c10::Half, mha_ext::cuda::ForwardMmaTraits<64, false>, false>(...)`
    -> `forward_mma_kernel<Half, ForwardMmaTraits<64, false>, false>`."""
    name = re.sub(r"^void ", "", without_parameters(demangled))
    name = re.sub(r"\b(mha_ext::cuda::|pytorch_flash::|c10::|cutlass::)", "", name)
    name = re.sub(r", Flash_kernel_traits<[^<>]*>", "", name)
    # backward_mma_kernel.cuh's KeyGrads, by name.
    name = re.sub(r"\(KeyGrads\)(\d)", lambda m: ("kBoth", "kValue", "kKey")[int(m.group(1))], name)
    return re.sub(r"\s+>", ">", name)


# --------------------------------------------------------------------------------------- FA2 cubins

def find_fa2_library(tools: Tools) -> str:
    """torch's shared library that holds FlashAttention-2 (libtorch_cuda.so in the 2.x wheels)."""
    libs = sorted(glob.glob(os.path.join(tools.torch_lib_dir, "libtorch_cuda*.so")), key=os.path.getsize, reverse=True)
    if not libs:
        sys.exit(f"cuda_static_evidence: no libtorch_cuda*.so in {tools.torch_lib_dir}")
    return libs[0]


def fa2_cubins(arch: int, tools: Tools) -> dict:
    """{(kind, head dim, dtype): (cubin path, mangled name)} of the FA2_PICKS kernels for sm_<arch>.
    Extracting every cubin of an arch from the 500 MB library takes a while (and ~700 MB of temporary
    disk), so the few cubins that hold the picks are kept in build/static-evidence/fa2 with an index."""
    lib = find_fa2_library(tools)
    cache_dir = os.path.join(OUT_DIR, "fa2")
    index_file = os.path.join(cache_dir, f"index.sm{arch}.json")
    stamp = f"{lib}:{os.path.getsize(lib)}:{os.path.getmtime(lib)}:{json.dumps([sorted(FA2_PICKS.items()), FA2_DTYPES])}"
    if os.path.exists(index_file):
        index = json.load(open(index_file))
        if index.get("stamp") == stamp:
            return {tuple(json.loads(k)): tuple(v) for k, v in index["picks"].items()}
    print(f"  extracting the sm_{arch} cubins of {os.path.basename(lib)} (once)", file=sys.stderr, flush=True)
    os.makedirs(cache_dir, exist_ok=True)
    wanted = {}
    for (kind, hdim), (traits, flags, _threads) in FA2_PICKS.items():
        for dtype, ctype in FA2_DTYPES.items():
            wanted[f"{traits.format(T=ctype)}, {flags}"] = (kind, hdim, dtype)
    picks = {}
    with tempfile.TemporaryDirectory(dir=OUT_DIR) as tmp:
        run([tools.cuobjdump, "-xelf", f"sm_{arch}.cubin", lib], cwd=tmp)
        for cubin in sorted(os.listdir(tmp)):
            data = open(os.path.join(tmp, cubin), "rb").read()
            if b"flash_fwd_kernel" not in data and b"flash_bwd_dq_dk_dv" not in data:
                continue
            mangled = sorted(set(m.decode() for m in re.findall(rb"\.text\.(_Z[\w]*flash_(?:fwd_kernel|bwd_dq_dk_dv_loop_seqk_parallel_kernel)\w*)", data)))
            for name, dem in demangle(mangled, tools).items():
                key = wanted.get(short_name(dem))
                if key and key not in picks:
                    kept = os.path.join(cache_dir, f"sm{arch}.{cubin}")
                    shutil.copy(os.path.join(tmp, cubin), kept)
                    picks[key] = (kept, name)
    with open(index_file, "w") as f:
        json.dump({"stamp": stamp, "picks": {json.dumps(list(k)): list(v) for k, v in picks.items()}}, f, indent=1)
    return picks


def fa2_resources(cubin: str, mangled: str, tools: Tools) -> dict:
    """Registers, stack and static shared memory of a prebuilt kernel (`cuobjdump -res-usage`)."""
    text = run([tools.cuobjdump, "-res-usage", cubin]).stdout
    m = re.search(r"Function " + re.escape(mangled) + r":?\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return {"regs": 0, "spill_store": None, "spill_load": None, "stack": 0, "static_smem": 0}
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "static_smem": int(m.group(3)),
            "spill_store": None, "spill_load": None}


# ----------------------------------------------------------------------------------------- occupancy

def occupancy(regs: int, smem_bytes: int | None, arch: int, threads: int) -> dict:
    """Resident blocks per SM from registers, from shared memory (when known), and the limits."""
    lim = SM_LIMITS[arch]
    warps_per_block = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim.reg_alloc_per_warp) * lim.reg_alloc_per_warp
    by_regs = (lim.regs_per_sm // regs_per_warp) // warps_per_block
    by_limits = min(lim.max_blocks, lim.max_warps // warps_per_block)
    bounds = {"regs": by_regs, "limits": by_limits}  # "limits": 32 blocks / 64 warps per SM
    if smem_bytes is not None:
        bounds["smem"] = 0 if smem_bytes > lim.smem_per_block else lim.smem_per_sm // (smem_bytes + lim.smem_reserved_per_block)
    blocks = min(bounds.values())
    limiter = "+".join(name for name in ("limits", "smem", "regs") if bounds.get(name) == blocks)  # ties: all
    result = {"blocks": blocks, "warps": blocks * warps_per_block, "limiter": limiter}
    return result


def parse_smem_overrides(items: list) -> list:
    overrides = []
    for item in items or []:
        pattern, _, value = item.rpartition("=")
        if not pattern or not value.isdigit():
            sys.exit(f"cuda_static_evidence: --smem wants REGEX=BYTES, got {item!r}")
        overrides.append((re.compile(pattern), int(value)))
    return overrides


def dynamic_smem(demangled: str, overrides: list) -> int | None:
    for pattern, value in overrides:
        if pattern.search(demangled):
            return value
    return None


# --------------------------------------------------------------------------------------------- report

@dataclasses.dataclass
class Kernel:
    name: str  # short demangled name
    source: str  # .cu file, or "FA2 (torch)"
    arch: int
    resources: dict
    dyn_smem: int | None
    threads: int
    loop: LoopStats | None
    dtype: str
    head_dim: int | None
    direction: str


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def resources_table(kernels: list) -> str:
    rows = ["| kernel | source | arch | regs | spill st/ld B | stack B | static smem B | dyn smem B | blocks/SM | warps/SM | limited by |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        r = k.resources
        occ = occupancy(r["regs"], None if k.dyn_smem is None else r["static_smem"] + k.dyn_smem, k.arch, k.threads)
        spills = "—" if r["spill_store"] is None else f"{r['spill_store']}/{r['spill_load']}"
        limiter = occ["limiter"] if k.dyn_smem is not None else f"{occ['limiter']} (regs only)"
        rows.append(f"| `{k.name}` | {k.source} | sm_{k.arch} | {r['regs']} | {spills} | {r['stack']} | {r['static_smem']} | "
                    f"{'?' if k.dyn_smem is None else k.dyn_smem} | {occ['blocks']} | {occ['warps']} | {limiter} |")
    return "\n".join(rows)


def loop_table(kernels: list, references: dict) -> str:
    rows = ["| kernel | arch | HMMA/iter (m16n8k16 eq.) | inner loops | smem load B/HMMA | STS/HMMA | non-HMMA instr/HMMA | "
            "LDG / LDGSTS | BAR | LDL / STL | generic LD / ST | vs FA2: smem B/HMMA, instr/HMMA |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        s = k.loop
        if s is None:
            rows.append(f"| `{k.name}` | sm_{k.arch} | no loop with HMMA | | | | | | | | | |")
            continue
        ref = references.get((k.direction, k.head_dim, k.dtype, k.arch))
        if ref is not None and ref.loop is not None and ref is not k:
            ratio = (f"{s.per_hmma(s.smem_load_bytes) / ref.loop.per_hmma(ref.loop.smem_load_bytes):.2f}x, "
                     f"{s.per_hmma(s.instructions - s.hmma) / ref.loop.per_hmma(ref.loop.instructions - ref.loop.hmma):.2f}x")
        else:
            ratio = "(reference)" if ref is k else "—"
        shapes = "+".join(f"{n} {op.split('.')[1]}" for op, n in sorted(s.hmma_shapes.items()))
        rows.append(f"| `{k.name}` | sm_{k.arch} | {s.hmma} ({fmt(s.hmma_equiv, 1)}; {shapes}) | {s.inner_loops} | "
                    f"{fmt(s.per_hmma(s.smem_load_bytes))} | {fmt(s.per_hmma(s.sts), 2)} | {fmt(s.per_hmma(s.instructions - s.hmma), 2)} | "
                    f"{s.ldg} / {s.ldgsts} | {s.bar} | {s.ldl} / {s.stl} | {s.ld_generic} / {s.st_generic} | {ratio} |")
    return "\n".join(rows)


def detail_lines(kernels: list) -> str:
    """The raw counts behind the loop table, one line per kernel."""
    lines = []
    for k in kernels:
        s = k.loop
        if s is None:
            continue
        ldsm = ", ".join(f"{n} {op}" for op, n in sorted(s.ldsm.items())) or "no LDSM"
        lines.append(f"- `{k.name}` sm_{k.arch}: {s.instructions} instructions, {s.hmma} HMMA, {ldsm}, {s.lds} LDS "
                     f"({s.smem_load_bytes} B loaded per warp), {s.sts} STS ({s.sts_bytes} B), {s.ldg} LDG, {s.ldgsts} LDGSTS, "
                     f"{s.bar} BAR, {s.ldl} LDL, {s.stl} STL, {s.ld_generic} LD, {s.st_generic} ST, {s.other} other")
    return "\n".join(lines)


def analyse_our_kernels(archs: list, tools: Tools, overrides: list, cache: str, source_filter: str) -> tuple[list, list]:
    kernels, failures = [], []
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "**", "*.cu"), recursive=True))
    sources = [cu for cu in sources if re.search(source_filter, os.path.basename(cu))]
    for cu in sources:
        for arch in archs:
            cubin, log = compile_cubin(cu, arch, tools, cache)
            rel = os.path.relpath(cu, os.path.dirname(CSRC))
            if cubin is None:
                failures.append(f"{rel} sm_{arch}: " + " ".join(log.strip().splitlines()[-3:])[:400])
                continue
            resources = parse_ptxas_log(log, arch)
            sass = sass_by_function(cubin, tools)
            names = demangle(sorted(resources), tools)
            for mangled, dem in sorted(names.items(), key=lambda kv: short_name(kv[1])):
                instrs = parse_sass(sass.get(mangled, []))
                main = find_main_loop(instrs)
                kernels.append(Kernel(short_name(dem), os.path.basename(rel), arch, resources[mangled],
                                      dynamic_smem(dem, overrides), THREADS_PER_BLOCK,
                                      count_loop(instrs, *main) if main else None,
                                      kernel_dtype(dem), kernel_head_dim(dem), kernel_direction(dem)))
    return kernels, failures


def analyse_fa2(archs: list, tools: Tools, overrides: list) -> list:
    kernels = []
    for arch in archs:
        for (kind, hdim, dtype), (cubin, mangled) in sorted(fa2_cubins(arch, tools).items()):
            dem = demangle([mangled], tools)[mangled]
            instrs = parse_sass(sass_by_function(cubin, tools, mangled).get(mangled, []))
            main = find_main_loop(instrs)
            smem = dynamic_smem(dem, overrides)
            traits = re.search(r"kernel_traits<([^<>]*)>", short_name(dem)).group(1)
            kernels.append(Kernel(f"FA2 {kind}<{traits}>", "FA2 (torch)", arch, fa2_resources(cubin, mangled, tools),
                                  FA2_DYNAMIC_SMEM[(kind, hdim)] if smem is None else smem, FA2_PICKS[(kind, hdim)][2],
                                  count_loop(instrs, *main) if main else None, dtype, hdim, kind))
    return kernels


def torch_version() -> str:
    import torch
    return torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS))
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--smem", action="append", metavar="REGEX=BYTES",
                        help="dynamic shared memory of the kernels whose demangled name matches REGEX (repeatable)")
    parser.add_argument("--sources", default="", metavar="REGEX",
                        help="only the csrc/cuda .cu files whose name matches REGEX (default: all; e.g. '_mma_')")
    parser.add_argument("--ref", help="analyse csrc/ of this git revision instead of the working tree")
    args = parser.parse_args()
    started = time.time()
    cache = use_git_revision(args.ref) if args.ref else "ours"
    tools = find_tools()
    print(f"cuda_static_evidence: nvcc {tools.nvcc}, cuobjdump {tools.cuobjdump}", file=sys.stderr)
    overrides = parse_smem_overrides(args.smem)
    ours, failures = analyse_our_kernels(args.arch, tools, overrides, cache, args.sources)
    fa2 = analyse_fa2(args.arch, tools, overrides)
    references = {(k.direction, k.head_dim, k.dtype, k.arch): k for k in fa2}
    # Each FA2 reference right after our kernels of the same arch, direction, head dim and dtype.
    tensor_core = sorted([k for k in ours if k.loop is not None] + fa2,
                         key=lambda k: (k.arch, k.direction, k.head_dim or 0, k.dtype, k.source == "FA2 (torch)", k.name))

    source = f"git revision {args.ref} ({cache[5:]})" if args.ref else "the working tree"
    report = [f"Kernels of csrc/cuda in {source}; FlashAttention-2 from torch {torch_version()}.", "",
              "## Resources per kernel (ptxas -v; FA2: cuobjdump -res-usage)", "", resources_table(ours + fa2), "",
              "## Main loop of the tensor-core kernels vs FlashAttention-2 (same head dim and dtype)", "",
              loop_table(tensor_core, references), "", "Raw counts of the main loops:", "", detail_lines(tensor_core), ""]
    if failures:
        report += ["## Sources that did not compile (skipped)", ""] + [f"- {f}" for f in failures] + [""]
    text = "\n".join(report)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(f"cuda_static_evidence: done in {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
