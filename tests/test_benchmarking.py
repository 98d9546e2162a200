"""The benchmark protocol on a tiny fake plugin: registration, the pipeline runner, the one write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord import benchmarking
from accord.benchmarking import (
    BenchmarkResult,
    DownstreamRun,
    Group,
    PipelineSpec,
    ResultTable,
    benchmark_config,
    benchmarks_of,
    find_benchmark,
    run_benchmark,
    run_pipeline,
)
from accord.cli import app
from accord.config import BenchmarkConfig
from accord.hookspecs import hookimpl
from accord.plugins import get_host
from accord.registry import ComponentNotFoundError, Problem


def _synth(out_dir: Path, words: int = 3) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "words.txt").write_text("w\n" * words)
    return out


def _check(root: Path) -> list[Problem]:
    words = Path(root) / "words.txt"
    return [] if words.is_file() else [Problem(str(words), "missing; expected one word per line")]


class FakeConfig(BenchmarkConfig):
    fractions: list[float] = [0.5, 1.0]


class Fake:
    """A plugin whose 'pretraining' is a file and whose score is a function of (fraction, init, seed)."""

    def __init__(self, seed_independent: bool = False) -> None:
        self.calls: list[tuple] = []
        self.seed_independent = seed_independent

    def pretrain(self, data: Path, run_dir: Path, seed: int) -> Path:
        self.calls.append(("pretrain", run_dir, seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ckpt").write_text(str(seed))
        return run_dir / "ckpt"

    def downstream(self, run: DownstreamRun) -> dict:
        self.calls.append(("downstream", run.group.label, run.init, run.seed, run.checkpoint, run.run_dir))
        bonus = 0.2 if run.checkpoint is not None else 0.0
        return {"score": run.group.label * 0.5 + bonus + 0.01 * run.seed,
                "per_class": {"a": 0.5 + 0.1 * run.seed, "b": None}}

    def spec(self, cfg: FakeConfig) -> PipelineSpec:
        return PipelineSpec(
            title="fake: pretrained vs random", dataset="fake.words", synth_options={"words": 5},
            pretrain=self.pretrain, downstream=self.downstream,
            groups=lambda data: [Group(f) for f in cfg.fractions], metric="score", metric_title="score (%)",
            seed_independent_pretraining=self.seed_independent, per_class_key="per_class",
            paper=ResultTable("Paper", ["method", "score"], [["fake", "99.0"]]), notes=("A note.",))

    def run(self, cfg: FakeConfig) -> BenchmarkResult:
        return run_pipeline(cfg, self.spec(cfg))

    @hookimpl
    def register_datasets(self, register):
        register("words", synth=_synth, check=_check)

    @hookimpl
    def register_benchmarks(self, register):
        register("scores", self.run, config=FakeConfig, description="fake pipeline")
        register("clock", lambda cfg: BenchmarkResult.measured("fake clock", {"ticks_per_s": 1234.5678, "sub": {"n": 3}}),
                 config=BenchmarkConfig, kind="speed", description="fake speed")


@pytest.fixture
def fake() -> Fake:
    plugin = Fake()
    get_host().pm.register(plugin, name="fake")
    return plugin


def test_pipeline_loops_groups_inits_seeds_and_pretrains_per_seed(fake: Fake, tmp_path: Path) -> None:
    component = find_benchmark("fake")
    cfg = benchmark_config(component, out=tmp_path, options=["seeds=[3,4]"])
    result = run_benchmark(component, cfg)
    pretrains = [c for c in fake.calls if c[0] == "pretrain"]
    assert [(c[1], c[2]) for c in pretrains] == [(tmp_path / "pretrain" / "seed3", 3), (tmp_path / "pretrain" / "seed4", 4)]
    downstream = [c[1:5] for c in fake.calls if c[0] == "downstream"]
    ckpt = {seed: tmp_path / "pretrain" / f"seed{seed}" / "ckpt" for seed in (3, 4)}
    assert downstream == [(f, init, s, ckpt[s] if init == "pretrained" else None)
                          for f in (0.5, 1.0) for init in ("random", "pretrained") for s in (3, 4)]
    assert fake.calls[-1][5] == tmp_path / "downstream" / "1.0" / "pretrained_seed4"
    # Sample data: the dataset's synth with the spec's options, under run_dir/data.
    assert (tmp_path / "data" / "words.txt").read_text().count("w") == 5
    headline, per_class = result.tables
    assert headline.header == ["label_fraction", "init", "score (mean ± std)", "seeds"]
    assert headline.rows[0] == [0.5, "random", "28.50 ± 0.71", 2]
    assert headline.rows[1] == [0.5, "pretrained", "48.50 ± 0.71", 2]
    assert per_class.header == ["label_fraction", "init", "a", "b"]
    assert per_class.rows[0] == [0.5, "random", "85.00 ± 7.07", "n/a"]
    assert len(result.rows) == 8
    assert result.rows[0] == {"label_fraction": 0.5, "init": "random", "seed": 3, "score": pytest.approx(0.28),
                              "per_class": {"a": pytest.approx(0.8), "b": None}}


def test_results_are_written_once_with_tables_paper_command_and_json(fake: Fake, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    real = benchmarking.write_text_atomically

    def counting(path: Path, text: str) -> Path:
        writes.append(path.name)
        return real(path, text)

    monkeypatch.setattr(benchmarking, "write_text_atomically", counting)
    result = CliRunner().invoke(app, ["benchmark", "fake", "--out", str(tmp_path), "--seeds", "[0]", "fractions=[1.0]"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert writes.count("results.md") == 1 and writes.count("results.json") == 1
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("# fake: pretrained vs random (generated sample data)")
    assert "| 1.0 | pretrained | 70.00 ± 0.00 | 1 |" in markdown
    assert "A note." in markdown and "**Paper**" in markdown
    command = f"accord benchmark fake scores --out {tmp_path} 'fractions=[1.0]' 'seeds=[0]'"
    assert f"`{command}`" in markdown and markdown in result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == command and saved["wall_time_s"] > 0
    assert saved["plots"] == [str(tmp_path / "results.png")] and (tmp_path / "results.png").stat().st_size > 0
    assert [t["title"] for t in saved["tables"]] == ["Score (%), mean ± std over seeds",
                                                     "Per-class scores (%), mean ± std over seeds"]
    assert saved["paper"]["rows"] == [["fake", "99.0"]] and len(saved["rows"]) == 2


def test_seed_independent_pretraining_runs_once_and_says_so(tmp_path: Path) -> None:
    fake = Fake(seed_independent=True)
    get_host().pm.register(fake, name="fake")
    component = find_benchmark("fake")
    result = run_benchmark(component, benchmark_config(component, out=tmp_path, options=["seed=7", "seeds=[1,2]"]))
    assert [c[1:] for c in fake.calls if c[0] == "pretrain"] == [(tmp_path / "pretrain", 7)]
    checkpoints = {c[4] for c in fake.calls if c[0] == "downstream" and c[2] == "pretrained"}
    assert checkpoints == {tmp_path / "pretrain" / "ckpt"}
    assert "Pretrained once (seed 7)" in result.markdown()


def test_given_data_is_checked_and_refused_with_every_problem(fake: Fake, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    result = CliRunner().invoke(app, ["benchmark", "fake", "--data", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{bad}: not a valid fake.words dataset (1 problem(s))" in result.output
    assert f"{bad / 'words.txt'}: missing; expected one word per line" in result.output
    assert fake.calls == [] and not (tmp_path / "out" / "results.md").exists()


def test_given_data_that_passes_is_used_as_is(fake: Fake, tmp_path: Path) -> None:
    data = _synth(tmp_path / "mine", words=1)
    component = find_benchmark("fake")
    result = run_benchmark(component, benchmark_config(component, data=data, out=tmp_path / "out", options=["seeds=[0]"]))
    assert {c[0] for c in fake.calls} == {"pretrain", "downstream"} and not (tmp_path / "out" / "data").exists()
    assert result.title == f"fake: pretrained vs random ({data})"
    assert f"--data {data}" in result.command


def test_speed_benchmarks_are_listed_and_run_by_name(fake: Fake, tmp_path: Path) -> None:
    listing = CliRunner().invoke(app, ["benchmark", "fake", "--speed"], catch_exceptions=False)
    assert listing.exit_code == 0 and "clock" in listing.output and "fake speed" in listing.output
    ran = CliRunner().invoke(app, ["benchmark", "fake", "--speed", "clock", "--out", str(tmp_path)],
                             catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    assert "| ticks_per_s | 1235 |" in ran.output and "| sub.n | 3 |" in ran.output
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [{"ticks_per_s": 1234.5678, "sub": {"n": 3}}]
    assert "accord benchmark fake --speed clock" in (tmp_path / "results.md").read_text()


def test_lookup_errors_name_the_benchmarks_of_the_other_kind(fake: Fake) -> None:
    with pytest.raises(ComponentNotFoundError, match="no pipeline benchmark 'clock'; it is a speed benchmark"):
        find_benchmark("fake", "clock")
    result = CliRunner().invoke(app, ["benchmark", "fake", "--speed", "scores"])
    assert result.exit_code == 2 and "its speed benchmarks: clock" in result.output
    result = CliRunner().invoke(app, ["benchmark", "engine"])
    assert result.exit_code == 2
    assert ("plugin 'engine' has no pipeline benchmark; its speed benchmarks: tiled_infonce "
            "(accord benchmark engine --speed NAME)") in " ".join(result.output.split())


def test_a_benchmark_that_returns_a_dict_is_an_error(tmp_path: Path) -> None:
    class Old:
        @hookimpl
        def register_benchmarks(self, register):
            register("old", lambda cfg: {"markdown": ""}, config=BenchmarkConfig)

    get_host().pm.register(Old(), name="old")
    component = find_benchmark("old")
    with pytest.raises(TypeError, match="benchmark old.old returned dict, expected accord.benchmarking.BenchmarkResult"):
        run_benchmark(component, benchmark_config(component, out=tmp_path))


def test_of_several_pipeline_benchmarks_the_default_one_runs_without_a_name() -> None:
    class Two:
        @hookimpl
        def register_benchmarks(self, register):
            register("first", lambda cfg: None, config=BenchmarkConfig)
            register("second", lambda cfg: None, config=BenchmarkConfig, default=True)

    class Undecided:
        @hookimpl
        def register_benchmarks(self, register):
            register("first", lambda cfg: None, config=BenchmarkConfig)
            register("second", lambda cfg: None, config=BenchmarkConfig)

    get_host().pm.register(Two(), name="two")
    get_host().pm.register(Undecided(), name="undecided")
    assert find_benchmark("two").name == "second" and find_benchmark("two", "first").name == "first"
    assert [c.name for c in benchmarks_of("two", "pipeline")] == ["first", "second"]  # the demo runs both
    with pytest.raises(ComponentNotFoundError, match="several pipeline benchmarks; name one"):
        find_benchmark("undecided")
