"""Config loading: YAML + overrides into frozen dataclasses, with errors that name the key."""

import dataclasses
from typing import Literal

import pytest

from core_jax.config import ConfigError, apply_overrides, from_dict, load_config, replace, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8
    rate: float = 0.1
    kinds: tuple[str, ...] = ("a",)
    mode: Literal["x", "y"] = "x"
    opt: int | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "n"
    inner: Inner = Inner()
    flag: bool = False


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run1\ninner: {width: 16, kinds: [a, b]}\n")
    cfg = load_config(Outer, path, ["inner.rate=3", "flag=true", "inner.opt=4", "inner.mode=y"])
    assert cfg == Outer(name="run1", inner=Inner(width=16, rate=3.0, kinds=("a", "b"), mode="y", opt=4), flag=True)
    assert from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"


def test_replace_dotted():
    cfg = replace(Outer(), **{"inner.width": 32, "name": "z"})
    assert cfg.inner.width == 32 and cfg.name == "z" and cfg.inner.rate == 0.1


@pytest.mark.parametrize("overrides,message", [
    (["inner.widht=3"], "unknown config key 'inner.widht'"),
    (["inner.width=abc"], "expects an integer"),
    (["inner.width=1.5"], "expects an integer"),
    (["flag=3"], "expects true/false"),
    (["inner.mode=z"], "must be one of"),
    (["inner=3"], "is a section"),
    (["inner.kinds=a"], "expects a list"),
    (["noequals"], "key.path=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(Outer, lst)


def test_overrides_do_not_mutate_input():
    data = {"inner": {"width": 1}}
    apply_overrides(data, ["inner.width=2"])
    assert data == {"inner": {"width": 1}}


def test_shipped_configs_load():
    from pathlib import Path

    from arith_jax.config import ArithConfig
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("arith_*.yaml")):
        cfg = load_config(ArithConfig, path)
        assert cfg.name == path.stem, path
