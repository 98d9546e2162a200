"""SuperFlow++-style temporal voting (accord implementation): neighbours, warping, the voting rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from accord_superflow.data import RigidTransform, load_info_index
from accord_superflow.data.geometry import yaw_pitch_roll_quaternion
from accord_superflow.data.index import SensorFrame
from accord_superflow.voting import lidar_to_lidar, neighbour_keyframes, vote_probabilities


def _frame(sensor_to_ego: RigidTransform, ego_to_global: RigidTransform) -> SensorFrame:
    return SensorFrame(sample_data_token="t", path="p", timestamp=0, sensor_to_ego=sensor_to_ego,
                       ego_to_global=ego_to_global)


def _yaw(degrees: float, translation) -> RigidTransform:
    return RigidTransform(yaw_pitch_roll_quaternion(np.deg2rad(degrees)).rotation_matrix, translation)


def test_warp_into_the_keyframe_lidar_frame_by_hand():
    lidar_mount = _yaw(90, (1.0, 0.0, 2.0))  # LiDAR -> ego: x_lidar along y_ego, 1 m ahead, 2 m up
    source = _frame(lidar_mount, _yaw(0, (0.0, 0.0, 0.0)))
    target = _frame(lidar_mount, _yaw(180, (10.0, 0.0, 0.0)))  # the car moved 10 m and turned around
    # (1, 0, 0) in the source LiDAR: ego (1, 1, 2) = global (1, 1, 2); in the target ego R180^T (-9, 1, 2)
    # = (9, -1, 2); minus the mount (8, -1, 0); R90^T (x, y, z) = (y, -x, z) gives (-1, -8, 0).
    moved = lidar_to_lidar(source, target).apply(np.array([[1.0, 0.0, 0.0]]))
    assert np.allclose(moved, [[-1.0, -8.0, 0.0]])
    back = lidar_to_lidar(target, source).apply(moved)
    assert np.allclose(back, [[1.0, 0.0, 0.0]])


def test_neighbours_follow_links_not_list_order(_tiny_template, tmp_path):
    index = load_info_index(_tiny_template, "v1.0-mini", "mini_train", max_sweeps=0, cache_dir=tmp_path)
    first_of_second_scene = next(k for k in index.keyframes if k.scene_name != index.keyframes[0].scene_name)
    assert [k.sample_token for k in neighbour_keyframes(index, first_of_second_scene, 1)] == [
        index.keyframes[first_of_second_scene.next_index].sample_token]
    middle = index.keyframes[1]
    expected = {k.sample_token for k in neighbour_keyframes(index, middle, 2)}
    assert len(expected) == 2 and all(k.scene_name == middle.scene_name
                                      for k in neighbour_keyframes(index, middle, 2))
    # The same index stored in reverse: positions change, links are remapped, neighbours do not.
    last = len(index) - 1

    def flipped(position):
        return None if position is None else last - position

    reversed_index = replace(index, keyframes=[
        replace(k, index=last - k.index, prev_index=flipped(k.prev_index), next_index=flipped(k.next_index))
        for k in reversed(index.keyframes)])
    moved_middle = reversed_index.keyframes[last - 1]
    assert moved_middle.sample_token == middle.sample_token
    assert {k.sample_token for k in neighbour_keyframes(reversed_index, moved_middle, 2)} == expected


def _grid_points(count: int, spacing: float = 1.0) -> torch.Tensor:
    """Points at the centres of distinct 0.2 m voxels."""
    return (torch.arange(count, dtype=torch.float64).unsqueeze(1) * spacing + 0.1).repeat(1, 3)


def test_a_consistent_neighbour_changes_nothing():
    torch.manual_seed(0)
    xyz = _grid_points(50)
    probabilities = torch.rand(50, 16, dtype=torch.float64).softmax(dim=1)
    # The neighbour saw the same points (from its own pose) and predicted the same probabilities.
    source = _frame(_yaw(90, (1.0, 0.0, 2.0)), _yaw(0, (0.0, 0.0, 0.0)))
    target = _frame(_yaw(90, (1.0, 0.0, 2.0)), _yaw(30, (5.0, 1.0, 0.0)))
    in_source = lidar_to_lidar(target, source).apply(xyz.numpy())
    warped = torch.from_numpy(lidar_to_lidar(source, target).apply(in_source))
    voted = vote_probabilities(xyz, probabilities, [(warped, probabilities)], voxel_size=0.2)
    assert torch.allclose(voted, probabilities)
    assert torch.equal(voted.argmax(1), probabilities.argmax(1))


def test_agreeing_neighbours_fix_a_wrong_point_and_unmatched_points_keep_their_own():
    xyz = _grid_points(3)
    own = torch.tensor([[0.4, 0.6], [0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    # Both neighbours see point 0 (twice in one voxel for the first) and say class 0; nothing near points 1, 2
    # except a far-away point.
    first = (torch.cat([xyz[:1], xyz[:1] + 0.05, xyz[:1] + 30]),
             torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.0, 1.0]], dtype=torch.float64))
    second = (xyz[:1].clone(), torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    voted = vote_probabilities(xyz, own, [first, second], voxel_size=0.2)
    assert torch.allclose(voted[0], torch.tensor([(0.4 + 0.8 + 0.9) / 3, (0.6 + 0.2 + 0.1) / 3], dtype=torch.float64))
    assert voted.argmax(1).tolist() == [0, 0, 1]
    assert torch.equal(voted[1:], own[1:])
    half = vote_probabilities(xyz, own, [first, second], voxel_size=0.2, neighbour_weight=0.5)
    assert torch.allclose(half[0, 0], torch.tensor((0.4 + 0.5 * 0.8 + 0.5 * 0.9) / 2, dtype=torch.float64))


def test_vote_rejects_mismatched_inputs():
    xyz, probabilities = _grid_points(3), torch.full((3, 4), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="neighbours\\[0\\] probabilities"):
        vote_probabilities(xyz, probabilities, [(xyz, probabilities[:, :3])], voxel_size=0.2)
    with pytest.raises(ValueError, match="target_probabilities"):
        vote_probabilities(xyz, probabilities[:2], [], voxel_size=0.2)
    with pytest.raises(ValueError, match="voxel_size"):
        vote_probabilities(xyz, probabilities, [], voxel_size=0.0)
