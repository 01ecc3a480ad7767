"""sr_jax: end-to-end symbolic regression (Kamienny et al. 2022) in JAX: expressions, the training-data generator,
float tokens, a batched interpreter and vectorised BFGS constant refinement.

``sr_jax.refine`` is the refinement function; its module is ``sr_jax.refinement``."""
from .expressions import OPERATORS, Expression
from .float_tokens import FloatEncoder, Vocabulary
from .generator import ExpressionGenerator, GeneratorConfig, Sample, sample, sample_stream
from .interpreter import compile_tape, evaluate
from .metrics import accuracy, complexity, compute_metrics, mse, nmse, r2, r2_zero, symbolically_equivalent
from .refinement import Beaten, RefineResult, make_refine_fn, refine

__all__ = ["OPERATORS", "Expression", "FloatEncoder", "Vocabulary", "ExpressionGenerator", "GeneratorConfig",
           "Sample", "sample", "sample_stream", "compile_tape", "evaluate", "accuracy", "complexity",
           "compute_metrics", "mse", "nmse", "r2", "r2_zero", "symbolically_equivalent", "Beaten", "RefineResult",
           "make_refine_fn", "refine"]
from .estimator import Equation, SymbolicTransformerRegressor, enable_compilation_cache  # noqa: E402

__all__ += ["Equation", "SymbolicTransformerRegressor", "enable_compilation_cache"]
