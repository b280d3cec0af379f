"""Model cards: what a card says of the base model, whatever the folder holds."""

import json
from pathlib import Path

from jielong.tasks.lib.model_card import base_model, front_matter


def test_base_model_facts_from_a_card_a_converted_gguf_or_nothing(tmp_path: Path):
    assert base_model(None, None)["name"].startswith("none")
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: mit\nbase_model: org/base\n---\n# A model\n")
    assert base_model(str(card), card) | {"name": None} == {"name": None, "license": "mit", "hub_id": "org/base"}
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "manifest.json").write_text(json.dumps({"digest": "ab", "license": "apache-2.0", "hub_id": "org/x",
                                                         "gguf_name": "X", "gguf_file": "x.gguf"}))
    assert base_model("builtin:x", converted) == {"name": "builtin:x (X, from x.gguf)", "license": "apache-2.0", "hub_id": "org/x"}


def test_unrelated_or_broken_files_in_a_model_folder_are_ignored(tmp_path: Path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    (tmp_path / "README.md").write_text("---\n: [unclosed\n---\n")
    assert base_model(str(tmp_path), tmp_path) == {"name": str(tmp_path), "license": None, "hub_id": None}
    (tmp_path / "manifest.json").write_text("{not json")
    (tmp_path / "README.md").write_text("no front matter")
    assert front_matter(tmp_path / "README.md") == {} and base_model("org/name", tmp_path)["hub_id"] == "org/name"
