"""Compile the Triton kernels for a GPU target without a GPU (frontend, LLVM and ptxas).

The interpreter accepts code a real compile rejects (dot shapes below 16, some constructs);
this catches that on machines without a GPU:

    python -m lstm_fused.triton.compile_check [--arch 90] [-v]

Run it in a fresh process without TRITON_INTERPRET: kernels are defined (interpreted or not)
when ``kernels.py`` is first imported.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (it makes the kernels interpreted)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lstm_fused.triton import kernels  # noqa: E402

# Pointer arguments that are not in the input dtype.
FP32_POINTERS = {"c_all_ptr", "c_state_ptr", "dh_total_ptr", "dh_state_ptr", "dc_state_ptr"}
OTHER_POINTERS = {"lengths_ptr": "*i64", "barrier_ptr": "*i32"}
RUNTIME_STEP_ARGS = {"step_begin", "step_end", "seq_len"}  # no divisibility assumed


def compile_variant(kernel, dtype: str, constexprs: dict, target: GPUTarget, num_warps=4, num_stages=2):
    fn = kernel.fn  # the JITFunction under the autotuner
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = OTHER_POINTERS.get(name, "*fp32" if name in FP32_POINTERS else dtype)
        else:
            signature[name] = "i32"
        if name not in RUNTIME_STEP_ARGS:  # as the launcher specializes sizes divisible by 16
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if constexprs.get("SYNC") == kernels.SYNC_GRID:
        options["launch_cooperative_grid"] = True  # as recurrence.py launches the grid barrier
    return triton.compile(source, target=target, options=options)


def variants():
    """(kernel name, dtype, constexprs) covering every sync mode, phase split and flag."""
    modes = [  # (SYNC, GATES_PHASE, SECOND_PHASE)
        (kernels.SYNC_GRID, True, True),
        (kernels.SYNC_PROGRAM, True, True),
        (kernels.SYNC_NONE, True, False),
        (kernels.SYNC_NONE, False, True),
    ]
    for dtype, (sync, gates, second), proj in itertools.product(("*bf16", "*fp16", "*fp32"), modes, (False, True)):
        common = dict(
            REVERSE=proj, HAS_LENGTHS=not proj, HAS_PROJ=proj, GATES_PHASE=gates, SECOND_PHASE=second,
            SYNC=sync, SHARED_LOAD=".cg" if sync == kernels.SYNC_GRID else "",
            DOT_PRECISION="tf32" if dtype == "*fp32" else "ieee", UPCAST=dtype == "*fp32",
            BLOCK_B=16, BLOCK_H=32, BLOCK_K=32,
        )  # fmt: skip
        yield "lstm_forward_kernel", dtype, dict(common, SAVE=True)
        yield "lstm_backward_kernel", dtype, dict(common, SAVE_DH_TOTAL=proj)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    count = 0
    for name, dtype, constexprs in variants():
        compiled = compile_variant(getattr(kernels, name), dtype, constexprs, target)
        assert compiled.asm.get("cubin"), f"{name} {dtype}: no cubin"
        count += 1
        if args.verbose:
            flags = {k: v for k, v in constexprs.items() if k in ("SYNC", "GATES_PHASE", "SECOND_PHASE", "HAS_PROJ")}
            print(f"ok {name} {dtype} {flags} shared={compiled.metadata.shared}", flush=True)
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
