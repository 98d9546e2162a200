"""Point-to-pixel projection matching with a known pinhole camera."""

from __future__ import annotations

import pytest
import torch
from accord.matchers import PointProjectionMatcher, project_points

HEIGHT, WIDTH = 40, 64
FOCAL, CX, CY = 50.0, 31.5, 20.0
INTRINSICS = torch.tensor(
    [[FOCAL, 0.0, CX], [0.0, FOCAL, CY], [0.0, 0.0, 1.0]], dtype=torch.float64
)
# LiDAR frame: x forward, y left, z up. Camera frame: x right, y down, z forward; the camera sits
# 0.5 m above and 1 m ahead of the LiDAR.
ROTATION = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
EXTRINSICS = torch.eye(4, dtype=torch.float64)
EXTRINSICS[:3, :3] = ROTATION
EXTRINSICS[:3, 3] = -ROTATION @ torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)


def _lidar_point(u: float, v: float, depth: float) -> list[float]:
    """The LiDAR-frame point that projects to pixel (u, v) at the given camera depth."""
    camera = torch.tensor(
        [(u - CX) * depth / FOCAL, (v - CY) * depth / FOCAL, depth, 1.0], dtype=torch.float64
    )
    return torch.linalg.solve(EXTRINSICS, camera)[:3].tolist()


# (u, v, depth, kept?)
CASES = [
    (0, 0, 5.0, True),
    (63, 39, 12.0, True),
    (10, 7, 1.5, True),
    (40, 25, 30.0, True),
    (40, 25, -8.0, False),  # behind the camera
    (20, 10, 0.5, False),  # closer than min_depth
    (-3, 10, 5.0, False),  # left of the image
    (WIDTH + 2, 10, 5.0, False),  # right of the image
    (20, HEIGHT, 5.0, False),  # below the image
]
POINTS = torch.tensor([_lidar_point(u, v, d) for u, v, d, _ in CASES], dtype=torch.float32)


def _expected(stride: int = 1) -> list[tuple[int, int]]:
    return [
        (index, (v // stride) * (WIDTH // stride) + u // stride)
        for index, (u, v, _, kept) in enumerate(CASES)
        if kept
    ]


def test_known_pixels_recovered_from_intrinsics_and_extrinsics() -> None:
    result = PointProjectionMatcher()(
        points=POINTS, image_size=(HEIGHT, WIDTH), intrinsics=INTRINSICS, extrinsics=EXTRINSICS
    )
    assert list(zip(result.index_a.tolist(), result.index_b.tolist())) == _expected()
    assert result.batch is None and torch.equal(result.weight, torch.ones(len(result)))


def test_projection_matrix_and_feature_stride() -> None:
    projection = INTRINSICS @ EXTRINSICS[:3]
    result = PointProjectionMatcher()(
        points=POINTS,
        image_size=(HEIGHT, WIDTH),
        feature_size=(HEIGHT // 4, WIDTH // 4),
        projection=projection,
    )
    assert list(zip(result.index_a.tolist(), result.index_b.tolist())) == _expected(stride=4)


def test_min_depth_option() -> None:
    result = PointProjectionMatcher(min_depth=0.0)(
        points=POINTS, image_size=(HEIGHT, WIDTH), intrinsics=INTRINSICS, extrinsics=EXTRINSICS
    )
    assert (5, 10 * WIDTH + 20) in set(zip(result.index_a.tolist(), result.index_b.tolist()))


def test_several_cameras_give_batch_ids() -> None:
    # The second camera looks backwards: only the point behind the first camera is in its view.
    behind = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    extrinsics = torch.stack([EXTRINSICS, EXTRINSICS @ _about_lidar(behind)])
    result = PointProjectionMatcher()(
        points=POINTS, image_size=(HEIGHT, WIDTH), intrinsics=INTRINSICS, extrinsics=extrinsics
    )
    assert result.batch is not None
    assert result.batch.tolist().count(0) == len(_expected())
    assert set(result.index_a[result.batch == 1].tolist()) == {4}


def _about_lidar(turn: torch.Tensor) -> torch.Tensor:
    """A LiDAR-frame rotation applied about the camera centre (so depths keep their size)."""
    centre = torch.eye(4, dtype=torch.float64)
    centre[:3, 3] = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    return centre @ turn @ torch.linalg.inv(centre)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"projection": torch.eye(4)}, r"projection: expected shape \(3, 4\) or \(V, 3, 4\)"),
        ({"projection": torch.eye(3)}, r"projection: expected shape \(3, 4\)"),
        (
            {"intrinsics": INTRINSICS, "extrinsics": torch.eye(3)},
            r"extrinsics: expected shape \(4, 4\)",
        ),
        (
            {"intrinsics": torch.eye(4), "extrinsics": EXTRINSICS},
            r"intrinsics: expected shape \(3, 3\)",
        ),
        ({"intrinsics": INTRINSICS}, "projection: expected projection"),
        (
            {"projection": torch.ones(3, 4), "intrinsics": INTRINSICS, "extrinsics": EXTRINSICS},
            "not both",
        ),
        ({"projection": torch.full((3, 4), float("nan"))}, "projection: contains"),
        (
            {"intrinsics": INTRINSICS.expand(2, 3, 3), "extrinsics": EXTRINSICS.expand(3, 4, 4)},
            "extrinsics: expected 2",
        ),
        (
            {"projection": torch.ones(3, 4), "points": torch.zeros(4, 4)},
            r"points: expected shape .*3\)",
        ),
        ({"projection": torch.ones(3, 4), "points": torch.zeros(0, 3)}, "points"),
        (
            {"projection": torch.ones(3, 4), "points": torch.full((2, 3), float("inf"))},
            "points: contains",
        ),
        ({"projection": torch.ones(3, 4), "image_size": (40, 64, 3)}, "image_size"),
        ({"projection": torch.ones(3, 4), "feature_size": (0, 4)}, "feature_size"),
    ],
)
def test_bad_input(kwargs: dict, name: str) -> None:
    arguments = {"points": POINTS, "image_size": (HEIGHT, WIDTH), **kwargs}
    with pytest.raises(ValueError, match=name):
        PointProjectionMatcher()(**arguments)


