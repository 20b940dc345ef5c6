"""jax_mscclpp_ep."""
