"""A synthetic 3D street scene and an analytic, vectorised ray caster for it.

The same scene is seen by the LiDAR (one ray per beam and azimuth step) and by the cameras (one
ray per pixel), so projected LiDAR points land on the pixels of the object they hit, up to
occlusion differences between the two viewpoints. All coordinates are global (metres, z up, the
ground is the plane z = 0); time is in seconds from the start of the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from accord_superflow.data.schema import LIDARSEG_CLASSES

__all__ = ["CLASS_COLOURS", "SKY_COLOUR", "StreetLayout", "WorldObject", "World", "RayHits", "make_world"]


def _label(name: str) -> int:
    return LIDARSEG_CLASSES.index(name)


DRIVEABLE, SIDEWALK, TERRAIN = _label("flat.driveable_surface"), _label("flat.sidewalk"), _label("flat.terrain")
MANMADE, VEGETATION = _label("static.manmade"), _label("static.vegetation")
CAR, TRUCK, PEDESTRIAN = _label("vehicle.car"), _label("vehicle.truck"), _label("human.pedestrian.adult")
CONE, BARRIER = _label("movable_object.trafficcone"), _label("movable_object.barrier")

# Rendering colours, chosen with distinct chromaticities (r, g, b) / (r + g + b) so that a class
# can be recognised in a shaded, JPEG-compressed image. Shading only scales a colour.
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    DRIVEABLE: (105, 105, 115),
    SIDEWALK: (215, 185, 120),
    TERRAIN: (150, 190, 50),
    MANMADE: (205, 120, 105),
    VEGETATION: (30, 160, 50),
    CAR: (35, 70, 235),
    TRUCK: (235, 215, 25),
    PEDESTRIAN: (225, 40, 190),
    CONE: (250, 110, 0),
    BARRIER: (170, 20, 25),
}
SKY_COLOUR = (160, 205, 250)

# Mean LiDAR return strength per class (nuScenes intensity is 0..255; retro-reflective cones and
# barriers are the brightest, asphalt the darkest).
_REFLECTIVITY = {
    DRIVEABLE: 8.0, SIDEWALK: 20.0, TERRAIN: 14.0, MANMADE: 35.0, VEGETATION: 22.0,
    CAR: 45.0, TRUCK: 50.0, PEDESTRIAN: 25.0, CONE: 180.0, BARRIER: 120.0,
}

_EPS = 1e-6


@dataclass(frozen=True)
class StreetLayout:
    """Cross-section of the straight street along global x, centred on ``road_y``.

    Attributes:
        road_y: global y of the road centre line.
        road_half_width: driveable surface is ``|y - road_y| < road_half_width``.
        sidewalk_width: sidewalk band beyond the road.
        terrain_width: grass band between the sidewalk and the building facades.
    """

    road_y: float
    road_half_width: float = 6.0
    sidewalk_width: float = 3.0
    terrain_width: float = 3.0

    @property
    def facade_offset(self) -> float:
        return self.road_half_width + self.sidewalk_width + self.terrain_width

    def ground_labels(self, y: np.ndarray) -> np.ndarray:
        """lidarseg index of ground points at global ``y`` ``(N,)``."""
        offset = np.abs(y - self.road_y)
        return np.where(
            offset < self.road_half_width,
            DRIVEABLE,
            np.where(offset < self.road_half_width + self.sidewalk_width, SIDEWALK, TERRAIN),
        )


@dataclass(frozen=True)
class WorldObject:
    """One object: an oriented box, a vertical cylinder or a sphere, possibly moving.

    Attributes:
        shape: ``"box"``, ``"cylinder"`` or ``"sphere"``.
        label: lidarseg class index.
        position: ``(3,)`` at time 0; box: centre; cylinder: centre of the base disc; sphere: centre.
        size: box ``(width, length, height)`` (nuScenes wlh); cylinder ``(2r, 2r, height)``; sphere
            ``(2r, 2r, 2r)``.
        yaw: heading of the box's length axis (radians from global x).
        velocity: ``(3,)`` metres per second.
        instance: index of the annotated object this primitive belongs to, ``-1`` for stuff
            (buildings, trees, ground); a tree is a trunk cylinder plus a crown sphere.
    """

    shape: str
    label: int
    position: np.ndarray
    size: np.ndarray
    yaw: float = 0.0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    instance: int = -1

    def position_at(self, time_s: float) -> np.ndarray:
        return self.position + self.velocity * time_s


@dataclass(frozen=True)
class RayHits:
    """Nearest intersection of each ray.

    Attributes:
        distance: ``(N,)`` metres along the (unit) ray, ``inf`` where nothing was hit.
        label: ``(N,)`` lidarseg class index, ``-1`` where nothing was hit.
        instance: ``(N,)`` annotated-object index, ``-1`` for stuff or no hit.
        normal: ``(N, 3)`` unit surface normal facing the ray origin.
    """

    distance: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    normal: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        return np.isfinite(self.distance)

    def intensity(self, directions: np.ndarray) -> np.ndarray:
        """LiDAR intensity ``(N,)`` in 0..255: class reflectivity times the incidence cosine."""
        reflectivity = np.zeros(len(self.label))
        for label, value in _REFLECTIVITY.items():
            reflectivity[self.label == label] = value
        cosine = np.abs(np.einsum("ij,ij->i", self.normal, directions))
        return np.clip(reflectivity * (0.3 + 0.7 * cosine), 0.0, 255.0)

    def shaded_colours(self, light: np.ndarray) -> np.ndarray:
        """``(N, 3)`` uint8 RGB: class colour times a Lambert term for the unit ``light`` direction
        ``(3,)`` (sky colour where nothing was hit)."""
        base = np.tile(np.asarray(SKY_COLOUR, dtype=np.float64), (len(self.label), 1))
        for label, colour in CLASS_COLOURS.items():
            base[self.label == label] = colour
        shade = 0.45 + 0.55 * np.abs(self.normal @ light)
        # Fading with distance hints at depth without changing a class's chromaticity.
        fade = np.where(self.hit, 1.0 - 0.25 * np.clip(self.distance / 80.0, 0.0, 1.0), 1.0)
        scale = np.where(self.hit, shade * fade, 1.0)
        return np.clip(base * scale[:, None], 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _PlacedGroup:
    """The objects of one shape at one time, seen from one ray origin.

    ``direction`` ``(M, 3)`` points from the origin to each bounding-sphere centre; ``margin``
    ``(M,)`` is the angle the sphere subtends around it (pi when the origin is inside).
    """

    positions: np.ndarray
    sizes: np.ndarray
    yaws: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    direction: np.ndarray
    margin: np.ndarray

    def in_cone(self, axis: np.ndarray, half_angle: float) -> np.ndarray:
        """``(M,)`` which bounding spheres meet the cone of rays around ``axis``."""
        return np.arccos(np.clip(self.direction @ axis, -1.0, 1.0)) <= half_angle + self.margin


class World:
    """The street scene: ground plane plus objects; ``cast`` intersects rays at a given time."""

    def __init__(self, layout: StreetLayout, objects: list[WorldObject]) -> None:
        self.layout = layout
        self.objects = objects
        self.n_instances = max((o.instance for o in objects), default=-1) + 1
        self._by_shape = {shape: [o for o in objects if o.shape == shape] for shape in _INTERSECTORS}

    def cast(self, origin: np.ndarray, directions: np.ndarray, time_s: float, chunk: int = 1024) -> RayHits:
        """Nearest hit of each ray from one origin with the scene as it is at ``time_s``.

        Rays are processed in consecutive chunks, and each chunk is only tested against the objects
        whose bounding sphere meets the cone of its directions, so callers should order rays
        coherently (camera rays by image tile, LiDAR rays by azimuth).

        Args:
            origin: ``(3,)`` ray origin (global).
            directions: ``(N, 3)`` unit ray directions (global).
            time_s: scene time; moving objects are placed at their position at that time.
            chunk: rays per chunk.

        Returns:
            :class:`RayHits` with ``N`` entries.
        """
        origin = np.asarray(origin, dtype=np.float64)
        directions = np.asarray(directions, dtype=np.float64)
        groups = {shape: self._place(group, origin, time_s) for shape, group in self._by_shape.items() if group}
        parts = [self._cast_chunk(origin, directions[s : s + chunk], groups)
                 for s in range(0, len(directions), chunk)]
        return RayHits(*(np.concatenate(arrays) for arrays in zip(*parts)))

    @staticmethod
    def _place(group: list[WorldObject], origin: np.ndarray, time_s: float) -> _PlacedGroup:
        positions = np.stack([o.position_at(time_s) for o in group])
        sizes = np.stack([o.size for o in group])
        centres, radii = zip(*(_bounding_sphere(o, p) for o, p in zip(group, positions)))
        offsets = np.stack(centres) - origin
        distance = np.linalg.norm(offsets, axis=1)
        radii = np.array(radii)
        margin = np.where(distance > radii, np.arcsin(np.clip(radii / np.maximum(distance, _EPS), 0.0, 1.0)), np.pi)
        return _PlacedGroup(positions, sizes, np.array([o.yaw for o in group]),
                            np.array([o.label for o in group], dtype=np.int64),
                            np.array([o.instance for o in group], dtype=np.int64),
                            offsets / np.maximum(distance, _EPS)[:, None], margin)

    def _cast_chunk(self, origin: np.ndarray, directions: np.ndarray,
                    groups: dict[str, _PlacedGroup]) -> tuple[np.ndarray, ...]:
        n = len(directions)
        best = _intersect_ground(origin, directions)
        ground_y = origin[1] + np.where(np.isfinite(best), best, 0.0) * directions[:, 1]
        label = self.layout.ground_labels(ground_y).astype(np.int64)
        instance = np.full(n, -1, dtype=np.int64)
        normal = np.tile([0.0, 0.0, 1.0], (n, 1))

        axis = directions.mean(axis=0)
        axis /= np.linalg.norm(axis)
        cone_half_angle = float(np.arccos(np.clip((directions @ axis).min(), -1.0, 1.0)))
        for shape, group in groups.items():
            near = group.in_cone(axis, cone_half_angle)
            if not near.any():
                continue
            t, which, normals = _INTERSECTORS[shape](origin, directions, group.positions[near], group.sizes[near],
                                                     group.yaws[near])
            closer = t < best
            best[closer] = t[closer]
            label[closer] = group.labels[near][which[closer]]
            instance[closer] = group.instances[near][which[closer]]
            normal[closer] = normals[closer]

        label[~np.isfinite(best)] = -1
        # Normals face the ray origin so shading and incidence do not depend on the side hit.
        facing = np.einsum("ij,ij->i", normal, directions) > 0
        normal[facing] *= -1
        return best, label, instance, normal


def _bounding_sphere(obj: WorldObject, position: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere enclosing the object placed at ``position``."""
    if obj.shape == "sphere":
        return position, float(obj.size[0]) / 2
    if obj.shape == "cylinder":  # position is the base; the centre is at mid-height
        return position + [0.0, 0.0, obj.size[2] / 2], float(np.hypot(obj.size[0] / 2, obj.size[2] / 2))
    return position, float(np.linalg.norm(obj.size)) / 2


