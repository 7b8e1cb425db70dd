"""akod_ray: Adaptive Kernel Optimized Diffusion (AKOD) on Ray."""

__version__ = "0.1.0"
