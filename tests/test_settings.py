"""The settings table and the component registries: each is the one list of its facts, and
the flags, docs and README read them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gmv_engine import registry
from gmv_engine.settings import DEFAULTS, FIELDS, Settings, markdown

ROOT = Path(__file__).resolve().parent.parent


def test_docs_settings_is_generated_from_the_table():
    assert (ROOT / "docs" / "SETTINGS.md").read_text() == markdown(), (
        "docs/SETTINGS.md is out of date: run `.venv/bin/python -m gmv_engine.settings > docs/SETTINGS.md`")


def test_every_setting_has_help_a_group_and_an_environment_variable():
    for name, field in FIELDS.items():
        assert field.metadata["help"] and field.metadata["group"], name
        loaded = Settings.load(None, env={f"GMV_{name.upper()}": _text(getattr(DEFAULTS, name))})
        assert getattr(loaded, name) == getattr(DEFAULTS, name), name


def _text(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_flags_show_the_tables_defaults_and_env():
    run = subprocess.run([*__import__("helpers").GMV, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert f"(default {DEFAULTS.max_batch_size}; env GMV_MAX_BATCH_SIZE)" in text
    assert f"(default {DEFAULTS.recall_k}; env GMV_RECALL_K)" in text


def test_choices_come_from_the_registries():
    with pytest.raises(ValueError, match="reranker must be one of none, l2, aligned_l2, lpips, dreamsim"):
        Settings(reranker="magic").validate()
    with pytest.raises(ValueError, match="encoder must be one of pixels, vgg16"):
        Settings(encoder="resnet9000").validate()
    assert Settings(quality="maniqa", profile="offline").validate() is None


@pytest.mark.parametrize("kind", list(registry.KINDS))
def test_every_registered_component_states_its_facts(kind):
    from gmv_engine.models import weights_status

    for name in registry.names(kind):
        component = registry.spec(kind, name)
        if kind == "profile":
            for stage, chosen in component.components.items():
                assert chosen in registry.names(stage), (name, stage, chosen)
            continue
        assert component.description, name
        assert weights_status(kind, name).needs_weights == component.needs_pretrained_weights, name
        if component.needs_pretrained_weights:
            continue  # no weights here; their missing-weights path is tested in test_components.py
        built = component.build("cpu")
        assert built.name == name and built.needs_pretrained_weights is False
        if kind == "encoder":
            assert built.dim == component.facts["dim"] and built.metric == component.facts["metric"]
        elif kind == "reranker":
            assert built.feature_dim == component.facts["feature_dim"]
            assert component.facts["measures"] == "distance"


def test_quality_facts_match_pyiqa_model_cards():
    from gmv_engine.quality.pyiqa_metric import metric_facts

    for name in registry.names("quality"):
        facts = registry.spec("quality", name).facts
        if facts.get("library") == "pyiqa":
            low, high, lower_better = metric_facts(name)
            assert (tuple(facts["range"]), facts["lower_better"]) == ((low, high), lower_better), name


def test_readme_lists_every_registered_component():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- components -->\n", 1)[1].split("\n<!-- /components -->", 1)[0]
    assert table == registry.markdown_table(), "README's components table: run `python -m gmv_engine.registry`"
    for kind in ("encoder", "reranker", "quality", "profile"):
        for name in registry.names(kind):
            assert f"`{name}`" in readme, (kind, name)


def test_a_secret_setting_may_come_from_a_file_never_a_command_line(tmp_path):
    from gmv_engine.settings import Settings

    secret = tmp_path / "ledger-url"
    secret.write_text("postgresql://gmv:s3cret@db/x\n")
    settings = Settings.load(env={"GMV_LEDGER_URL_FILE": str(secret), "GMV_PORT_FILE": str(secret)})
    assert settings.ledger_url == "postgresql://gmv:s3cret@db/x" and settings.port == 50051  # secrets only