def _intersect_ground(origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Distance to the plane z = 0 along each ray, ``inf`` if the ray does not go down to it."""
    going_down = directions[:, 2] < -_EPS
    t = np.full(len(directions), np.inf)
    t[going_down] = -origin[2] / directions[going_down, 2]
    return np.where(t > _EPS, t, np.inf)


def _nearest(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per ray, the smallest of ``(N, M)`` candidate distances and the index of its object."""
    which = np.argmin(t, axis=1)
    return t[np.arange(len(t)), which], which


# Each intersector takes one origin (3,), directions (N, 3) and M objects (positions (M, 3),
# sizes (M, 3), yaws (M,)) and returns (t (N,), which (N,), normal (N, 3)): the nearest hit
# distance (inf if none), the index of the object hit and the unit surface normal (any sign).


def _intersect_boxes(origin, directions, centres, sizes, yaws):
    """Slab test against boxes rotated by ``yaws`` about z (length along the local x axis)."""
    cos, sin = np.cos(yaws), np.sin(yaws)
    rel = origin - centres  # (M, 3)
    # Origin and directions in each box frame (rotate by -yaw about z): (M,) and (N, M).
    origin_local = (cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1], rel[:, 2])
    dx, dy = directions[:, 0:1], directions[:, 1:2]
    dz = np.broadcast_to(directions[:, 2:3], (len(directions), len(yaws)))
    direction_local = (cos * dx + sin * dy, -sin * dx + cos * dy, dz)
    half_extent = (sizes[:, 1] / 2, sizes[:, 0] / 2, sizes[:, 2] / 2)
    t_enter = np.full(dz.shape, -np.inf)
    t_exit = np.full(dz.shape, np.inf)
    entry_axis = np.zeros(dz.shape, dtype=np.int64)
    for axis in range(3):
        d = direction_local[axis]
        d = np.where(np.abs(d) < _EPS, _EPS, d)
        t1 = (-half_extent[axis] - origin_local[axis]) / d
        t2 = (half_extent[axis] - origin_local[axis]) / d
        near = np.minimum(t1, t2)
        later = near > t_enter
        t_enter = np.where(later, near, t_enter)
        entry_axis[later] = axis
        t_exit = np.minimum(t_exit, np.maximum(t1, t2))
    t, which = _nearest(np.where((t_exit >= t_enter) & (t_enter > _EPS), t_enter, np.inf))
    rows = np.arange(len(t))
    axis = entry_axis[rows, which]
    local_normal = np.zeros((len(t), 3))
    local_normal[rows, axis] = 1.0
    c, s = cos[which], sin[which]
    normal = np.stack([c * local_normal[:, 0] - s * local_normal[:, 1],
                       s * local_normal[:, 0] + c * local_normal[:, 1], local_normal[:, 2]], -1)
    return t, which, normal


