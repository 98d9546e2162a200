"""check_nuscenes(): one Problem per defect, naming the record token or file; require_valid() raises
with every line; the plugin registers the dataset."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from accord.plugins import component

from accord_superflow.data import check_nuscenes, require_valid
from accord_superflow.data.superpixels import save_superpixels

VERSION = "v1.0-mini"


def _records(root: Path, table: str) -> list[dict]:
    return json.loads((root / VERSION / f"{table}.json").read_text())


def _edit(root: Path, table: str, edit: Callable[[list[dict]], None]) -> None:
    records = _records(root, table)
    edit(records)
    (root / VERSION / f"{table}.json").write_text(json.dumps(records))


def _first(root: Path, table: str, **where) -> dict:
    return next(r for r in _records(root, table) if all(r.get(k) == v for k, v in where.items()))


def _lidar_keyframe(root: Path) -> dict:
    return next(r for r in _records(root, "sample_data") if r["fileformat"] == "pcd" and r["is_key_frame"])


def _camera(root: Path) -> dict:
    return _first(root, "sample_data", fileformat="jpg")


def _set_field(table: str, field: str, value, pick: Callable[[dict], bool] = lambda r: True):
    def damage(root: Path) -> str:
        token = ""

        def edit(records: list[dict]) -> None:
            nonlocal token
            record = next(r for r in records if pick(r))
            record[field], token = value, record["token"]

        _edit(root, table, edit)
        return token

    return damage


def _missing_table(root: Path) -> str:
    (root / VERSION / "visibility.json").unlink()
    return f"{VERSION}/visibility.json"


def _short_lidarseg(root: Path) -> str:
    record = _first(root, "lidarseg")
    path = root / record["filename"]
    path.write_bytes(path.read_bytes()[:-10])
    return record["filename"]


def _empty_sweep(root: Path) -> str:
    sweep = next(r for r in _records(root, "sample_data") if r["fileformat"] == "pcd" and not r["is_key_frame"])
    (root / sweep["filename"]).write_bytes(b"")
    return sweep["filename"]


def _ragged_scan(root: Path) -> str:
    sweep = next(r for r in _records(root, "sample_data") if r["fileformat"] == "pcd" and not r["is_key_frame"])
    with (root / sweep["filename"]).open("ab") as f:
        f.write(b"\0" * 6)
    return sweep["filename"]


def _keyframe_camera(root: Path) -> dict:
    return _first(root, "sample_data", fileformat="jpg", is_key_frame=True)


def _truncated_image(root: Path) -> str:
    """The first half of a JPEG, as an interrupted download leaves it: it opens, but does not decode."""
    relative = _keyframe_camera(root)["filename"]
    data = (root / relative).read_bytes()
    (root / relative).write_bytes(data[: len(data) // 2])
    return relative


def _corrupt_image(root: Path) -> str:
    relative = _keyframe_camera(root)["filename"]
    (root / relative).write_bytes(b"\x00" * 2048)
    return relative


def _resized_image(root: Path) -> str:
    from PIL import Image

    relative = _keyframe_camera(root)["filename"]
    with Image.open(root / relative) as image:
        image.resize((80, 45)).save(root / relative)
    return relative


def _non_finite_point(value: float, keyframe: bool) -> Callable[[Path], str]:
    def damage(root: Path) -> str:
        scan = next(r for r in _records(root, "sample_data") if r["fileformat"] == "pcd"
                    and r["is_key_frame"] == keyframe)
        points = np.fromfile(root / scan["filename"], dtype=np.float32).reshape(-1, 5)
        points[7, 2] = value
        points.tofile(root / scan["filename"])
        return scan["filename"]

    return damage


def _missing_image(root: Path) -> str:
    camera = _camera(root)
    (root / camera["filename"]).unlink()
    return camera["filename"]


def _superpixel_out_of_range(root: Path) -> str:
    camera = _camera(root)
    relative = f"superpixels/semantic/{camera['token']}.png"
    ids = np.zeros((camera["height"], camera["width"]), dtype=np.uint8)
    ids[3, 4] = 20
    save_superpixels(root / relative, ids)
    return relative


def _superpixel_wrong_size(root: Path) -> str:
    camera = _camera(root)
    relative = f"superpixels/semantic/{camera['token']}.png"
    save_superpixels(root / relative, np.zeros((10, 10), dtype=np.uint8))
    return relative


def _superpixel_stray_file(root: Path) -> str:
    relative = "superpixels/semantic/not-a-token.png"
    save_superpixels(root / relative, np.zeros((10, 10), dtype=np.uint8))
    return relative


def _superpixel_meta_missing(root: Path) -> str:
    relative = "superpixels/semantic/meta.json"
    (root / relative).unlink()
    return relative


def _superpixel_map_missing(root: Path) -> str:
    relative = f"superpixels/semantic/{_camera(root)['token']}.png"
    (root / relative).unlink()
    return relative


def _lidarseg_fresh_token(root: Path) -> str:
    _edit(root, "lidarseg", lambda records: records[0].update(token="0" * 32))
    return "0" * 32


def _drop_is_key_frame(root: Path) -> str:
    record = _camera(root)
    _edit(root, "sample_data", lambda records: next(r for r in records if r["token"] == record["token"]).pop(
        "is_key_frame"))
    return record["token"]


def _sample_crosses_scene(root: Path) -> str:
    scenes = _records(root, "scene")
    last = scenes[0]["last_sample_token"]
    _edit(root, "sample", lambda records: next(r for r in records if r["token"] == last).update(
        next=scenes[1]["first_sample_token"]))
    return last


def _log_without_map(root: Path) -> str:
    _edit(root, "map", lambda records: records[0]["log_tokens"].clear())
    return _records(root, "log")[0]["token"]


def _is_camera_calibration(record: dict) -> bool:
    return bool(record["camera_intrinsic"])


# name -> (damage returning where the problem must be reported: a file, or a record's token; message pattern)
CASES = {
    "missing table": (_missing_table, "missing table"),
    "unresolved ego pose": (_set_field("sample_data", "ego_pose_token", "f" * 32),
                            "ego_pose_token 'f{32}' does not resolve to a token of ego_pose.json"),
    "unresolved sensor": (_set_field("calibrated_sensor", "sensor_token", "nope"),
                          "does not resolve to a token of sensor.json"),
    "unresolved attribute": (_set_field("sample_annotation", "attribute_tokens", ["e" * 32]),
                             "attribute_tokens 'e{32}' does not resolve"),
    "broken prev link": (_set_field("sample_data", "prev", "d" * 32, lambda r: r["prev"] == ""),
                         "prev 'd{32}' does not resolve"),
    "lidarseg count": (_short_lidarseg, r"\d+ labels for \d+ points in samples/LIDAR_TOP/"),
    "non-unit quaternion": (_set_field("calibrated_sensor", "rotation", [0.0, 0.0, 0.0, 2.0]), "norm 2;"),
    "not a quaternion": (_set_field("calibrated_sensor", "rotation", [1.0, 0.0, 0.0]),
                         r"not a \(w, x, y, z\) quaternion"),
    "ego pose quaternion": (_set_field("ego_pose", "rotation", [0.5, 0.5, 0.5, 0.6]), r"norm 1\.0535"),
    "bad intrinsic": (_set_field("calibrated_sensor", "camera_intrinsic", [[0, 0, 1], [0, 1, 0], [0, 0, 1]],
                                 _is_camera_calibration), "positive focal lengths"),
    "empty scan": (_empty_sweep, "empty LiDAR scan"),
    "ragged scan": (_ragged_scan, "not a whole number of 5-float32 points"),
    "missing image": (_missing_image, "missing file referenced by sample_data"),
    "truncated image": (_truncated_image, r"camera image does not decode \(OSError: image file is truncated"),
    "corrupt image": (_corrupt_image, r"camera image does not decode \(UnidentifiedImageError: cannot identify"),
    "image size": (_resized_image, "camera image is 80x45, its sample_data record says 160x90"),
    "NaN point": (_non_finite_point(np.nan, keyframe=True), r"^1 of \d+ points hold NaN or Inf values"),
    "Inf point in a sweep": (_non_finite_point(np.inf, keyframe=False), r"^1 of \d+ points hold NaN or Inf values"),
    "record image size": (_set_field("sample_data", "width", 0, lambda r: r["fileformat"] == "jpg"),
                          "not positive integers"),
    "missing is_key_frame": (_drop_is_key_frame, "missing field 'is_key_frame'"),
    "superpixel id": (_superpixel_out_of_range, "superpixel id 20 out of range; ids must be < 17"),
    "superpixel size": (_superpixel_wrong_size, "is 10x10, its camera image is 160x90"),
    "superpixel name": (_superpixel_stray_file, "not named after a camera sample_data token"),
    "superpixel meta": (_superpixel_meta_missing, "missing"),
    "superpixel map missing": (_superpixel_map_missing, "missing semantic superpixel map of keyframe camera"),
    "lidarseg token": (_lidarseg_fresh_token, "token differs from sample_data_token"),
    "sample crosses scene": (_sample_crosses_scene, "belongs to another scene"),
    "log without map": (_log_without_map, "log is in no map's log_tokens"),
    "category index": (_set_field("category", "index", 3, lambda r: r["name"] == "vehicle.car"),
                       "the official index is 17"),
}


def test_synthetic_datasets_are_valid(nuscenes_root: Path, tiny_root: Path) -> None:
    assert check_nuscenes(nuscenes_root) == []
    assert check_nuscenes(tiny_root) == []
    require_valid(tiny_root)


@pytest.mark.parametrize("case", CASES)
def test_each_defect_is_named(tiny_root: Path, case: str) -> None:
    damage, message = CASES[case]
    where = damage(tiny_root)
    problems = check_nuscenes(tiny_root)
    matching = [p for p in problems if where in p.path and re.search(message, p.message)]
    assert matching, f"no problem at {where!r} matching {message!r} in {[str(p) for p in problems]}"


@pytest.mark.parametrize("case", ["truncated image", "corrupt image", "NaN point", "Inf point in a sweep"])
def test_each_file_defect_is_exactly_one_line(tiny_root: Path, case: str) -> None:
    damage, message = CASES[case]
    where = damage(tiny_root)
    problems = check_nuscenes(tiny_root)
    assert [p.path for p in problems] == [where], [str(p) for p in problems]


@pytest.mark.parametrize("table", ["sample_data", "calibrated_sensor", "sensor", "sample", "scene", "log", "map"])
def test_a_missing_table_is_reported_once_not_with_its_consequences(nuscenes_root: Path, tmp_path: Path,
                                                                  table: str) -> None:
    root = Path(shutil.copytree(nuscenes_root, tmp_path / "data"))
    (root / VERSION / f"{table}.json").unlink()
    problems = check_nuscenes(root)
    assert [str(p) for p in problems] == [f"{root / VERSION / table}.json: missing table; NuScenes() needs all "
                                          "13 tables"]


def test_the_requested_version_must_be_present(tiny_root: Path) -> None:
    assert check_nuscenes(tiny_root, version=VERSION) == []
    assert [str(p) for p in check_nuscenes(tiny_root, version="v1.0-trainval")] == [
        f"{tiny_root / 'v1.0-trainval'}: missing table directory of the requested version v1.0-trainval; "
        f"this dataset has {VERSION}"
    ]
    assert "unknown nuScenes version 'v2.0'" in check_nuscenes(tiny_root, version="v2.0")[0].message
    with pytest.raises(ValueError, match="missing table directory of the requested version v1.0-trainval"):
        require_valid(tiny_root, version="v1.0-trainval")


def test_the_requested_splits_must_belong_to_the_version_and_have_scenes(tiny_root: Path) -> None:
    assert check_nuscenes(tiny_root, version=VERSION, splits=["mini_train", "mini_val"]) == []
    (problem,) = check_nuscenes(tiny_root, version=VERSION, splits=["train"])
    assert problem.message == "split 'train' is not a v1.0-mini split; expected one of mini_train, mini_val"
    # The one mini_val scene renamed: the split has no scene left in this dataset.
    _edit(tiny_root, "scene", lambda records: next(r for r in records if r["name"] == "scene-0103").update(
        name="scene-9999"))
    (problem,) = check_nuscenes(tiny_root, version=VERSION, splits=["mini_train", "mini_val"])
    assert problem.path == f"{VERSION}/scene.json"
    assert problem.message.startswith("none of the 2 scenes of split 'mini_val' is in the table")
    with pytest.raises(ValueError, match="need the version"):
        check_nuscenes(tiny_root, splits=["mini_val"])


def test_data_check_command_prints_one_line_per_problem_then_the_count(tiny_root: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    where = _truncated_image(tiny_root)
    result = CliRunner().invoke(app, ["data", "check", "superflow", str(tiny_root)])
    assert result.exit_code == 1
    first, count = result.output.split("\n", 1)
    assert first.startswith(f"{where}: camera image does not decode")
    assert count.replace("\n", "") == f"1 problem(s) in {tiny_root}"  # rich wraps a long path


def test_data_check_command_checks_the_version_it_is_asked_for(tiny_root: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    assert CliRunner().invoke(app, ["data", "check", "superflow", str(tiny_root), f"version={VERSION}"]).exit_code == 0
    result = CliRunner().invoke(app, ["data", "check", "superflow", str(tiny_root), "version=v1.0-trainval"])
    assert result.exit_code == 1
    assert "missing table directory of the requested version v1.0-trainval" in result.output
    unknown = CliRunner().invoke(app, ["data", "check", "superflow", str(tiny_root), "colour=red"])
    assert unknown.exit_code == 2 and "colour" in unknown.output


def test_require_valid_lists_every_problem(tiny_root: Path) -> None:
    _missing_image(tiny_root)
    _short_lidarseg(tiny_root)
    with pytest.raises(ValueError) as error:
        require_valid(tiny_root)
    lines = str(error.value).splitlines()
    assert "nuScenes dataset check failed (2 problems)" in lines[0]
    assert any("missing file referenced by sample_data" in line for line in lines[1:])
    assert any("labels for" in line for line in lines[1:])


def test_many_missing_semantic_maps_are_counted_not_all_listed(tiny_root: Path) -> None:
    maps = sorted((tiny_root / "superpixels" / "semantic").glob("*.png"))
    for path in maps:
        path.unlink()
    problems = [p for p in check_nuscenes(tiny_root) if "semantic superpixel map" in p.message]
    assert len(problems) == min(len(maps), 20) + (len(maps) > 20)
    if len(maps) > 20:
        assert problems[-1].message.startswith(f"{len(maps) - 20} more keyframe camera images")


def test_root_problems(tmp_path: Path) -> None:
    assert "not a directory" in check_nuscenes(tmp_path / "absent")[0].message
    assert "no table directory" in check_nuscenes(tmp_path)[0].message


def test_plugin_registers_the_dataset(tiny_root: Path) -> None:
    from accord.plugins import get_host

    dataset = component("dataset", "superflow.nuscenes")
    assert dataset.extra["check"](tiny_root) == []
    assert get_host().plugin_info("superflow")["domain"] == "autonomous driving (LiDAR + camera)"
