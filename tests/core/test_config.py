"""Config loading: YAML + overrides into frozen dataclasses, with errors that name the key."""

import dataclasses
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    with pytest.raises(ConfigError, match=r"^config '.*' is a folder; give a YAML file"):
        load_config(Outer, tmp_path)
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


# ----- validation at load time ---------------------------------------------------------------------------------

def test_empty_file_is_an_error(tmp_path):
    for text in ("", "# only a comment\n", "\ufeff"):
        path = tmp_path / "empty.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"config file .*empty\.yaml' is empty"):
            load_config(Outer, path)


@dataclasses.dataclass(frozen=True)
class Ranged:
    n: int = 1
    rate: float = 0.5
    limit: float = float("inf")
    inner: Inner = Inner()

    @staticmethod
    def config_rules(c):
        from core_jax.config import Rule, at_least, positive
        return [("n", at_least(1)), ("rate", positive()), ("limit", Rule(lambda v: v > 0, "> 0 (inf allowed)")),
                ("inner.width", Rule(lambda w: w % c["n"] == 0, f"a multiple of n ({c['n']})"))]


@pytest.mark.parametrize("overrides,message", [
    (["n=0"], "config key 'n' must be >= 1, got 0"),
    (["rate=nan"], "config key 'rate' must be a finite number > 0, got nan"),
    (["rate=-1e-3"], "config key 'rate' must be a finite number > 0, got -0.001"),
    (["limit=-inf"], r"config key 'limit' must be > 0 \(inf allowed\), got -inf"),
    (["n=3", "inner.width=8"], r"config key 'inner.width' must be a multiple of n \(3\), got 8"),
    (["inner.rate=inf"], "config key 'inner.rate' must be a finite number, got inf"),  # no rule: finite
])
def test_rules_name_key_and_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Ranged, None, overrides)


def test_rules_allow_what_they_allow():
    cfg = load_config(Ranged, None, ["limit=inf", "n=4", "inner.width=8"])
    assert cfg.limit == float("inf") and cfg.n == 4
    assert load_config(Ranged, None, []).limit == float("inf")  # defaults are checked too, and pass


def test_rules_run_before_post_init():
    """A section's own __post_init__ never sees a value a rule rejects (here it would divide by zero)."""
    @dataclasses.dataclass(frozen=True)
    class Div:
        a: int = 4
        b: int = 2

        def __post_init__(self):
            assert self.a % self.b == 0

    @dataclasses.dataclass(frozen=True)
    class Top:
        div: Div = Div()

        @staticmethod
        def config_rules(c):
            from core_jax.config import at_least
            return [("div.b", at_least(1))]

    with pytest.raises(ConfigError, match="'div.b' must be >= 1, got 0"):
        load_config(Top, None, ["div.b=0"])


_DIGITS = st.text("0123456789", min_size=1, max_size=6)


@st.composite
def float_spellings(draw):
    """Decimal numbers as a user types them: 1e-3, 1E3, .5, 5., -2.5e+4, 010, +7."""
    sign = draw(st.sampled_from(["", "-", "+"]))
    whole = draw(st.one_of(st.just(""), _DIGITS))
    frac = draw(st.one_of(st.just(""), _DIGITS))
    if not whole and not frac:
        whole = "0"
    dot = "." if frac or draw(st.booleans()) else ""
    exp = draw(st.one_of(st.just(""), st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"),
                                                 st.sampled_from(["", "+", "-"]), st.text("0123456789", min_size=1,
                                                                                           max_size=2))))
    return f"{sign}{whole}{dot}{frac}{exp}"


@settings(max_examples=100, deadline=None)
@given(float_spellings())
def test_every_float_spelling_parses(text):
    cfg = load_config(Outer, None, [f"inner.rate={text}"])
    assert cfg.inner.rate == float(text)


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E3", 1e3), (".5", 0.5), ("-2.5e+4", -2.5e4),
                                        ("010", 10.0), ("5.", 5.0), (" 2 ", 2.0)])
