from pathlib import Path

from core_jax.config import load_config
from sr_jax.generator import GeneratorConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_sr_generator_yaml_lists_the_real_defaults():
    path = CONFIGS / "sr_generator.yaml"
    assert load_config(GeneratorConfig, path, []) == GeneratorConfig()
    listed = {line.split(":")[0] for line in path.read_text().splitlines() if line[:1].isalpha()}
    assert listed == set(GeneratorConfig.__dataclass_fields__)  # every field is written out, none left implicit
