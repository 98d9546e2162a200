"""The plugin host: built-ins through the same manager, attribution, filtering, meta-tests."""

from __future__ import annotations

import ast
import inspect
import tomllib
from pathlib import Path

import pluggy
import pytest

from accord import hookimpl, hookspecs
from accord.plugins import COMPONENT_HOOKS, DEFAULT_PLUGINS, PluginHost
from accord.registry import ComponentNotFoundError, PluginNotInstalledError

REPO = Path(__file__).resolve().parents[1]


def test_builtins_register_through_the_manager() -> None:
    host = PluginHost(load_entrypoints=False)
    assert host.plugin_names()[:2] == ["engine", "core"] or set(host.plugin_names()) >= {"engine", "core"}
    rows = {r["name"]: r for r in host.describe()}
    assert rows["core"]["builtin"] and rows["core"]["domain"] == "core"
    assert set(rows["core"]["tasks"]) == {"pretrain", "finetune", "evaluate"}
    assert rows["core"]["components"]["benchmark"] == ["linear_probe"]
    assert rows["engine"]["tasks"] == [] and rows["engine"]["components"]["benchmark"] == ["tiled_infonce"]
    assert rows["engine"]["components"]["exporter"] == ["safetensors"]
    assert not {"loss", "matcher"} & rows["engine"]["components"].keys()


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
        def register_models(self, register):
            register("same", object)
            register("same", object)

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Twice(), name="twice")
    with pytest.raises(ValueError, match="'twice.same' is registered twice"):
        host.models


def _install_plugin(site: Path, name: str, source: str) -> None:
    """Make ``source`` an installed distribution whose ``accord`` entry point is ``name``."""
    (site / f"accord_{name}.py").write_text(source)
    dist_info = site / f"accord_{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: accord-{name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[accord]\n{name} = accord_{name}\n")


def test_removed_hook_says_it_was_removed_and_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_plugin = (
        "from accord import hookimpl\n\n\n"
        "@hookimpl\ndef register_losses(register):\n    register('mine', object)\n"
    )
    _install_plugin(tmp_path, "old", old_plugin)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "old")
    with pytest.raises(
        pluggy.PluginValidationError,
        match=r"plugin 'old' implements register_losses, which accord removed: .*"
        r"from accord\.losses import InfoNCELoss.*Delete register_losses .*ACCORD_DISABLE_PLUGINS=old",
    ):
        PluginHost()
    monkeypatch.setenv("ACCORD_DISABLE_PLUGINS", "old")
    assert "old" not in PluginHost().plugin_names()


def test_each_plugin_is_called_once_with_a_register_bound_to_it() -> None:
    calls = []

    class Maker:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @hookimpl
        def register_models(self, register):
            calls.append(self.tag)
            register("same", lambda: self.tag)

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Maker("a"), name="a")
    host.pm.register(Maker("b"), name="b")
    assert host.models.get("a.same").obj() == "a" and host.models.get("b.same").obj() == "b"
    assert sorted(calls) == ["a", "b"]
    with pytest.raises(ComponentNotFoundError, match="'same' is ambiguous"):
        host.models.get("same")


def test_trace_shows_every_register_call_and_its_plugin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ACCORD_TRACE_PLUGINS", "1")
    host = PluginHost(load_entrypoints=False)
    capsys.readouterr()
    host.tasks
    trace = capsys.readouterr().err
    for hook_name in COMPONENT_HOOKS:
        if getattr(host.pm.hook, hook_name).get_hookimpls():
            assert f"{hook_name} [hook]" in trace
    assert "register[task of core]" in trace and "register[model of core]" in trace
    assert "register[exporter of engine]" in trace


def test_implementation_under_another_name_is_attributed_to_its_plugin_only() -> None:
    # pluggy < 1.7 kept a specname implementation in every other plugin's subset caller.
    class Renamed:
        @hookimpl(specname="register_models")
        def models(self, register):
            register("renamed_model", object)

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Renamed(), name="renamed")
    assert [c.qualname for c in host.models if c.name == "renamed_model"] == ["renamed.renamed_model"]


def _plugin_modules() -> list[Path]:
    """Source files of the built-in plugins and of every first-party plugin's entry point."""
    paths = [REPO / "core" / f"{module.replace('.', '/')}.py" for _, module in DEFAULT_PLUGINS]
    for pyproject in sorted(REPO.glob("plugins/*/pyproject.toml")):
        entry_points = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["accord"]
        paths += [pyproject.parent / f"{module.replace('.', '/')}.py" for module in entry_points.values()]
    return paths


@pytest.mark.parametrize("path", _plugin_modules(), ids=lambda path: path.parent.name + "/" + path.name)
def test_components_are_registered_by_inline_register_calls(path: Path) -> None:
    """One registration style: ``register("name", ...)`` calls in the hook, no loops over spec lists."""
    hooks = [node for node in ast.parse(path.read_text()).body
             if isinstance(node, ast.FunctionDef) and node.name in COMPONENT_HOOKS]
    assert hooks, f"{path} implements no component hook"
    for hook in hooks:
        loops = [node for node in ast.walk(hook) if isinstance(node, (ast.For, ast.While, ast.comprehension))]
        assert not loops, f"{path}:{hook.name}: register each component with its own register(...) call"
        calls = [node for node in ast.walk(hook)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register"]
        assert calls and all(isinstance(call.args[0], ast.Constant) for call in calls), (
            f"{path}:{hook.name}: the first argument of register(...) should be the literal name"
        )


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
    def register_benchmarks(self, register):
        from accord.config import BenchmarkConfig

        register("nothing", lambda cfg: None, config=BenchmarkConfig, kind="speed")

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
        "register_benchmarks": ("benchmark", "nothing"),
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
