"""Rigid transforms between the nuScenes frames (sensor, ego, global)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyquaternion import Quaternion

__all__ = ["RigidTransform", "sensor_to_sensor", "yaw_pitch_roll_quaternion"]


@dataclass(frozen=True, eq=False)
class RigidTransform:
    """``p_target = rotation @ p_source + translation``.

    Attributes:
        rotation: ``(3, 3)`` float64 rotation matrix.
        translation: ``(3,)`` float64 translation in metres.
    """

    rotation: np.ndarray
    translation: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", np.asarray(self.rotation, dtype=np.float64).reshape(3, 3))
        object.__setattr__(self, "translation", np.asarray(self.translation, dtype=np.float64).reshape(3))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RigidTransform:
        """From a ``calibrated_sensor`` (sensor -> ego) or ``ego_pose`` (ego -> global) record.

        The rotation is the record's ``(w, x, y, z)`` quaternion, converted by pyquaternion exactly as
        the devkit does (it normalises the quaternion first).
        """
        return cls(Quaternion(record["rotation"]).rotation_matrix, record["translation"])

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform ``(N, 3)`` points; returns ``(N, 3)`` float64."""
        return np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def inverse(self) -> RigidTransform:
        return RigidTransform(self.rotation.T, -self.rotation.T @ self.translation)

    def __matmul__(self, other: RigidTransform) -> RigidTransform:
        """``(self @ other).apply(p) == self.apply(other.apply(p))``."""
        return RigidTransform(self.rotation @ other.rotation, self.rotation @ other.translation + self.translation)

    def to_json(self) -> dict[str, list]:
        return {"rotation": self.rotation.tolist(), "translation": self.translation.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Sequence]) -> RigidTransform:
        return cls(data["rotation"], data["translation"])


def yaw_pitch_roll_quaternion(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> Quaternion:
    """``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (radians) as a unit quaternion, nuScenes' convention."""
    return (
        Quaternion(axis=[0.0, 0.0, 1.0], angle=yaw)
        * Quaternion(axis=[0.0, 1.0, 0.0], angle=pitch)
        * Quaternion(axis=[1.0, 0.0, 0.0], angle=roll)
    )


def sensor_to_sensor(source_to_ego: RigidTransform, source_ego_to_global: RigidTransform,
                     target_to_ego: RigidTransform, target_ego_to_global: RigidTransform) -> RigidTransform:
    """Points of one sensor at its capture time into another sensor's frame at its own time.

    The nuScenes chain ``source -> ego(t_source) -> global -> ego(t_target) -> target``: ego poses
    are per timestamp, so the ego motion between the two captures is compensated.
    """
    return target_to_ego.inverse() @ target_ego_to_global.inverse() @ source_ego_to_global @ source_to_ego
