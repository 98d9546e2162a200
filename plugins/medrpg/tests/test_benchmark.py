"""The grounding and speed benchmarks through the platform's benchmark runner, at toy sizes."""

import json

import pytest
import torch

from accord.benchmarking import benchmark_config, find_benchmark, run_benchmark


def test_grounding_benchmark_compares_transvg_and_medrpg(tmp_path, grounding_dir):
    component = find_benchmark("medrpg", "grounding")
    cfg = benchmark_config(component, data=grounding_dir, quick=True, out=tmp_path / "bench",
                           options=["epochs=1", "seeds=[0]"])
    result = run_benchmark(component, cfg)
    assert [row["method"] for row in result.rows] == ["TransVG", "MedRPG"]
    assert all(0 <= row["acc"] <= 1 and 0 <= row["miou"] <= 1 and row["per_category"] for row in result.rows)
    assert result.tables[0].header == ["method", "Acc@0.5", "mIoU", "seeds"]
    assert [line[0] for line in result.tables[0].rows] == ["TransVG", "MedRPG"]
    assert result.paper.rows[-1][1:] == [69.86, 59.37]
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert written["rows"][0]["seed"] == 0 and (tmp_path / "bench" / "results.png").is_file()


def test_grounding_benchmark_converts_an_mscxr_root(tmp_path, mscxr_root):
    from accord_medrpg.benchmarks import grounding_data

    converted = grounding_data(mscxr_root, tmp_path / "data", num_images=0, seed=0)
    assert (converted / "train.jsonl").is_file() and converted == tmp_path / "data" / "jsonl"
    assert grounding_data(converted, tmp_path / "unused", num_images=0, seed=0) == converted


def test_speed_benchmark_reports_step_memory_latency_and_taco_share(tmp_path):
    component = find_benchmark("medrpg", "speed", kind="speed")
    cfg = benchmark_config(component, quick=True, out=tmp_path / "speed",
                           options=["model_size=quick", "image_size=64", "batch_size=2", "steps=1", "repeats=2",
                                    "device=cpu"])
    values = run_benchmark(component, cfg).rows[0]
    step = values["train_s_per_step (batch 2, 64^2)"]
    assert step["min"] <= step["median"] <= step["max"]
    assert values["peak_memory_GiB"] > 0 and values["inference_s_per_image"]["median"] > 0
    assert 0 < values["taco_share_of_step_percent"]


def test_speed_benchmark_refuses_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    component = find_benchmark("medrpg", "speed", kind="speed")
    cfg = benchmark_config(component, quick=True, out=tmp_path / "speed", options=["model_size=quick", "device=cuda"])
    with pytest.raises(ValueError, match="device=cuda: torch sees no CUDA device"):
        run_benchmark(component, cfg)
