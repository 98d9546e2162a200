"""The plugin host: built-ins through the same manager, attribution, filtering, meta-tests."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from accord import hookimpl, hookspecs
from accord.plugins import PluginHost
from accord.registry import ComponentNotFoundError, PluginNotInstalledError

REPO = Path(__file__).resolve().parents[1]


def test_builtins_register_through_the_manager() -> None:
    host = PluginHost(load_entrypoints=False)
    assert host.plugin_names()[:2] == ["engine", "core"] or set(host.plugin_names()) >= {"engine", "core"}
    rows = {r["name"]: r for r in host.describe()}
    assert rows["core"]["builtin"] and rows["core"]["domain"] == "core"
    assert set(rows["core"]["tasks"]) == {"pretrain", "finetune", "evaluate", "benchmark"}
    assert "benchmark" in rows["engine"]["tasks"]
    assert rows["engine"]["components"]["loss"] and rows["engine"]["components"]["matcher"]


def test_lookup_by_qualified_and_bare_name_and_errors() -> None:
    host = PluginHost(load_entrypoints=False)
    assert host.tasks.get("core.pretrain").plugin == "core"
    with pytest.raises(PluginNotInstalledError, match=r"needs plugin 'medssl'.*Installed plugins: engine, core.*pip install accord-medssl"):
        host.tasks.get("medssl.pretrain")
    with pytest.raises(ComponentNotFoundError, match="did you mean 'evaluate'"):
        host.tasks.get("core.evalute")
    with pytest.raises(PluginNotInstalledError, match="plugin 'superflow' is not installed"):
        host.require_plugin("superflow")


def test_disable_env_blocks_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORD_DISABLE_PLUGINS", "core")
    assert "core" not in PluginHost(load_entrypoints=False).plugin_names()


def test_misspelt_hook_is_rejected_at_load() -> None:
    class Typo:
        @hookimpl
        def register_lossses(self, register):  # noqa: D401 - deliberately misspelt
            pass

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Typo(), name="typo")
    with pytest.raises(Exception, match="register_lossses"):
        host.pm.check_pending()


def test_duplicate_registration_is_an_error() -> None:
    class Twice:
        @hookimpl
        def register_losses(self, register):
            register("same", object)
            register("same", object)

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Twice(), name="twice")
    with pytest.raises(ValueError, match="'twice.same' is registered twice"):
        host.losses


class _AllHooks:
    """A class-based plugin implementing every hook once (llm's test-plugin style)."""

    @hookimpl
    def plugin_info(self):
        return {"domain": "test", "description": "implements every hook"}

    @hookimpl
    def register_tasks(self, register):
        from accord.config import RunConfig

        register("noop", lambda cfg: {"ok": True}, config=RunConfig)

    @hookimpl
    def register_models(self, register):
        register("tiny", lambda: None)

    @hookimpl
    def register_datasets(self, register):
        register("empty", synth=lambda out: out, check=lambda root: [])

    @hookimpl
    def register_losses(self, register):
        register("zero_loss", object)

    @hookimpl
    def register_matchers(self, register):
        register("nothing", object)

    @hookimpl
    def register_config_schemas(self, register):
        from accord.config import TrainerConfig

        register("trainer_copy", TrainerConfig)

    @hookimpl
    def register_exporters(self, register):
        register("null_format", lambda ckpt, out: out)

    @hookimpl
    def register_commands(self, cli):
        cli.registered_by_test = True


def test_every_hook_reaches_its_registry_attributed_to_the_plugin() -> None:
    host = PluginHost(load_entrypoints=False)
    host.pm.register(_AllHooks(), name="allhooks")
    kinds = {
        "register_tasks": ("task", "noop"),
        "register_models": ("model", "tiny"),
        "register_datasets": ("dataset", "empty"),
        "register_losses": ("loss", "zero_loss"),
        "register_matchers": ("matcher", "nothing"),
        "register_config_schemas": ("config schema", "trainer_copy"),
        "register_exporters": ("exporter", "null_format"),
    }
    for kind, name in kinds.values():
        assert host.registry(kind).get(f"allhooks.{name}").plugin == "allhooks"
    row = next(r for r in host.describe() if r["name"] == "allhooks")
    assert set(row["hooks"]) == set(hookspecs.hook_names())
    assert row["domain"] == "test"

    class FakeCli:
        pass

    cli = FakeCli()
    host.add_commands(cli)
    assert cli.registered_by_test


def test_task_without_config_model_is_rejected() -> None:
    class NoConfig:
        @hookimpl
        def register_tasks(self, register):
            register("broken", lambda cfg: {})

    host = PluginHost(load_entrypoints=False)
    host.pm.register(NoConfig(), name="noconfig")
    with pytest.raises(TypeError, match="task 'broken' registered without config"):
        host.tasks


@pytest.mark.parametrize("hook", hookspecs.hook_names())
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    doc = (REPO / "docs" / "plugins.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({params})`" in doc
