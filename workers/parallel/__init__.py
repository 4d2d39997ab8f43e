"""Tensor parallelism: the sharding plan and its collectives, and the ranks' runtime."""
