"""arith_jax: Abacus-embedding transformers for addition, multiplication and sorting (McLeish et al. 2024)."""

from arith_jax.solver import Solver

__all__ = ["Solver"]
