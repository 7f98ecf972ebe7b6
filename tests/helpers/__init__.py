"""What the tests share: the fp64 reference (reference.py), the inputs and comparisons of the backend tests
(cases.py), the CPU emulator of the CUDA kernels (emulator.py) and the backends a test can run on
(backends.py)."""
