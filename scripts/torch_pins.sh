# The torch builds the project's scripts install, in one place: the CPU build that ./dev.sh sets up for the
# tests, the benchmark and CI, and the CUDA build that scripts/ci_cuda_build.sh compiles and links against
# (pip takes both from local disk on this project's machines). Sourced by those scripts.
TORCH_CPU_SPEC="torch==2.13.0"
TORCH_CUDA_SPEC="torch==2.14.1"
