"""Config loading: one clear line per problem, naming the file, the key and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from accord.config import ConfigError, TrainerConfig, apply_overrides, load_config, save_resolved

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "shapes").mkdir(exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"plugin": "core", "task": "pretrain", "data": str(tmp_path / "shapes"), **data}))
    return path


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trainer": {"max_step": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.lines) == 1
    line = err.value.lines[0]
    assert line.startswith(f"{path}: unknown key 'trainer.max_step'")
    assert "did you mean 'trainer.max_steps'?" in line


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {"temprature": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'temprature' \(did you mean 'temperature'\?\)"):
        load_config(path)


def test_wrong_type_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trainer": {"lr": "fast"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines == [f"{path}: trainer.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"]


def test_cross_field_error_names_the_section_without_dumping_it(tmp_path: Path) -> None:
    path = _write(tmp_path, {"trainer": {"max_steps": 10, "warmup_steps": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [line] = err.value.lines
    assert line.startswith(f"{path}: trainer: ") and "warmup_steps" in line
    assert "{" not in line  # the section's values are not dumped into the message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert err.value.lines == [f"{tmp_path / 'nope.yaml'}: config file not found"]


def test_missing_data_path_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    data = yaml.safe_load(path.read_text())
    data["data"] = str(tmp_path / "absent")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines == [f"{path}: data: path does not exist: {tmp_path / 'absent'} (got '{tmp_path / 'absent'}')"]


def test_unknown_task_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path, {"task": "pretrian"})
    with pytest.raises(ConfigError, match="plugin 'core' has no task 'pretrian' \\(did you mean 'pretrain'\\?\\)"):
        load_config(path)


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    cfg = load_config(path, ["trainer.lr=3e-4", "trainer.grad_clip_norm=1", "run_dir=" + str(tmp_path / "run")])
    assert cfg.trainer.lr == 3e-4 and cfg.trainer.grad_clip_norm == 1.0
    written = save_resolved(cfg, cfg.run_dir)
    resolved = yaml.safe_load(written.read_text())
    assert resolved["trainer"]["lr"] == 3e-4
    assert resolved["trainer"]["max_steps"] == 200  # defaults are written out too
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["trainer.lr"])


def test_shipped_configs_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every YAML under configs/ is a valid config once the paths it names exist."""
    monkeypatch.chdir(tmp_path)
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        for _ in range(10):  # create each missing path the validator names, then validate again
            try:
                load_config(path)
                break
            except ConfigError as exc:
                missing = [m.group(1) for line in exc.lines if (m := re.search(r"path does not exist: (\S+)", line))]
                if any("plugin" in line and "not installed" in line for line in exc.lines):
                    break  # a domain plugin's config, checked by that plugin's tests
                if not missing:
                    raise
                for name in missing:
                    target = tmp_path / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch() if target.suffix else target.mkdir(exist_ok=True)
        else:
            raise AssertionError(f"{path}: still invalid after creating the paths it names")


def test_trainer_defaults_are_valid() -> None:
    assert TrainerConfig().max_steps >= 1


def test_quick_benchmarks_run_two_default_seeds_but_every_given_one() -> None:
    from accord.config import BenchmarkConfig

    assert BenchmarkConfig(plugin="core").run_seeds() == [0, 1, 2]
    assert BenchmarkConfig(plugin="core", quick=True).run_seeds() == [0, 1]
    assert BenchmarkConfig(plugin="core", quick=True, seeds=[4, 5, 6]).run_seeds() == [4, 5, 6]


def test_a_method_registered_as_its_own_task_runs_that_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``register("pretrain", ..., methods={"b": "b_pretrain"})``: ``method: b`` loads ``b_pretrain``'s config."""
    from typing import Literal

    import accord.plugins
    from accord import hookimpl
    from accord.config import RunConfig
    from accord.plugins import PluginHost

    class PretrainA(RunConfig):
        method: Literal["a"] = "a"

    class PretrainB(RunConfig):
        width: int = 1

    class Methods:
        @hookimpl
        def register_tasks(self, register):
            register("pretrain", lambda cfg: {}, config=PretrainA, methods={"b": "b_pretrain", "c": "missing"})
            register("b_pretrain", lambda cfg: {}, config=PretrainB)

    host = PluginHost(load_entrypoints=False)
    host.pm.register(Methods(), name="methods")
    monkeypatch.setattr(accord.plugins, "_HOST", host)
    path = tmp_path / "run.yaml"
    path.write_text("plugin: methods\ntask: pretrain\nmethod: b\nwidth: 3\n")
    cfg = load_config(path)
    assert isinstance(cfg, PretrainB) and (cfg.task, cfg.width) == ("b_pretrain", 3)
    path.write_text("plugin: methods\ntask: pretrain\nmethod: a\n")
    assert isinstance(load_config(path), PretrainA)
    path.write_text("plugin: methods\ntask: pretrain\nmethod: c\n")
    with pytest.raises(ConfigError, match="missing"):
        load_config(path)