def test_bad_min_depth() -> None:
    with pytest.raises(ValueError, match="min_depth"):
        PointProjectionMatcher(min_depth=-1.0)


# Points in the camera frame at depth 2 with f = 128, c = (50, 20): u = 64 x + 50 and v = 64 y + 20
# exactly in binary floating point, so the border cases below sit exactly on the bounds.
EXACT = torch.tensor([[128.0, 0.0, 50.0, 0.0], [0.0, 128.0, 20.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
EXACT_SIZE = (40, 100)


def _camera_point(u: float, v: float, depth: float = 2.0) -> list[float]:
    return [(u - 50.0) * depth / 128.0, (v - 20.0) * depth / 128.0, depth]


# (u, v, depth, kept with margin 0, kept with margin 1)
BORDER_CASES = [
    (-0.5, 10.0, 2.0, True, False),  # lower bound: inclusive
    (-0.75, 10.0, 2.0, False, False),
    (99.25, 10.0, 2.0, True, False),  # last column
    (99.5, 10.0, 2.0, False, False),  # upper bound W - 0.5: exclusive
    (0.5, -0.5, 2.0, True, False),
    (0.5, 39.5, 2.0, False, False),  # H - 0.5
    (0.5, 0.5, 2.0, True, True),  # margin 1: lower bound 0.5, inclusive
    (98.25, 38.25, 2.0, True, True),
    (98.5, 10.0, 2.0, True, False),  # margin 1: upper bound W - 1.5, exclusive
    (50.0, 20.0, 1.0, False, False),  # depth == min_depth: dropped
    (50.0, 20.0, 1.25, True, True),
]


@pytest.mark.parametrize("margin, column", [(0.0, 3), (1.0, 4)])
def test_project_points_rule_at_the_borders(margin: float, column: int) -> None:
    points = torch.tensor([_camera_point(u, v, d) for u, v, d, *_ in BORDER_CASES], dtype=torch.float64)
    found = project_points(points, EXACT, EXACT_SIZE, min_depth=1.0, margin=margin)
    assert found.valid.tolist() == [case[column] for case in BORDER_CASES]
    expected = torch.tensor([case[:2] for case in BORDER_CASES], dtype=torch.float64)
    torch.testing.assert_close(found.pixel[found.valid], expected[found.valid])
    assert found.pixel.shape == (len(BORDER_CASES), 2) and found.depth.dtype == torch.float64


def test_project_points_stacks_views_and_agrees_with_the_matcher() -> None:
    points = torch.tensor([_camera_point(u, v, d) for u, v, d, *_ in BORDER_CASES], dtype=torch.float32)
    found = project_points(points, torch.stack([EXACT, EXACT]), EXACT_SIZE)
    assert found.pixel.shape == (2, len(BORDER_CASES), 2) and found.valid.shape == (2, len(BORDER_CASES))
    single = project_points(points, EXACT, EXACT_SIZE)
    assert torch.equal(found.valid[1], single.valid)
    # The matcher keeps exactly the valid points, in the pixel floor((v, u) + 0.5).
    match = PointProjectionMatcher()(points=points, image_size=EXACT_SIZE, projection=EXACT)
    assert match.index_a.tolist() == single.valid.nonzero().squeeze(1).tolist()
    cells = torch.floor(single.pixel[single.valid] + 0.5).long()
    assert match.index_b.tolist() == (cells[:, 1] * EXACT_SIZE[1] + cells[:, 0]).tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"margin": -1.0}, "margin: expected a finite number >= 0"),
        ({"min_depth": float("inf")}, "min_depth: expected a finite number >= 0"),
        ({"projection": torch.eye(3)}, r"projection: expected shape \(3, 4\)"),
        ({"points": torch.zeros(3, 2)}, r"points: expected shape"),
        ({"points": torch.zeros(3, 3, dtype=torch.long)}, "points: expected a floating-point tensor"),
        ({"image_size": (40,)}, "image_size"),
    ],
)
def test_project_points_bad_input(kwargs: dict, message: str) -> None:
    arguments = {"points": torch.zeros(2, 3), "projection": EXACT, "image_size": EXACT_SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        project_points(**arguments)
    if "margin" in kwargs:
        with pytest.raises(ValueError, match="margin"):
            PointProjectionMatcher(margin=kwargs["margin"])
