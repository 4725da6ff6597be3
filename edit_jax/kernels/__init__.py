"""Attention kernels. Each kernel module holds its jnp reference next to the kernel."""
