from pathlib import Path

import pytest

from cluster.config import EngineConfig, load_config
from cluster.errors import ConfigError, ModelNotFoundError, UnknownDrafterError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_config_parses():
    config = load_config(ROOT / "configs" / "default.yaml", check_paths=False)
    assert isinstance(config, EngineConfig)
    assert config.drafter.kind == "ngram" and config.speculation.k == 4
    assert Path(config.target.path).is_absolute()  # resolved relative to the file


@pytest.mark.parametrize(
    "text, key",
    [
        ("target: {path: x, dtyp: float32}", "target.dtyp"),
        ("speculation: {k: four}", "speculation.k"),
        ("limits: {max_batch_size: true}", "limits.max_batch_size"),
        ("target: {path: x, dtype: float8}", "target.dtype"),
        ("target: {path: x}\nspeculation: {k: 9, k_max: 8}", "speculation.k"),
        ("target: {path: x}\nbogus: 1", "bogus"),
        ("target: {path: x}\ndrafter: {kind: model}", "drafter.model"),
    ],
)
def test_bad_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), check_paths=False)
    assert str(err.value).startswith(key)


def test_unknown_drafter_kind(tmp_path):
    with pytest.raises(UnknownDrafterError, match="drafter.kind: unknown drafter 'medusa9'"):
        load_config(_write(tmp_path, "target: {path: x}\ndrafter: {kind: medusa9}"), check_paths=False)


def test_missing_model_directory_names_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="target.path: model directory .*nowhere.* does not exist"):
        load_config(_write(tmp_path, "target: {path: nowhere}"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_validating_a_config_imports_no_torch():
    """The config <-> registry <-> loader cycle is broken: validation never touches model code."""
    import subprocess
    import sys

    code = ("import sys; from cluster.config import load_config; "
            "[load_config(f'configs/{n}.yaml', check_paths=False) for n in ('default', 'k8s', 'bench_qwen_coder')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text, key", [
    ("target: {path: x}\ndrafter: {kind: ngram, ngram: {ngram_min: 5, ngram_max: 2}}", "drafter.ngram.ngram_min"),
    ("target: {path: x}\ndrafter: {kind: ngram, model: {path: y}}", "drafter.model"),
    ("target: {path: x}\ndrafter: {kind: model, model: {path: y, confidence_threshold: 2}}",
     "drafter.model.confidence_threshold"),
    ("target: {path: x}\ndrafter: {kind: model, model: {path: y, dtyp: float32}}", "drafter.model.dtyp"),
    ("target: {path: x}\ndrafter: {kind: ngram, ngram_min: 1}", "drafter.ngram_min"),
    ("target: {path: x}\nspeculation: {rule: magic}", "speculation.rule"),
])
def test_each_drafter_kind_has_its_own_section(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), check_paths=False)
    assert str(err.value).startswith(key), str(err.value)
