"""The torch-free CUDA sources compile with this machine's nvcc, without local-memory spills.

Every ``csrc/cuda/*.cu`` except the torch binding (``binding.cu``) is compiled alone with nvcc for
each architecture in ``ARCHS`` (sm_80 and sm_90; override with LSTM_FUSED_CHECK_ARCHS="80 90a")
with ``--resource-usage``; ptxas then reports, per function, registers, shared memory, stack frame
and spill stores/loads. Needs no GPU and no CUDA build of torch: only nvcc (skipped without it).

Policy:
  * spill stores or spill loads > 0 in any function (kernel or non-inlined device function):
    FAIL. Every kernel in this package sits in the recurrent time loop, so a spill is a
    slowdown on every step; fix the tile choice or the launch bounds instead of accepting it.
  * a nonzero stack frame without spills (a thread-local array indexed at run time, or a
    non-inlined call): reported as a pytest warning with the per-kernel table, not failed.
    It is local memory too, but it can be deliberate and cheap (a cold path, a small call
    frame), so it is for the kernel author to judge; the summary names the kernel.
  * nvcc errors: FAIL, with nvcc's output.

The same flags as the real build where they change code: torch's COMMON_NVCC_FLAGS (no implicit
half/bf16 operators, --expt-relaxed-constexpr), -std=c++17 -O3 -lineinfo, -Icsrc.

Also checked without nvcc: the torch-free files (every .cuh/.h and every .cu but the binding, and
the csrc headers they include) include nothing from torch, ATen or c10.

LSTM_FUSED_CHECK_CUDA_DIR points the tests at another folder of sources (to try the checks on
throwaway files); the default is csrc/cuda.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_DIR = Path(os.environ.get("LSTM_FUSED_CHECK_CUDA_DIR", CSRC / "cuda")).resolve()
TORCH_FILES = {"binding.cu"}  # the only files allowed to include torch headers
ARCHS = os.environ.get("LSTM_FUSED_CHECK_ARCHS", "80 90").replace(",", " ").replace(";", " ").split()
COMPILE_TIMEOUT_S = 900

try:  # the defines torch's CUDAExtension adds to every nvcc command
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
except Exception:  # pragma: no cover - torch is always there in this suite
    COMMON_NVCC_FLAGS = [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
    ]
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", *COMMON_NVCC_FLAGS]


# ----------------------------------------------------------------------------------------------
# Finding nvcc and the sources
# ----------------------------------------------------------------------------------------------

def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def torch_free_sources(folder: Path = CUDA_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("*.cu") if p.name not in TORCH_FILES)


def torch_free_files(folder: Path = CUDA_DIR) -> list[Path]:
    headers = [p for ext in ("*.cuh", "*.h", "*.hpp") for p in folder.glob(ext)]
    return sorted(set(headers) | set(torch_free_sources(folder)))


# ----------------------------------------------------------------------------------------------
# ptxas --resource-usage output
# ----------------------------------------------------------------------------------------------

@dataclass
class FunctionUsage:
    name: str
    arch: str = "?"
    entry: bool = False          # a __global__ kernel (ptxas "Compiling entry function")
    registers: int | None = None
    barriers: int | None = None
    smem: int = 0                # static shared memory, bytes
    stack: int = 0               # stack frame, bytes
    spill_stores: int = 0
    spill_loads: int = 0
    extra: list[str] = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_ENTRY = re.compile(r"Compiling entry function\s+'([^']+)'(?:\s+for\s+'([^']+)')?")
_PROPS = re.compile(r"Function properties for\s+'?([^\s']+)'?")
_IN_FUNCTION = re.compile(r"in function\s+'([^']+)'")
_NUM = {
    "stack": re.compile(r"(\d+)\s+bytes\s+stack\s+frame"),
    "spill_stores": re.compile(r"(\d+)\s+bytes\s+spill\s+stores"),
    "spill_loads": re.compile(r"(\d+)\s+bytes\s+spill\s+loads"),
    "registers": re.compile(r"Used\s+(\d+)\s+registers"),
    "barriers": re.compile(r"used\s+(\d+)\s+barriers"),
    "smem": re.compile(r"(\d+)\s+bytes\s+smem"),
}


def parse_resource_usage(text: str, arch: str = "?") -> list[FunctionUsage]:
    """Per-function records from ptxas' verbose / --resource-usage output.

    ptxas prints, per entry function (the format differs a little between -Xptxas -v and
    --resource-usage, and between architectures: cmem/gmem fields come and go)::

        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
        ptxas info    : Function properties for _Z6kernelPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 12 registers, used 1 barriers, 512 bytes smem, 360 bytes cmem[0]

    and for each non-inlined device function a "Function properties" block of its own (no
    "Used ..." line). Numbers are matched by their unit, not their position, so reordered or
    added fields do not break the parse.
    """
    records: dict[tuple[str, str], FunctionUsage] = {}
    current: FunctionUsage | None = None
    entry_arch = arch
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry_arch = m.group(2) or arch
            current = records.setdefault((m.group(1), entry_arch), FunctionUsage(m.group(1), entry_arch))
            current.entry = True
            continue
        m = _PROPS.search(line)
        if m:
            key = (m.group(1), entry_arch)
            current = records.setdefault(key, FunctionUsage(m.group(1), entry_arch))
            continue
        target = current
        m = _IN_FUNCTION.search(line)  # a warning that names its function (-warn-spills)
        if m:
            target = records.setdefault((m.group(1), entry_arch), FunctionUsage(m.group(1), entry_arch))
        if target is None:
            continue
        for attr, pattern in _NUM.items():
            n = pattern.search(line)
            if n:
                value = int(n.group(1))
                setattr(target, attr, value if target is current else max(value, getattr(target, attr) or 0))
    return list(records.values())


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                             timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def summary(records: list[FunctionUsage], width: int = 110) -> str:
    """One line per function: arch, registers, barriers, static shared memory (dynamic shared
    memory is a launch parameter, not in the table), stack frame, spills, (demangled) name."""
    if not records:
        return "  (ptxas reported no functions)"
    pretty = demangle([r.name for r in records])
    lines = [f"  {'arch':<7} {'kind':<6} {'regs':>4} {'bar':>3} {'smem':>7} {'stack':>6} "
             f"{'spill st':>8} {'spill ld':>8}  function"]
    for r in sorted(records, key=lambda r: (r.arch, not r.entry, r.name)):
        name = pretty.get(r.name, r.name)
        if len(name) > width:
            name = name[: width - 3] + "..."
        flag = "  <-- SPILLS" if r.spills else ("  <-- stack" if r.stack else "")
        lines.append(
            f"  {r.arch:<7} {'kernel' if r.entry else 'device':<6} "
            f"{'-' if r.registers is None else r.registers:>4} "
            f"{'-' if r.barriers is None else r.barriers:>3} {r.smem:>7} {r.stack:>6} "
            f"{r.spill_stores:>8} {r.spill_loads:>8}  {name}{flag}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------

@dataclass
class CompileResult:
    source: Path
    arch: str
    command: list[str]
    returncode: int
    output: str
    seconds: float

    @property
    def records(self) -> list[FunctionUsage]:
        return parse_resource_usage(self.output, f"sm_{self.arch}")


def arch_flags(arch: str) -> list[str]:
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def compile_one(nvcc: str, source: Path, arch: str, extra: tuple[str, ...] = ()) -> CompileResult:
    """nvcc -c on one file for one architecture, with --resource-usage; the object is dropped."""
    includes = ["-I", str(CSRC), "-I", str(source.parent.parent), "-I", str(source.parent)]
    with tempfile.TemporaryDirectory(prefix="lstm_fused_nvcc_") as tmp:
        cmd = [nvcc, *NVCC_FLAGS, *includes, *arch_flags(arch), "--resource-usage", *extra,
               "-c", str(source), "-o", os.path.join(tmp, "out.o")]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = -1, f"nvcc timed out after {COMPILE_TIMEOUT_S} s\n{e.stdout or ''}{e.stderr or ''}"
        return CompileResult(source, arch, cmd, rc, out, time.perf_counter() - start)


def check_result(result: CompileResult) -> None:
    """Fails on nvcc errors and on spills; warns (with the table) on stack frames."""
    label = f"{result.source.name} for sm_{result.arch}"
    if result.returncode != 0:
        pytest.fail(f"nvcc failed on {label} (exit {result.returncode}, {result.seconds:.1f} s):\n"
                    f"  {' '.join(result.command)}\n{result.output[-12000:]}", pytrace=False)
    records = result.records
    print(f"{label}: {result.seconds:.1f} s\n{summary(records)}")  # shown with -rA or -s
    spilling = [r for r in records if r.spills]
    if spilling:
        pytest.fail(f"local-memory spills in {label}: "
                    f"{', '.join(sorted(demangle([r.name for r in spilling]).values()))}\n"
                    f"{summary(records)}\n  command: {' '.join(result.command)}", pytrace=False)
    stacked = [r for r in records if r.stack]
    if stacked:
        warnings.warn(f"stack frame (local memory) in {label}, no spills:\n{summary(records)}",
                      stacklevel=1)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
CASES = [(src, arch) for src in torch_free_sources() for arch in ARCHS]

@pytest.fixture(scope="module")
def compiled(request):
    """Compiles every selected (file, arch) at once, as many at a time as there are cores."""
    wanted = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and getattr(item, "originalname", None) == "test_compiles_without_spills":
            if spec.params.get("case") is not None:
                wanted.append(spec.params["case"])
    workers = max(1, min(len(wanted), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {case: pool.submit(compile_one, NVCC, *case) for case in wanted}
        yield futures


@needs_nvcc
@pytest.mark.parametrize(
    "case", CASES or [pytest.param(None, marks=pytest.mark.skip(
        reason=f"no torch-free .cu files in {CUDA_DIR} yet"))],
    ids=[f"{s.name}-sm_{a}" for s, a in CASES] or ["none"])
def test_compiles_without_spills(case, compiled):
    result = compiled[case].result() if case in compiled else compile_one(NVCC, *case)
    check_result(result)


@needs_nvcc
@pytest.mark.parametrize("source", torch_free_sources(), ids=lambda p: p.name)
def test_compiles_for_pre_ampere_targets(source):
    """sm_75 (T4-class) has no kernels here (their bodies need sm_80/sm_90 and trap if launched),
    but a build whose TORCH_CUDA_ARCH_LIST includes it must still compile."""
    result = compile_one(NVCC, source, "75")
    assert result.returncode == 0, result.output[-6000:]


@needs_nvcc
@pytest.mark.parametrize("source", sorted((ROOT / "benchmarks" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_gpu_microbenchmarks_compile(source):
    """The standalone GPU microbenchmarks a GPU session runs (sm_90: they use clusters there)."""
    check_result(compile_one(NVCC, source, "90"))


def _includes(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, flags=re.M)


TORCH_INCLUDE = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/|^Python\.h$|^torch\.h$")


def torch_includes(path: Path) -> list[str]:
    """Torch includes of ``path`` and of the project headers it includes, transitively."""
    found, seen, todo = [], set(), [(path, [path.name])]
    while todo:
        f, chain = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for inc in _includes(f):
            if TORCH_INCLUDE.search(inc):
                found.append(" -> ".join(chain + [inc]))
                continue
            for base in (f.parent, CSRC, CUDA_DIR):
                cand = (base / inc).resolve()
                if cand.is_file() and cand.name not in TORCH_FILES:
                    todo.append((cand, chain + [inc]))
                    break
    return found


def test_torch_free_files_include_no_torch():
    files = torch_free_files()
    if not files:
        pytest.skip(f"no CUDA sources in {CUDA_DIR} yet")
    bad = [chain for f in files for chain in torch_includes(f)]
    assert not bad, ("these files must stay torch-free (CUDA runtime only; torch belongs in "
                     f"{', '.join(sorted(TORCH_FILES))}):\n  " + "\n  ".join(bad))


# Self-tests of the checker itself: the parser, and one tiny compile that must spill.

_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3bigPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z3bigPKfPfi
    640 bytes stack frame, 1556 bytes spill stores, 1656 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 640 bytes cumulative stack size
ptxas info    : Compile time = 97.292 ms
ptxas info    : Function properties for _Z6helperPKfi
    128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas warning : Registers are spilled to local memory in function '_Z4warnv', 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z6simplePf' for 'sm_80'
ptxas info    : Function properties for _Z6simplePf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 512 bytes smem, 360 bytes cmem[0]
"""


