"""The figures are written as real PNG files."""

import numpy as np
import pytest

from arith_jax.plots import plot_accuracy_grid, plot_length_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("size", [5, 100])
def test_accuracy_grid_png(tmp_path, size):
    acc = np.random.default_rng(0).random((size, size))
    acc[-1, -1] = np.nan  # a cell that was not evaluated
    path = plot_accuracy_grid(acc, tmp_path / "sub" / "grid.png", train_len=3, title="add")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_accuracy_grid_rejects_1d(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        plot_accuracy_grid(np.zeros(4), tmp_path / "x.png", train_len=2)


def test_length_sweep_png(tmp_path):
    path = plot_length_sweep([20, 40, 60], [1.0, 0.9, 0.2], tmp_path / "sweep.png", train_len=20)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
