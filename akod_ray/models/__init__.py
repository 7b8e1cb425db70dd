"""The denoising U-Net, its layers and the Multi-Scale Feature Integrator (plain PyTorch)."""
