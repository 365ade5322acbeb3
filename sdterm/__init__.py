"""sdterm: Stable Diffusion v1 text-to-image in the terminal, for small GPUs."""

__version__ = "0.1.0"
