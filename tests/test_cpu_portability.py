"""One build runs on every x86-64 CPU: only the step kernels compiled for AVX2 or AVX-512 may hold
instructions past the x86-64 baseline, and they run only where CPUID says the CPU has them.

The check reads the built extension's machine code (objdump): outside the step-kernel namespaces
isa_avx2 / isa_avx512 / isa_avx512bf16 (and isa_avx512bf16_rows) there must be no VEX/EVEX instruction at all (every AVX
instruction's mnemonic starts with "v"), outside the two AVX-512 ones no zmm register, and outside
isa_avx512bf16 no AVX512-BF16 instruction (CPUs with AVX-512 but without it: Skylake-SP to Ice
Lake). A build with -march=native, a wide intrinsic outside its file's target region, or a
template instantiated for a wide target and merged by the linker into baseline code all show up
here. The variants' own results are checked in
test_cpu_kernels.py, with the dispatch forced to each variant this machine supports.
"""

import platform
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

import lstm_fused

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 property"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)"),
    pytest.mark.skipif("cpu" not in lstm_fused.available_backends(), reason="the C++ extension is not built"),
]

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
MNEMONIC = re.compile(r"^\s+[0-9a-f]+:\s+([a-z][a-z0-9.]*)\b(.*)$")


def _functions():
    """{demangled function name: [(mnemonic, operands), ...]} of the extension's code."""
    from lstm_fused import _C

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                             capture_output=True, text=True, check=True).stdout
    functions, current = defaultdict(list), None
    for line in listing.splitlines():
        head = FUNCTION.match(line)
        if head:
            current = head.group(1)
            continue
        ins = MNEMONIC.match(line)
        if ins and current is not None:
            functions[current].append((ins.group(1), ins.group(2)))
    return functions


# AVX512-BF16's instructions (the dot product and the float32 -> bf16 conversions).
BF16_MNEMONICS = ("vdpbf16ps", "vcvtne2ps2bf16", "vcvtneps2bf16")
AVX512_VARIANTS = ("isa_avx512", "isa_avx512bf16")


def _variant(name):
    # isa_avx512bf16_rows is the same variant compiled with the dot product in every tile height.
    if "::isa_avx512bf16_rows::" in name:
        return "isa_avx512bf16"
    for variant in ("isa_avx512bf16", "isa_avx512", "isa_avx2", "isa_generic"):
        if f"::{variant}::" in name:
            return variant
    return None


def test_wide_instructions_only_in_their_step_kernels():
    functions = _functions()
    seen = defaultdict(int)
    avx_outside, zmm_outside, bf16_outside = [], [], []
    for name, code in functions.items():
        variant = _variant(name)
        seen[variant] += 1
        uses_vex = any(m.startswith("v") for m, _ in code)
        uses_zmm = any("zmm" in ops for _, ops in code)
        uses_bf16 = any(m.startswith(BF16_MNEMONICS) for m, _ in code)
        if variant not in ("isa_avx2",) + AVX512_VARIANTS and uses_vex:
            avx_outside.append(name)
        if variant not in AVX512_VARIANTS and uses_zmm:
            zmm_outside.append(name)
        if variant != "isa_avx512bf16" and uses_bf16:
            bf16_outside.append(name)
    # The step kernels are there, under the names this check relies on.
    assert all(seen[v] for v in ("isa_avx512bf16", "isa_avx512", "isa_avx2", "isa_generic")), dict(seen)
    assert not avx_outside, f"AVX instructions in baseline code: {avx_outside[:10]}"
    assert not zmm_outside, f"AVX-512 registers outside the AVX-512 kernels: {zmm_outside[:10]}"
    assert not bf16_outside, f"AVX512-BF16 instructions outside its kernels: {bf16_outside[:10]}"


def test_the_avx512_kernels_really_use_avx512():
    # Guards the check above against passing vacuously (e.g. a target pragma that stopped working).
    functions = _functions()
    wide = [n for n, code in functions.items()
            if _variant(n) == "isa_avx512" and any("zmm" in ops for _, ops in code)]
    assert wide


def test_the_bf16_kernels_really_use_the_bf16_dot_product():
    # The same guard for AVX512-BF16: its variant must hold the dot product, or it runs avx512's
    # widening path under another name.
    functions = _functions()
    dots = [n for n, code in functions.items()
            if _variant(n) == "isa_avx512bf16" and any(m.startswith("vdpbf16ps") for m, _ in code)]
    assert dots
