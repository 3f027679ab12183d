"""The option value types (options.py) and specs (spec.py): parsed once, each default written once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from winclip_cli import options
from winclip_cli.core.backbone import DEFAULT_WEIGHTS
from winclip_cli.core.prompts import DEFAULT_CLASS
from winclip_cli.errors import SetupError
from winclip_cli.options import BatchSize, Device, HeatmapFormat, Precision, ScoringMode, Threshold, Tiling
from winclip_cli.spec import InputSpec, ModelOptions, ModelSpec, OutputSpec

PACKAGE = Path(options.__file__).resolve().parent
DEFAULTS = {name: value for name, value in vars(options).items() if name.startswith("DEFAULT_")}
DEFAULTS |= {"DEFAULT_CLASS": DEFAULT_CLASS, "DEFAULT_WEIGHTS": DEFAULT_WEIGHTS}


def _literal(node: ast.expr) -> object:
    """The value of a literal default (a constant, a tuple of constants, Path('...')), else a marker."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path" and node.args:
        try:
            return Path(ast.literal_eval(node.args[0]))
        except ValueError:
            pass
    return _literal


def _defaults_written_in(path: Path) -> list[tuple[int, object]]:
    """Every parameter default and class field default of a module that is a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            values = [d for d in [*node.args.defaults, *node.args.kw_defaults] if d is not None]
        elif isinstance(node, ast.ClassDef):
            values = [s.value for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None]
        else:
            continue
        found += [(value.lineno, _literal(value)) for value in values]
    return found


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def test_no_default_is_restated_as_a_literal_below_options() -> None:
    """A default is a DEFAULT_* name of options.py; no parameter or field anywhere else spells its value."""
    assert {"DEFAULT_TILE_OVERLAP", "DEFAULT_HEATMAPS", "DEFAULT_THRESHOLD", "DEFAULT_PRECISION"} <= set(DEFAULTS)
    restated = [
        f"{path.relative_to(PACKAGE).as_posix()}:{line} restates {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "options.py"
        for line, value in _defaults_written_in(path)
        for name, default in DEFAULTS.items()
        if _same(value, default)
        and not (path.name == "backbone.py" and name == "DEFAULT_WEIGHTS")
        and not (path.name == "prompts.py" and name == "DEFAULT_CLASS")
    ]
    assert restated == []


@pytest.mark.parametrize("word", ["png", "jpg", "fp32", "bf16", "fp16", options.DEFAULT_ARCHITECTURE, "auto"])
def test_option_words_are_spelled_in_options_py_only(word: str) -> None:
    """The words an option takes are the value types' members: other modules use the members."""
    spelled = [
        f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "options.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == word
    ]
    assert spelled == []


def test_value_types_parse_option_text_once() -> None:
    assert HeatmapFormat.parse("jpg") is HeatmapFormat.JPG and HeatmapFormat.JPG.suffix == ".jpg"
    assert HeatmapFormat.NONE.suffix == "" and options.HEATMAP_SUFFIXES == (".png", ".jpg")
    with pytest.raises(SetupError, match="--heatmaps takes png, jpg, none, not 'gif'"):
        HeatmapFormat.parse("gif")
    assert Precision.parse("BF16") is Precision.BF16 and Precision.BF16.dtype_name == "bfloat16"
    with pytest.raises(SetupError, match="unknown precision 'fp8'"):
        Precision.parse("fp8")
    assert Device.parse("CUDA:1") == Device("cuda:1") and str(Device.parse("cpu")) == "cpu"
    with pytest.raises(SetupError, match="unknown device 'gpu'"):
        Device.parse("gpu")
    assert Tiling.parse(None) == Tiling() and not Tiling().enabled and Tiling().recorded_overlap is None
    assert Tiling.parse("auto", 0.5) == Tiling("auto", 0.5) and Tiling(480).recorded_overlap == 0.25
    with pytest.raises(SetupError, match="--tile-overlap must be in"):
        Tiling.parse("480", 1.0)
    with pytest.raises(SetupError, match="tiles must be at least 240"):
        Tiling(200).check_fits((240, 240))
    assert Threshold.parse("auto").auto and Threshold.parse("0.7") == Threshold(0.7)
    with pytest.raises(SetupError, match="between 0 and 1"):
        Threshold.parse("1.5")
    assert BatchSize(3).value == 3 and not BatchSize(3).is_auto and BatchSize.parse("Auto").is_auto
    with pytest.raises(SetupError, match="--batch-size"):
        BatchSize(0)
    assert ScoringMode.of_refs(None) is ScoringMode.ZERO_SHOT
    assert ScoringMode.of_refs(Path("refs.npz")).uses_references


def test_scoring_mode_pool_size_and_layers() -> None:
    refs = Path("refs.npz")
    assert ScoringMode.parse(None, None) is ScoringMode.ZERO_SHOT and ScoringMode.parse(None, refs).uses_references
    assert ScoringMode.parse("Mutual", None) is ScoringMode.MUTUAL and not ScoringMode.MUTUAL.uses_references
    assert ScoringMode.parse("few-shot", refs) is ScoringMode.FEW_SHOT
    with pytest.raises(SetupError, match="--mode few-shot needs a reference memory"):
        ScoringMode.parse("few-shot", None)
    with pytest.raises(SetupError, match="--mode mutual takes no --refs"):
        ScoringMode.parse("mutual", refs)
    # a mutual threshold applies to raw scores, distances up to 2; WinCLIP's scores stay in [0, 1]
    assert ScoringMode.MUTUAL.score_range == 2.0 and ScoringMode.ZERO_SHOT.score_range == 1.0
    assert Threshold.parse("1.5", upper=ScoringMode.MUTUAL.score_range) == Threshold(1.5)
    assert int(options.PoolSize()) == options.DEFAULT_POOL_SIZE == 200 and int(options.PoolSize(3)) == 3
    with pytest.raises(SetupError, match="--pool-size must be at least 3"):
        options.PoolSize(2)
    assert options.Layers.parse("auto").blocks is None and str(options.Layers()) == "auto"
    assert options.Layers.parse("11, 2,5 8").blocks == (2, 5, 8, 11) and str(options.Layers((2, 5))) == "2,5"
    for bad in ("", "2,2", "-1", "x"):
        with pytest.raises(SetupError, match="--layers"):
            options.Layers.parse(bad)


def test_specs_hold_parsed_values_and_the_defaults() -> None:
    """A Python caller may still give device and precision as text: ModelSpec parses them as the CLI does."""
    model = ModelSpec(device="CPU", precision="auto")
    assert model.device == Device("cpu") and model.precision is Precision.AUTO
    assert ModelSpec().precision is Precision(options.DEFAULT_PRECISION) and ModelSpec().scales == (2, 3)
    with pytest.raises(SetupError):
        ModelSpec(device="tpu")
    inputs = InputSpec()
    assert inputs.batch_size.value == options.DEFAULT_BATCH_SIZE and inputs.tiling.overlap == 0.25
    assert OutputSpec(Path("out")).heatmaps is HeatmapFormat.PNG
    # the Python API's older name, positional as the benchmarks call it
    expected = ModelSpec("ViT-B-16", "w.pt", Device("cpu"), Precision.BF16)
    assert ModelOptions("ViT-B-16", "w.pt", "cpu", "bf16") == expected
