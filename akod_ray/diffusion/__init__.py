"""The diffusion process, its schedules, samplers, and the DKO's building blocks (plain PyTorch)."""
