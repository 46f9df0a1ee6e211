# Sourced by the GPU scripts (gpu_session.sh, gpu_cuda_check.sh): where the CUDA tools are.
# Both take the interpreter whose torch knows the toolkit (CUDA_HOME) and print a path, or
# nothing (compute-sanitizer) when the tool is not found.

# compute-sanitizer: on PATH, else in torch's CUDA_HOME, else in /usr/local/cuda.
find_compute_sanitizer() {  # PYTHON
    local found cuda_root cand
    found=$(command -v compute-sanitizer || true)
    if [[ -z "$found" ]]; then
        cuda_root=$("$1" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
        for cand in "$cuda_root/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
            [[ -x "$cand" ]] && { found=$cand; break; }
        done
    fi
    echo "$found"
}

# nvcc: on PATH, else in torch's CUDA_HOME.
find_nvcc() {  # PYTHON
    command -v nvcc || echo "$("$1" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)")/bin/nvcc"
}