def _intersect_cylinders(origin, directions, bases, sizes, _yaws):
    """Vertical cylinders standing on ``bases`` (side surface and top disc)."""
    radius, height = sizes[:, 0] / 2, sizes[:, 2]
    rel = origin - bases  # (M, 3)
    dx, dy, dz = directions[:, 0:1], directions[:, 1:2], directions[:, 2:3]
    a = np.maximum(dx**2 + dy**2, _EPS)  # (N, 1)
    b = 2.0 * (rel[:, 0] * dx + rel[:, 1] * dy)  # (N, M)
    c = rel[:, 0] ** 2 + rel[:, 1] ** 2 - radius**2  # (M,)
    disc = b**2 - 4 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    z_side = rel[:, 2] + t_side * dz
    t_side = np.where((disc >= 0) & (t_side > _EPS) & (z_side >= 0) & (z_side <= height), t_side, np.inf)
    safe_dz = np.where(np.abs(dz) < _EPS, _EPS, dz)
    t_top = (height - rel[:, 2]) / safe_dz
    top_inside = (rel[:, 0] + t_top * dx) ** 2 + (rel[:, 1] + t_top * dy) ** 2 <= radius**2
    t_top = np.where((t_top > _EPS) & top_inside, t_top, np.inf)
    t, which = _nearest(np.minimum(t_side, t_top))
    rows = np.arange(len(t))
    on_top = t_top[rows, which] <= t_side[rows, which]
    hit = rel[which] + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    side_normal = np.stack([hit[:, 0], hit[:, 1], np.zeros(len(t))], -1) / radius[which][:, None]
    return t, which, np.where(on_top[:, None], np.array([0.0, 0.0, 1.0]), side_normal)


