"""Ahead-of-time compile report of the GPU kernels, on a machine without a GPU.

    env -u TRITON_INTERPRET python scripts/aot_report.py [--arch 90,80] [--quick] [--json PATH]

Triton kernels (``synpo_kernels/ops/fused_linear_kernels.py``): every ``@triton.jit`` kernel is
compiled by Triton's own compiler for ``GPUTarget("cuda", 90, 32)`` (H100/H200, 132 SMs) and
``GPUTarget("cuda", 80, 32)`` (A100, 108 SMs), for bf16/fp16/fp32 and V = 152064, 262144, 32001
(D = 4096 for the weight-gradient GEMM), with the configuration the launchers use: the same
``lse_config`` / ``grad_config`` / ``wgrad_config`` calls (the target's entries of
``kernel_configs.json`` and SM count), over a full chunk of the default CUDA chunk budget
(``fused_linear_common.chunk_rows``), with the argument list the launcher passes. The signature is
specialized the way a launch is: the
kernel's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, what
``JITFunction.run`` calls) applied to stand-in pointer arguments (``data_ptr()`` 16-byte aligned, as
the chunk buffer and the per-row vectors are at chunk offset 0) and to the real ints, so the
pointers and the ints divisible by 16 get ``tt.divisibility=16`` exactly where a launch would give
it (not for V = 32001 and its row stride). A chunk of the preference op that starts at a pair
boundary may pass less aligned per-row vectors (labels, lse, g): a variant not listed here.
``_row_grad_kernel`` is compiled with and without the bias gradient. No CUDA driver is touched:
the backend is made from the target, not from a device.

Registers and spills: ``CompiledKernel.n_regs`` / ``n_spills`` are filled only when a driver loads
the cubin, so they come from ptxas instead: ``asm["ptx"]`` is compiled again with Triton's bundled
``ptxas -v`` for the target (``-lineinfo``, ``--fmad=false`` iff fp fusion is off, as Triton's
``make_cubin``) and its log is parsed; the register count is cross-checked against
``cuobjdump -res-usage`` of Triton's own cubin (a mismatch is printed). Shared memory is Triton's
``metadata.shared`` (checked against the architecture's opt-in limit). ``LDG.E.128`` (128-bit global
loads, any modifiers) and ``BAR.SYNC`` are counted in the SASS of ``asm["cubin"]`` dumped by the
bundled ``cuobjdump -sass``.

CUDA kernels (``csrc/token_logprobs_kernels.cu``): compiled with ``$CUDA_HOME/bin/nvcc`` (else
``/usr/local/cuda/bin/nvcc``; skipped with a line saying so when neither exists) with ``-Xptxas -v``
for sm_80 and sm_90a; one row per kernel function and arch from the ptxas log, loads and barriers
from ``cuobjdump -sass`` of the object.

Exit status 1 on any compile error, any spill, or shared memory over the limit (each is printed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

# The report compiles the real kernels: under TRITON_INTERPRET=1, @triton.jit would give interpreted
# functions (read when the module is imported, so it is dropped before any import of triton).
if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
    print("note: TRITON_INTERPRET removed from the environment (the report compiles the real kernels)")
# The compiled C++ extension is not needed, and may be built for another torch than this one.
os.environ.setdefault("SYNPO_DISABLE_CPP_EXT", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from synpo_kernels.ops import fused_linear_common as common  # noqa: E402
from synpo_kernels.ops import fused_linear_kernels as K  # noqa: E402
from synpo_kernels.ops import kernel_tuning as tuning  # noqa: E402
from synpo_kernels.reference import IGNORE_INDEX  # noqa: E402

SMS = {90: 132, 80: 108}
"""SM count per target: H100/H200 SXM (sm_90), A100 (sm_80)."""
SMEM_LIMIT = {90: 232448, 80: 166912}
"""Opt-in shared memory per block (bytes): what a launch may use at most."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCABS = (152064, 262144, 32001)
DIM = 4096
KERNELS = ("_row_lse_kernel", "_row_grad_kernel", "_wgrad_kernel")
LDG128 = re.compile(r"\bLDG\.E(?:\.\w+)*?\.128\b")
BAR_SYNC = re.compile(r"\bBAR\.SYNC\b")


class StandIn:
    """A tensor argument as the binder sees it: a dtype and a 16-byte aligned address."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 1 << 20


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows of a full chunk under the default CUDA budget, from the ops' own planning function."""
    weight = types.SimpleNamespace(
        device=torch.device("cuda"), shape=(vocab, DIM), element_size=lambda: dtype.itemsize
    )
    return common.chunk_rows(common.FusedLinearConfig(), weight, "triton", None)


