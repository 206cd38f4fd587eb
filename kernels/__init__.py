"""Hot ops. Each op has a plain-torch reference, which is also the CPU path; Triton kernels for the
GPU path come beside their reference and are tested against it."""
