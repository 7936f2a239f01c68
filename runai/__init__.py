"""runai: a private, offline Stable Diffusion server over the legacy runai socket protocol."""

__version__ = "0.1.0"