def launch(kernel: str, arch: int, dtype: torch.dtype, vocab: int, bias: bool = False):
    """``(cfg, positional args)`` of a launch, built like the launcher in fused_linear_kernels."""
    rows = chunk_rows(vocab, dtype)
    # The row stride of the ops' own chunk buffer (padded to common.ROW_ALIGN), built on "meta".
    buffer = common.chunk_buffer(rows, torch.empty((vocab, DIM), dtype=dtype, device="meta"))
    stride, v_load = buffer.stride(0), K.load_width(buffer)
    acc = StandIn(torch.float64 if dtype == torch.float64 else torch.float32)
    logits, labels = StandIn(dtype), StandIn(torch.int64)
    if kernel == "_row_lse_kernel":
        cfg = K.lse_config(rows, vocab, dtype, arch=f"sm_{arch}", sm_count=SMS[arch])
        return cfg, (logits, stride, labels, acc, acc, rows, vocab, v_load, IGNORE_INDEX)
    if kernel == "_row_grad_kernel":
        cfg = K.grad_config(rows, vocab, dtype, has_bias_grad=bias, arch=f"sm_{arch}", sm_count=SMS[arch])
        args = (logits, stride, labels, acc, acc, acc, rows, vocab, v_load, cfg.rows_per_split, IGNORE_INDEX)
        return cfg, args
    # The GEMM's hidden chunk is an index_select of rows (contiguous, stride D); acc is (V, D) fp32.
    cfg = K.wgrad_config(vocab, DIM, dtype, arch=f"sm_{arch}")
    hidden, fp32 = StandIn(dtype), StandIn(torch.float32)
    return cfg, (logits, stride, hidden, DIM, fp32, DIM, rows, vocab, DIM)