def _intersect_spheres(origin, directions, centres, sizes, _yaws):
    """Spheres of diameter ``sizes[:, 0]``."""
    radius = sizes[:, 0] / 2
    rel = origin - centres  # (M, 3)
    b = directions @ rel.T  # (N, M)
    disc = b**2 - (np.einsum("mk,mk->m", rel, rel) - radius**2)
    t_all = -b - np.sqrt(np.maximum(disc, 0.0))
    t, which = _nearest(np.where((disc >= 0) & (t_all > _EPS), t_all, np.inf))
    normal = (rel[which] + np.where(np.isfinite(t), t, 0.0)[:, None] * directions) / radius[which][:, None]
    return t, which, normal


_INTERSECTORS = {"box": _intersect_boxes, "cylinder": _intersect_cylinders, "sphere": _intersect_spheres}


def make_world(rng: np.random.Generator, layout: StreetLayout, x_range: tuple[float, float],
               ego_lane_y: float) -> tuple[World, list[dict]]:
    """A random street: building blocks and trees on both sides, parked and moving cars, a truck,
    walking pedestrians, and road works (cones, a barrier) on the centre line.

    Args:
        rng: source of all randomness (the scene is a pure function of its state).
        layout: the street cross-section.
        x_range: global x extent to populate; the ego drives near its middle.
        ego_lane_y: the ego vehicle's lane; nothing is placed in it.

    Returns:
        The world and one dict per annotated instance: ``category`` (lidarseg name) and ``moving``.
    """
    x_lo, x_hi = x_range
    road_y = layout.road_y
    objects: list[WorldObject] = []
    instances: list[dict] = []

    def add_instance(category: int, moving: bool) -> int:
        instances.append({"category": LIDARSEG_CLASSES[category], "moving": moving})
        return len(instances) - 1

    for side in (-1.0, 1.0):
        # Building blocks with gaps, facades flush with the end of the terrain band.
        x = x_lo
        while x < x_hi:
            length, depth, height = rng.uniform(10, 24), rng.uniform(8, 14), rng.uniform(6, 18)
            centre_y = road_y + side * (layout.facade_offset + depth / 2)
            objects.append(WorldObject("box", MANMADE, np.array([x + length / 2, centre_y, height / 2]),
                                       np.array([depth, length, height])))
            x += length + rng.uniform(2, 6)
        # Trees in the terrain band: trunk and crown are both vegetation.
        tree_y = road_y + side * (layout.road_half_width + layout.sidewalk_width + layout.terrain_width / 2)
        for x in np.arange(x_lo + rng.uniform(0, 8), x_hi, 14.0):
            crown = rng.uniform(1.3, 2.0)
            objects.append(WorldObject("cylinder", VEGETATION, np.array([x, tree_y, 0.0]), np.array([0.4, 0.4, 3.0])))
            objects.append(WorldObject("sphere", VEGETATION, np.array([x, tree_y, 3.0 + crown * 0.8]),
                                       np.full(3, 2 * crown)))
        # Parked cars along the kerb, with gaps.
        parked_y = road_y + side * (layout.road_half_width - 1.2)
        for x in np.arange(x_lo + rng.uniform(0, 6), x_hi, 11.0):
            if rng.random() < 0.35:
                continue
            yaw = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.05)
            objects.append(WorldObject("box", CAR, np.array([x, parked_y, 0.8]), np.array([1.9, 4.6, 1.6]), yaw,
                                       instance=add_instance(CAR, False)))
        # Pedestrians walking along the sidewalk.
        walk_y = road_y + side * (layout.road_half_width + layout.sidewalk_width / 2)
        for x in rng.uniform(x_lo + 10, x_hi - 10, 4):
            speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.5)
            objects.append(WorldObject("cylinder", PEDESTRIAN, np.array([x, walk_y, 0.0]), np.array([0.6, 0.6, 1.75]),
                                       velocity=np.array([speed, 0.0, 0.0]), instance=add_instance(PEDESTRIAN, True)))

    # Oncoming traffic in the other lane (never in the ego lane), ahead of the middle of the range
    # where the ego drives: a convoy at one speed, so that vehicles never drive through each other.
    other_lane_y = 2 * road_y - ego_lane_y
    convoy_x = (x_lo + x_hi) / 2 + rng.uniform(10, 20)
    convoy_velocity = np.array([-rng.uniform(3, 7), 0.0, 0.0])
    for k in range(3):
        objects.append(WorldObject("box", CAR, np.array([convoy_x + 16.0 * k, other_lane_y, 0.8]),
                                   np.array([1.9, 4.6, 1.6]), np.pi, convoy_velocity, add_instance(CAR, True)))
    objects.append(WorldObject("box", TRUCK, np.array([convoy_x + 52.0, other_lane_y, 1.6]), np.array([2.5, 8.0, 3.2]),
                               np.pi, convoy_velocity, add_instance(TRUCK, True)))
    # Road works on the centre line, between the two lanes: a row of cones and a barrier.
    x = rng.uniform(x_lo + 30, x_hi - 30)
    for k in range(3):
        objects.append(WorldObject("cylinder", CONE, np.array([x + 1.5 * k, road_y, 0.0]), np.array([0.4, 0.4, 0.7]),
                                   instance=add_instance(CONE, False)))
    objects.append(WorldObject("box", BARRIER, np.array([x + 6.0, road_y, 0.5]), np.array([0.4, 2.0, 1.0]),
                               instance=add_instance(BARRIER, False)))
    return World(layout, objects), instances