def test_float_spellings_in_overrides_and_files(tmp_path, text, value):
    assert load_config(Outer, None, [f"inner.rate={text}"]).inner.rate == value
    path = tmp_path / "c.yaml"
    path.write_text(f"inner: {{rate: {text.strip()}}}\n")
    assert load_config(Outer, path).inner.rate == value


def test_integers_from_float_spellings():
    assert load_config(Outer, None, ["inner.width=1e3"]).inner.width == 1000
    assert load_config(Outer, None, ["inner.width=010"]).inner.width == 10
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(Outer, None, ["inner.width=1.5e0"])
    with pytest.raises(ConfigError, match="expects a string"):
        load_config(Outer, None, ["name=12"])


ARITH_BAD = [
    ("model.heads=0", "'model.heads' must be >= 1, got 0"),
    ("model.width=0", "'model.width' must be >= 1, got 0"),
    ("model.width=30", r"'model.width' must be divisible by model.heads \(4\), got 30"),
    ("model.dtype=float16", r"'model.dtype' must be one of \['float32', 'bfloat16'\], got 'float16'"),
    ("model.ffn=33", "'model.ffn' must be even"),
    ("train.log_every=0", "'train.log_every' must be >= 1, got 0"),
    ("train.ckpt_every=0", "'train.ckpt_every' must be >= 1, got 0"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be >= 1, got 0"),
    ("train.steps=0", "'train.steps' must be >= 1, got 0"),
    ("train.steps=-5", "'train.steps' must be >= 1, got -5"),
    ("train.optim.lr=nan", "'train.optim.lr' must be a finite number > 0, got nan"),
    ("train.optim.lr=-1e-3", "'train.optim.lr' must be a finite number > 0"),
    ("train.optim.b2=1", r"'train.optim.b2' must be in \[0, 1\)"),
    ("data.max_len=100", r"'data.max_len' must be <= 54 \(the longest operand the position table holds"),
    ("eval.max_len=63", "'eval.max_len' must be <= 62"),
    ("eval.sweep=[5,500]", "'eval.sweep' must be a list of items each <= 62"),
    ("eval.recurrences=0", "'eval.recurrences' must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", ARITH_BAD)
def test_arith_config_ranges(override, message):
    from pathlib import Path

    from arith_jax.config import ArithConfig
    tiny = Path(__file__).resolve().parents[2] / "configs" / "arith_tiny.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(ArithConfig, tiny, [override])


def test_arith_learned_positions_cover_the_sequence():
    from arith_jax.config import ArithConfig, sequence_length
    cfg = load_config(ArithConfig, None, ["model.positions=[learned]", "model.table_size=64", "data.max_len=20",
                                          "eval.max_len=20"])
    assert sequence_length("add", 20, 0) == 64 == cfg.model.table_size
    with pytest.raises(ConfigError, match="'data.max_len' must be <= 20"):
        load_config(ArithConfig, None, ["model.positions=[learned]", "model.table_size=64", "data.max_len=21"])


@pytest.mark.parametrize("override,message", [
    ("model.heads=0", "'model.heads' must be >= 1, got 0"),
    ("train.ckpt_every=0", "'train.ckpt_every' must be >= 1, got 0"),
    ("eval.n_points=1", r"'eval.n_points' must be >= 2 \(the generator standardises each input column\), got 1"),
    ("data.bucket_weights=[nan]", "'data.bucket_weights' must be a list of items each >= 0"),
    ("model.max_dim=1", r"'data.generator.max_input_dimension' must be in \[1, model.max_dim = 1\], got 2"),
])
def test_sr_config_ranges(override, message):
    from pathlib import Path

    from sr_jax.config import SRConfig
    tiny = Path(__file__).resolve().parents[2] / "configs" / "sr_tiny.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(SRConfig, tiny, [override])


def test_shipped_sr_configs_and_models_load():
    from pathlib import Path

    from arith_jax.train import load_trained as load_arith
    from sr_jax.config import SRConfig
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("sr_e2e*.yaml")):
        assert load_config(SRConfig, path).name == path.stem
    assert load_arith(Path(__file__).resolve().parents[2] / "arith_jax" / "pretrained" / "add_small")[0].data.max_len
