"""edit_jax: efficient diffusion transformers (SiT with attention mediators, EDT, DyDiT) in JAX."""
from edit_jax import hostmem as _hostmem

# Before any JAX backend starts: reuse XLA:CPU's per-step buffers instead of page-faulting them
# in every step (edit_jax/hostmem.py; EDIT_JAX_CPU_MALLOC=off disables it).
_hostmem.configure()
