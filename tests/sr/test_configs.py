from pathlib import Path

import pytest

from core_jax.config import ConfigError, load_config
from sr_jax.config import SRConfig
from sr_jax.generator import GeneratorConfig, sample

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_sr_generator_yaml_lists_the_real_defaults():
    path = CONFIGS / "sr_generator.yaml"
    assert load_config(GeneratorConfig, path, []) == GeneratorConfig()
    listed = {line.split(":")[0] for line in path.read_text().splitlines() if line[:1].isalpha()}
    assert listed == set(GeneratorConfig.__dataclass_fields__)  # every field is written out, none left implicit


@pytest.mark.parametrize("override", ["eval.n_points=1", "data.point_buckets=[1]", "data.generator.max_len=1",
                                      "data.generator.n_points=1", "data.generator.n_prediction_points=1"])
def test_point_counts_the_generator_cannot_sample_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^config key '{key}' must be (a list of items each )?>= 2 \(the "
                                          rf"generator standardises each input column\), got (1|\(1,\))$"):
        load_config(SRConfig, CONFIGS / "sr_tiny.yaml", [override])


@pytest.mark.parametrize("n_points", [1, 2])
def test_two_points_is_the_generators_real_minimum(n_points):
    """The rule above matches the generator: one point gives no sample at all, two points do."""
    cfg = GeneratorConfig(max_input_dimension=1, n_points=n_points, max_attempts=20)
    if n_points == 1:
        with pytest.raises(RuntimeError, match="no valid expression"):
            sample(0, cfg)
    else:
        assert sample(0, cfg).x_NxD.shape == (2, 1)
    assert load_config(SRConfig, CONFIGS / "sr_tiny.yaml", [f"eval.n_points={max(n_points, 2)}"]).eval.n_points == 2