def test_parser_reads_ptxas_output():
    recs = {r.name: r for r in parse_resource_usage(_SAMPLE)}
    assert set(recs) == {"_Z3bigPKfPfi", "_Z6helperPKfi", "_Z6simplePf", "_Z4warnv"}
    assert (recs["_Z4warnv"].spill_stores, recs["_Z4warnv"].spill_loads) == (8, 4)
    assert recs["_Z6helperPKfi"].spill_stores == 0  # the warning did not land on the helper
    big, helper, simple = recs["_Z3bigPKfPfi"], recs["_Z6helperPKfi"], recs["_Z6simplePf"]
    assert (big.entry, big.arch, big.registers, big.stack, big.spill_stores, big.spill_loads) == (
        True, "sm_90", 32, 640, 1556, 1656) and big.spills
    assert (helper.entry, helper.stack, helper.spills, helper.registers) == (False, 128, False, None)
    assert (simple.arch, simple.registers, simple.barriers, simple.smem, simple.spills) == (
        "sm_80", 10, 1, 512, False)
    assert "SPILLS" in summary(list(recs.values()))


_SPILLING = r"""
template <int N>
__global__ void wide(const float* __restrict__ in, float* __restrict__ out, int n) {
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = in[threadIdx.x + i * n];
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = acc[i] * acc[(i + k + 1) % N] + 1.0f;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += acc[i];
  out[threadIdx.x] = s;
}
template __global__ void wide<64>(const float*, float*, int);

__global__ void tidy(float* out) { out[threadIdx.x] *= 2.f; }
"""


@needs_nvcc
def test_checker_catches_a_spilling_kernel(tmp_path):
    src = tmp_path / "spilling.cu"
    src.write_text(_SPILLING)
    # 64 live floats under a 32-register cap cannot fit: ptxas must spill (about a second).
    result = compile_one(NVCC, src, ARCHS[-1], extra=("-maxrregcount=32",))
    assert result.returncode == 0, result.output
    recs = {r.name: r for r in result.records}
    wide = next(r for n, r in recs.items() if "wide" in n)
    tidy = next(r for n, r in recs.items() if "tidy" in n)
    assert wide.entry and wide.spills and wide.registers <= 32, summary(list(recs.values()))
    assert tidy.entry and not tidy.spills and not tidy.stack
    with pytest.raises(pytest.fail.Exception, match="local-memory spills"):
        check_result(result)
