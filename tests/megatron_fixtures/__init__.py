"""Test fixtures for the Megatron adapter: CPU shims, a one-process model-parallel world, toy models.

Everything that bends megatron-core to run without CUDA lives here, never in the product.
"""
