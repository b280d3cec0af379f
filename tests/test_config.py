from pathlib import Path

import pytest

from jielong.tasks.config import ConfigError, load_config


def test_default_preset_is_tiny_and_valid():
    cfg = load_config()
    assert cfg.name == "tiny"
    assert cfg.ingest.sources[0].kind == "builtin"
    assert cfg.clean.gopher_quality.min_words == 5


def test_override_sets_typed_value():
    cfg = load_config("tiny", ["dedup.near.threshold=0.7", "split.test=0.1", "clean.c4.enabled=true"])
    assert cfg.dedup.near.threshold == 0.7
    assert cfg.split.test == 0.1
    assert cfg.clean.c4.enabled is True


def test_threshold_shorthand():
    assert load_config("tiny", ["dedup.threshold=0.7"]).dedup.near.threshold == 0.7


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["dedup.near.treshold=0.7"])
    message = str(err.value)
    assert "dedup.near.treshold" in message and "threshold" in message


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match="Did you mean: clean"):
        load_config("tiny", ["claen.html.mode=never"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["dedup.near.num_perm=lots"])
    assert "dedup.near.num_perm" in str(err.value) and "lots" in str(err.value)


def test_bands_must_divide_num_perm():
    with pytest.raises(ConfigError, match="must divide"):
        load_config("tiny", ["dedup.near.bands=7"])


def test_unknown_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("clean:\n  gopher_quality:\n    min_wrds: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "clean.gopher_quality.min_wrds" in str(err.value) and "min_words" in str(err.value)


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nonexistent")


def test_bad_source_kind():
    with pytest.raises(ConfigError, match="ingest.sources"):
        load_config("tiny", ["ingest.sources=[{kind: ftp, path: x}]"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["dedup"])


def test_config_hash_ignores_workspace():
    a = load_config("tiny", ["workspace=/tmp/a"])
    b = load_config("tiny", ["workspace=/tmp/b"])
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != load_config("tiny", ["dedup.threshold=0.7"]).config_hash()


def test_unknown_key_inside_a_list_of_sources_suggests():
    with pytest.raises(ConfigError, match="Did you mean: path"):
        load_config("tiny", ["ingest.sources=[{kind: files, paht: x}]"])
    with pytest.raises(ConfigError, match="Did you mean: path"):
        load_config("tiny", ["instruct.sources=[{kind: chat, pth: x}]"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_every_shipped_preset_is_valid(preset: str):
    cfg = load_config(preset)
    assert cfg.name == preset


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path: Path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").name == "tiny"
