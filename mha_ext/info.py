"""`python -m mha_ext.info`: what was built and what is running — torch version built against and
running, CPU ISA and GEMM engine, threads, CUDA archs or none."""

from __future__ import annotations

import platform

import torch


def describe() -> dict:
    import mha_ext

    built = mha_ext.build_info()
    return {
        "mha_ext": mha_ext.__version__,
        "torch (built against)": built["torch_version"],
        "torch (running)": torch.__version__,
        "cpu": cpu_model(),
        "cpu ISA (kernels)": built["cpu_isa"],
        "cpu GEMM engine": built["cpu_gemm"],
        "cpu bf16 products": built["cpu_bf16_products"],
        "threads": torch.get_num_threads(),
        "cuda kernels": built["cuda_archs"] if built["cuda"] else "none (CPU-only build)",
        "cuda device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    for key, value in describe().items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