def specialize(kernel: str, arch: int, dtype: torch.dtype, vocab: int, bias: bool):
    """What JITFunction.run computes before compiling: (ASTSource, CUDAOptions, target, cfg)."""
    fn = getattr(K, kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    cfg, args = launch(kernel, arch, dtype, vocab, bias)
    kwargs = dict(cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # JITFunction.run adds these two before binding.
    kwargs["debug"] = fn.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, target, cfg


def parse_ptxas_log(log: str) -> list[dict]:
    """One dict per entry function of a ``ptxas -v`` log: name, arch, regs, spill bytes, smem."""
    out: list[dict] = []
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            out.append({"name": m[1], "arch": m[2], "regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0})
        elif out and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            out[-1]["spill_st"], out[-1]["spill_ld"] = int(m[1]), int(m[2])
        elif out and (m := re.search(r"Used (\d+) registers", line)):
            out[-1]["regs"] = int(m[1])
            if s := re.search(r"(\d+) bytes smem", line):
                out[-1]["smem"] = int(s[1])
    return out


def sass_counts(sass: str) -> dict[tuple[str, str], dict]:
    """``{(arch, function): {"ldg128": n, "bar_sync": n, "bar_sync_loop": n}}`` from ``cuobjdump -sass``.

    ``bar_sync_loop`` counts the barriers inside innermost loop bodies, a loop body being the address
    range from a backward branch's target to the branch, innermost when it holds no other loop: a
    block-wide reduction per iteration of the streaming loop shows there, while the once-per-row
    reductions of a persistent kernel's outer loop do not.
    """
    counts: dict[tuple[str, str], dict] = {}
    code: dict[tuple[str, str], list[tuple[int, str]]] = {}
    arch, key = "", None
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function : (\S+)", line):
            key = (arch, m[1])
            counts.setdefault(key, {"ldg128": 0, "bar_sync": 0, "bar_sync_loop": 0})
            code.setdefault(key, [])
        elif key is not None:
            counts[key]["ldg128"] += len(LDG128.findall(line))
            counts[key]["bar_sync"] += len(BAR_SYNC.findall(line))
            if m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*)", line):
                code[key].append((int(m[1], 16), m[2]))
    for key, instructions in code.items():
        loops = [
            (int(t[1], 16), addr)
            for addr, text in instructions
            if (t := re.search(r"\bBRA(?:\.\w+)*\s+(?:`\()?0x([0-9a-f]+)", text)) and int(t[1], 16) <= addr
        ]
        innermost = [
            (lo, hi)
            for lo, hi in loops
            if not any((lo, hi) != o and lo <= o[0] and o[1] <= hi for o in loops)
        ]
        counts[key]["bar_sync_loop"] = sum(
            1
            for addr, text in instructions
            if BAR_SYNC.search(text) and any(lo <= addr <= hi for lo, hi in innermost)
        )
    return counts


def run_tool(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout + res.stderr


def describe(cfg: K.LaunchConfig, src: ASTSource) -> dict:
    """Table fields of a launch's configuration (per variant: deduplicated compiles share the rest)."""
    meta = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.constexprs.items() if k != "ACC"]
    if cfg.rows_per_split:
        meta.append(f"rows_per_split={cfg.rows_per_split}")
    return {
        "config": " ".join([*meta, f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"]),
        "divisible_by_16": [src.fn.arg_names[k[0]] for k, v in src.attrs.items() if v],
        "grid": list(cfg.grid),
        "num_warps": cfg.num_warps,
        "entry": tuning.entries().index(cfg.entry),
        "ctas_table": cfg.entry.ctas_per_sm,
    }


def compile_triton(spec: tuple) -> dict:
    """Compile one variant and measure it; never raises (an error is returned in the row)."""
    kernel, arch, dtype_name, vocab, bias = spec
    try:
        src, options, target, _ = specialize(kernel, arch, DTYPES[dtype_name], vocab, bias)
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=target, options=options.__dict__)
        t1 = time.perf_counter()
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]  # as Triton's make_cubin
        ptxas = [
            knobs.nvidia.ptxas.path,
            "-lineinfo",
            *fmad,
            "-v",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        cuobjdump = knobs.nvidia.cuobjdump.path
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "triton.cubin")
            ptx.write_text(compiled.asm["ptx"])
            cubin.write_bytes(compiled.asm["cubin"])
            cmds = [
                [*ptxas, str(ptx), "-o", str(Path(tmp, "ptxas.cubin"))],
                [cuobjdump, "-res-usage", str(cubin)],
                [cuobjdump, "-sass", str(cubin)],
            ]
            # Independent processes, mostly start-up time: run them side by side.
            with cf.ThreadPoolExecutor(len(cmds)) as ex:
                log, res, sass = ex.map(run_tool, cmds)
        (info,) = parse_ptxas_log(log)
        row = {"smem": compiled.metadata.shared, "regs": info["regs"]}
        row.update(
            spill_st=info["spill_st"], spill_ld=info["spill_ld"], ldg128=0, bar_sync=0, bar_sync_loop=0
        )
        for counts in sass_counts(sass).values():  # one function per Triton cubin
            for name in ("ldg128", "bar_sync", "bar_sync_loop"):
                row[name] += counts[name]
        cubin_regs = int(m[1]) if (m := re.search(r"REG:(\d+)", res)) else None
        if cubin_regs != info["regs"]:
            row["note"] = f"ptxas -v: {info['regs']} registers, Triton's cubin: {cubin_regs}"
        row["seconds"] = {"triton": round(t1 - t0, 2), "tools": round(time.perf_counter() - t1, 2)}
        return row
    except Exception as exc:  # reported in the table, and in the exit status
        return {"error": f"{type(exc).__name__}: {exc}".strip()[:4000]}


def nvcc_path() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def start_nvcc(nvcc: str, archs: list[int], tmp: str) -> tuple[subprocess.Popen, list[str]]:
    gencode = {80: "-gencode=arch=compute_80,code=sm_80", 90: "-gencode=arch=compute_90a,code=sm_90a"}
    cmd = [
        nvcc, "-Xptxas", "-v", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
        *(gencode[a] for a in archs), "-c", str(ROOT / "csrc" / "token_logprobs_kernels.cu"),
        "-o", os.path.join(tmp, "token_logprobs_kernels.o"),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short demangled name (no namespaces, return type or parameters)."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not names or filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for name, full in zip(names, out):
        full = re.sub(r"^void ", "", full)
        depth, cut = 0, len(full)  # drop the parameter list: the last top-level "(...)"
        for i in range(len(full) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(full[i], 0)
            if depth == 0 and full[i] == "(":
                cut = i
                break
        short[name] = re.sub(r"(?:[\w ]+|\(anonymous namespace\))::", "", full[:cut])
    return short


def finish_nvcc(proc: subprocess.Popen, cmd: list[str], tmp: str) -> list[dict]:
    log, _ = proc.communicate()
    if proc.returncode != 0:
        error = f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}"
        return [{"kernel": "token_logprobs_kernels.cu", "arch": "-", "source": "nvcc", "error": error}]
    sass = run_tool([knobs.nvidia.cuobjdump.path, "-sass", os.path.join(tmp, "token_logprobs_kernels.o")])
    counts = sass_counts(sass)
    infos = parse_ptxas_log(log)
    short = demangle(sorted({i["name"] for i in infos}))
    dtype_of = {"__half": "fp16", "__nv_bfloat16": "bf16", "float": "fp32", "double": "fp64"}
    rows = []
    for info in infos:
        name = short[info["name"]]
        targ = re.search(r"<([\w:]+)", name)
        dtype = dtype_of.get(targ[1], targ[1]) if targ else "-"
        row = {"kernel": name, "arch": info["arch"], "dtype": dtype, "V": "any", "source": "nvcc"}
        row.update(config="nvcc -O3 --use_fast_math", regs=info["regs"], smem=info["smem"])
        row.update(spill_st=info["spill_st"], spill_ld=info["spill_ld"])
        row.update(counts.get((info["arch"], info["name"]), {"ldg128": 0, "bar_sync": 0, "bar_sync_loop": 0}))
        rows.append(row)
    return rows


def versions(nvcc: str | None) -> str:
    nv = "not found"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        nv = m[1] if (m := re.search(r"release ([\d.]+)", out)) else out.strip()
    ptxas = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
    pv = m[1] if (m := re.search(r"release ([\d.]+)", ptxas)) else "?"
    return f"torch {torch.__version__}, triton {triton.__version__} (ptxas {pv}), nvcc {nv}"


COLUMNS = (
    "kernel",
    "arch",
    "dtype",
    "V",
    "config",
    "regs",
    "spills (st/ld B)",
    "smem B",
    "LDG.E.128",
    "BAR.SYNC (in inner loops)",
    "CTAs/SM (table / fit)",
)


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        cells = [r["kernel"], r["arch"], r.get("dtype", "-"), str(r.get("V", "-")), r.get("config", "-")]
        if "error" in r:
            cells += ["COMPILE ERROR", "-", "-", "-", "-", "-"]
        else:
            ldg = f"yes ({r['ldg128']})" if r["ldg128"] else "no"
            cells += [
                str(r["regs"]),
                f"{r['spill_st']}/{r['spill_ld']}",
                str(r["smem"]),
                ldg,
                f"{r['bar_sync']} ({r.get('bar_sync_loop', '-')})",
                f"{r['ctas_table']} / {r['ctas_fit']}" if "ctas_fit" in r else "-",
            ]
        print("| " + " | ".join(cells) + " |")


def occupancy_failures(rows: list[dict], *, complete: bool = True) -> list[str]:
    """Each table entry's ``ctas_per_sm`` must be what its compiled kernels fit (the least over the
    dtypes and V specializations it covers): launch grids are sized from it. A partial report
    (``--quick``: one dtype and V) sees only some of them, so it checks that the entry fits those."""
    fits: dict[int, list[dict]] = {}
    for r in rows:
        fits.setdefault(r["entry"], []).append(r)
    failures = []
    for index, covered in fits.items():
        entry = tuning.entries()[index]
        fit = min(r["ctas_fit"] for r in covered)
        if entry.ctas_per_sm > fit or (complete and entry.ctas_per_sm != fit):
            worst = min(covered, key=lambda r: r["ctas_fit"])
            failures.append(
                f"occupancy: kernel_configs.json entry {index} ({entry.kernel} {entry.arch} {entry.dtype}) "
                f"says {entry.ctas_per_sm} CTAs/SM; its compiled kernels fit {fit} (the least: "
                f"{worst['dtype']} V={worst['V']}: {worst['regs']} regs, {worst['smem']} B smem, "
                f"{worst['num_warps']} warps): update the entry (scripts/aot_report.py --update-table)"
            )
    return failures


def update_table(rows: list[dict]) -> int:
    """Rewrite the checked entries' ``ctas_per_sm`` with what their compiled kernels fit, and the
    ``default`` arch's entries with the least of the checked archs' (same kernel and dtype)."""
    data = json.loads(tuning.TABLE_PATH.read_text())
    fits: dict[int, int] = {}
    for r in rows:
        fits[r["entry"]] = min(fits.get(r["entry"], r["ctas_fit"]), r["ctas_fit"])
    changed = 0
    for index, fit in fits.items():
        changed += data["entries"][index]["ctas_per_sm"] != fit
        data["entries"][index]["ctas_per_sm"] = fit
    for entry in data["entries"]:
        if entry["arch"] == tuning.DEFAULT_ARCH:
            same = [
                e["ctas_per_sm"]
                for e in data["entries"]
                if e["arch"] in tuning.ARCH_LIMITS
                and (e["kernel"], e["dtype"]) == (entry["kernel"], entry["dtype"])
            ]
            if same and entry["ctas_per_sm"] != min(same):
                entry["ctas_per_sm"] = min(same)
                changed += 1
    data["triton"] = triton.__version__
    tuning.TABLE_PATH.write_text(json.dumps(data, indent=1) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (90, 80)")
    ap.add_argument("--quick", action="store_true", help="one V (152064), bf16 only")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compiles")
    ap.add_argument(
        "--update-table",
        action="store_true",
        help="rewrite kernel_configs.json's ctas_per_sm from the compiled kernels' occupancy (then rerun)",
    )
    args = ap.parse_args(argv)
    if args.update_table and args.quick:
        ap.error(
            "--update-table needs the full report (an entry's occupancy is the least over all it covers)"
        )
    t0 = time.perf_counter()
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    if unknown := [a for a in archs if a not in SMS]:
        ap.error(f"--arch: unsupported {unknown} (known: {sorted(SMS)})")
    dtypes = ["bf16"] if args.quick else list(DTYPES)
    vocabs = VOCABS[:1] if args.quick else VOCABS
    nvcc = nvcc_path()
    print(versions(nvcc))
    targets = ", ".join(f"sm_{a} ({SMS[a]} SMs)" for a in archs)
    print(f"targets: {targets}; D={DIM}; rows: one full chunk of the default CUDA budget")

    specs = [
        (kernel, arch, dt, vocab, bias)
        for arch in archs
        for kernel in KERNELS
        for dt in dtypes
        for vocab in vocabs
        for bias in ((False, True) if kernel == "_row_grad_kernel" else (False,))
    ]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        nv = start_nvcc(nvcc, archs, tmp) if nvcc else None
        # Variants with the same specialization and options (e.g. V=152064 and 262144 of the LSE
        # kernel) are the same kernel: each is compiled once.
        unique: dict[str, tuple] = {}
        for spec in specs:
            kernel, arch, dt, vocab, bias = spec
            row = {"kernel": kernel, "arch": f"sm_{arch}", "dtype": dt, "V": vocab, "source": "triton"}
            try:
                src, options, target, cfg = specialize(kernel, arch, DTYPES[dt], vocab, bias)
                row.update(describe(cfg, src), key=f"{kernel}|{target}|{src.hash()}|{options.hash()}")
            except Exception:  # the worker reports it
                row["key"] = repr(spec)
            rows.append(row)
            unique.setdefault(row["key"], spec)
        ctx = multiprocessing.get_context("fork")  # workers inherit the imports
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
            done = dict(zip(unique, pool.map(compile_triton, unique.values())))
        for row in rows:
            row.update(done[row.pop("key")])
        if nv:
            rows += finish_nvcc(*nv, tmp)

    failures = []
    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r.get('dtype', '')} V={r.get('V', '-')}"
        if "error" in r:
            failures.append(f"compile error: {what}:\n{r['error']}")
            continue
        if r["spill_st"] or r["spill_ld"]:
            failures.append(
                f"spills: {what}: {r['spill_st']} B stored, {r['spill_ld']} B loaded ({r['regs']} regs)"
            )
        if r["source"] == "triton":
            r["ctas_fit"] = tuning.occupancy(
                r["arch"], regs=r["regs"], num_warps=r["num_warps"], smem=r["smem"]
            )
        limit = SMEM_LIMIT.get(int(re.sub(r"\D", "", r["arch"])))
        if limit is not None and r["smem"] > limit:
            failures.append(f"shared memory: {what}: {r['smem']} B > {limit} B (the launch would fail)")
        if "note" in r:
            print(f"note: {what}: {r['note']}")
    occupancy_rows = [r for r in rows if "ctas_fit" in r]
    table_triton = json.loads(tuning.TABLE_PATH.read_text()).get("triton")
    if args.update_table:
        changed = update_table(occupancy_rows)
        print(f"kernel_configs.json: {changed} entries updated (triton {triton.__version__})")
    elif table_triton == triton.__version__:
        failures += occupancy_failures(occupancy_rows, complete=not args.quick)
    else:
        # Register counts move between Triton releases: the table holds the occupancy of the Triton
        # it was made with (the GPU image's, pinned in constraints/gpu-gate.txt); others only note.
        for line in occupancy_failures(occupancy_rows, complete=not args.quick):
            print(f"note (triton {triton.__version__}, table made with {table_triton}): {line}")
    print_table(rows)
    if nvcc is None:
        print("nvcc not found ($CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc): CUDA kernels skipped")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    for f in failures:
        print(f"FAIL {f}")
    print(f"{len(rows)} rows ({len(unique)} distinct Triton compiles), {len(failures)} failures, "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
