"""Optional hand-written kernels (Triton). Imported lazily: the library works without Triton installed."""
