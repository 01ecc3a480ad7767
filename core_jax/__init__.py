"""core_jax: the pieces both packages share — attention, configs, optimizer, sharding, checkpoints, training loop."""
