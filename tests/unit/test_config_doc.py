"""docs/configuration.md: its settings tables are generated from serving/config.py and stay current.

The same pattern as deploy/render.py (tests/unit/test_deploy.py): the committed page must equal a
fresh render, so a setting added, renamed or re-described without `python -m serving.config_doc
--write` fails here. And what the page says about the environment is what `load_settings` does.
"""

from __future__ import annotations

import re
from typing import Literal

import pytest
from pydantic import Field

from serving import config_doc
from serving.config import LIST_FIELDS, MINIO_ENV, FarmSettings, load_settings


def test_configuration_page_is_current():
    assert not config_doc.outdated(), "run `python -m serving.config_doc --write`"
    assert config_doc.main(["--check"]) == 0


def test_every_setting_has_a_row_with_its_variable_and_description():
    text = config_doc.DOC.read_text()
    block = text.split(config_doc.BEGIN, 1)[1].split(config_doc.END, 1)[0]
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `(\w+)` \|.*$", block, re.M)}
    for name, info in FarmSettings.model_fields.items():
        assert name in rows, name
        assert f"`I2V_{name.upper()}`" in rows[name]
        assert info.description and config_doc._cell(info.description) in rows[name]
    for name, aliases in MINIO_ENV.items():
        assert all(f"`{a}`" in rows[name] for a in aliases)
    for name in LIST_FIELDS:
        assert "comma-separated" in rows[name]


def test_a_new_setting_shows_as_drift(tmp_path, monkeypatch):
    class Extended(FarmSettings):
        frobnicate: Literal["a", "b"] = Field("a", description="A setting nobody documented yet.")
        budget_bytes: int = Field(2**30, ge=1, le=2**40, description="Bytes.")

    page = tmp_path / "configuration.md"
    page.write_text(config_doc.DOC.read_text())
    monkeypatch.setattr(config_doc, "DOC", page)
    assert not config_doc.outdated()
    monkeypatch.setattr(config_doc, "FarmSettings", Extended)
    assert config_doc.outdated()
    assert config_doc.main(["--check"]) == 1
    assert config_doc.main(["--write"]) == 0
    assert not config_doc.outdated()
    text = page.read_text()
    assert ("| `frobnicate` | `I2V_FROBNICATE` | `a` \\| `b` | `a` | A setting nobody documented yet. |") in text
    assert "| `budget_bytes` | `I2V_BUDGET_BYTES` | int, 1-1099511627776 | `1073741824` (1 GiB) | Bytes. |" in text
    # only the generated block changed: the prose around it is kept
    before, after = config_doc.DOC.read_text(), text
    assert before.split(config_doc.BEGIN)[0] == after.split(config_doc.BEGIN)[0]
    assert before.split(config_doc.END)[1] == after.split(config_doc.END)[1]


def test_a_page_without_markers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="marker"):
        config_doc.render("# Configuration\n", tmp_path / "x.md")


# --- what the page says about the environment ----------------------------------------------------


def test_each_documented_variable_sets_its_field():
    settings = load_settings(env={"I2V_PORT": "8080", "I2V_SPILL": "false", "I2V_MODEL": "sim",
                                  "I2V_WORKERS": '{"16gb": {"max_replicas": 2}}',
                                  "I2V_CLASSES": '[{"name": "16gb", "memory_gib": 16, "gpu": "rtx4090-24gb"}]'})
    assert (settings.port, settings.spill, settings.model) == (8080, False, "sim")
    assert settings.workers["16gb"].max_replicas == 2 and [c.name for c in settings.classes] == ["16gb"]


@pytest.mark.parametrize("name", LIST_FIELDS)
def test_list_settings_are_comma_separated_or_json(name):
    var = "I2V_" + name.upper()
    assert getattr(load_settings(env={var: "10.0.0.0/8, example.org"}), name) == ["10.0.0.0/8", "example.org"]
    assert getattr(load_settings(env={var: '["10.0.0.1"]'}), name) == ["10.0.0.1"]


def test_minio_variables_are_read_and_i2v_wins():
    for name, aliases in MINIO_ENV.items():
        for alias in aliases:
            value = "true" if name == "s3_secure" else "from-minio"
            got = getattr(load_settings(env={alias: value}), name)
            assert got == (True if name == "s3_secure" else "from-minio"), (name, alias)
    env = {"MINIO_ENDPOINT": "minio:9000", "I2V_S3_ENDPOINT": "s3.internal:9000"}
    assert load_settings(env=env).s3_endpoint == "s3.internal:9000"


def test_empty_variables_count_as_unset():
    assert load_settings(env={"I2V_PORT": "", "MINIO_ENDPOINT": ""}).port == 8000
