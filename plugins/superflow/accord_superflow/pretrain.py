"""SuperFlow pretraining: the per-keyframe dataset, its collate function and the model.

Per keyframe ``t`` (method spec §5.2) a sample holds

* the LiDAR scans of ``t``, ``t - 1`` and ``t + 1`` (neighbours from the info index, never across a
  scene border; the keyframe itself stands in for a missing neighbour),
* the dense cloud: the keyframe plus its first ``num_sweeps`` previous sweeps moved into the
  keyframe LiDAR frame,
* ``num_cameras`` cameras drawn at random (the same channels for the three frames) with their
  superpixels,
* the point-pixel pairs of every cloud, computed on the raw data **before** augmentation and then
  carried through every augmentation: the points are flipped, rotated and scaled (each cloud with
  its own draw) without changing which point a pair names, and the pair's pixel follows the image
  resize and horizontal flip.

:class:`SuperFlow` turns a collated batch into the three losses: all clouds go through one
cylindrical voxelisation and one MinkUNet pass, the images through the frozen DINOv2 teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from accord.config import ExistingPath, StrictModel
from accord_superflow.data.index import CameraFrame, InfoIndex, KeyframeInfo, load_info_index
from accord_superflow.data.projection import pair_points_with_cameras
from accord_superflow.data.schema import CAMERA_CHANNELS, POINT_DIMS
from accord_superflow.data.superpixels import (
    SEMANTIC_KIND,
    SlicParams,
    cached_slic_superpixels,
    load_superpixels,
    read_superpixel_meta,
    superpixel_dir,
)
from accord_superflow.losses import GroupedFeatures, SuperFlowLoss, SuperFlowLossConfig
from accord_superflow.models.config import BackboneConfig, TeacherConfig
from accord_superflow.models.heads import PixelHead, PointHead
from accord_superflow.models.teacher import DinoV2Teacher, build_teacher
from accord_superflow.models.voxelize import DEFAULT_VOXEL_SIZE, cylindrical_voxelize

__all__ = [
    "superflow_model",
    "NUM_FRAMES",
    "CLOUD_FRAMES",
    "AugmentationConfig",
    "PointAugmentationConfig",
    "augment_points",
    "PretrainDataConfig",
    "PretrainSample",
    "SuperFlowPretrainDataset",
    "collate_pretrain",
    "load_lidar_points",
    "SuperFlowModelConfig",
    "SuperFlow",
    "build_superflow",
]

#: Frames per sample: the keyframe t, then t - 1 and t + 1.
NUM_FRAMES = 3
#: For each cloud of a sample (keyframe, previous, next, dense), the frame whose images it pairs with.
CLOUD_FRAMES = (0, 1, 2, 0)


class PointAugmentationConfig(StrictModel):
    """Random flips, yaw rotation and scale of a cloud (mmdet3d ``RandomFlip3D`` + ``GlobalRotScaleTrans``)."""

    flip_probability: float = Field(0.5, ge=0, le=1, description="flip y (and, independently, x) of a cloud")
    rotation_range: tuple[float, float] = Field((0.0, float(np.pi)), description="yaw in radians, uniform")
    scale_range: tuple[float, float] = Field((0.95, 1.05), description="isotropic scale, uniform")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> PointAugmentationConfig:
        for name in ("rotation_range", "scale_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} exceeds upper bound {high}")
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range: must be positive, got {self.scale_range}")
        return self


class AugmentationConfig(PointAugmentationConfig):
    """SuperFlow's pretraining augmentations (``configs/_base_/datasets/nuscenes_pretrain.py``)."""

    image_flip_probability: float = Field(0.5, ge=0, le=1, description="horizontal flip, per image")


class PretrainDataConfig(StrictModel):
    """Which keyframes and what each pretraining sample holds."""

    root: ExistingPath = Field(description="nuScenes root (v1.0-* tables, samples/, sweeps/, superpixels/)")
    version: str = Field("v1.0-trainval", description="nuScenes table directory")
    split: str = Field("train", description="official split of the version (SuperFlow: train; SLidR: 600 scenes)")
    superpixels: Literal["semantic", "slic"] = Field(
        "semantic", description="semantic: class-level ids shared by all cameras and frames (SuperFlow); "
                                "slic: per-image ids (SLidR; no temporal term)")
    num_cameras: int = Field(3, ge=1, le=len(CAMERA_CHANNELS), description="cameras drawn per sample")
    num_sweeps: int = Field(2, ge=0, description="previous sweeps in the dense cloud")
    image_size: tuple[int, int] = Field((224, 448), description="(height, width) after resizing")
    min_depth: float = Field(1.0, gt=0, description="pairs need depth > min_depth (metres)")
    margin_px: float = Field(0.0, ge=0, description="pixels dropped at every image border (core project_points rule; 0: the whole image)")
    cache_dir: Path | None = Field(None, description="info index cache; None: <root>/superflow_cache")
    augmentation: AugmentationConfig = AugmentationConfig()

    @model_validator(mode="after")
    def _image_size_is_positive(self) -> PretrainDataConfig:
        if min(self.image_size) <= 0:
            raise ValueError(f"image_size: expected positive (height, width), got {self.image_size}")
        return self


@dataclass(frozen=True, eq=False)
class PretrainSample:
    """One keyframe's pretraining inputs, augmented.

    Attributes:
        cameras: the camera channels drawn for this sample, in slot order.
        clouds: four ``(N_c, 4)`` float32 clouds ``(x, y, z, intensity)``: keyframe, previous,
            next, dense (see :data:`CLOUD_FRAMES`).
        pairs: per cloud, ``(M_c, 4)`` int64 ``(point row, camera slot, pixel row, pixel col)``
            in the resized, flipped image of the cloud's frame.
        images: ``(NUM_FRAMES, K, H, W, 3)`` uint8 RGB.
        superpixels: ``(NUM_FRAMES, K, H, W)`` int64 group id of every pixel within the sample.
    """

    cameras: list[str]
    clouds: list[np.ndarray]
    pairs: list[np.ndarray]
    images: np.ndarray
    superpixels: np.ndarray


def load_lidar_points(path: str | Path) -> np.ndarray:
    """A ``*.pcd.bin`` scan as ``(N, 4)`` float32 ``(x, y, z, intensity)`` (the ring index is dropped).

    Raises:
        ValueError: the file size is not a whole number of 5-float rows.
    """
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % POINT_DIMS:
        raise ValueError(f"{path}: {raw.size} floats is not a multiple of {POINT_DIMS} (x, y, z, intensity, ring)")
    return raw.reshape(-1, POINT_DIMS)[:, :4].copy()


def augment_points(points: np.ndarray, options: PointAugmentationConfig, rng: np.random.Generator) -> np.ndarray:
    """Random flips of y and x, yaw rotation and isotropic scale of ``(N, C)`` points (columns 3.. kept)."""
    xyz = points[:, :3].astype(np.float64)
    if rng.random() < options.flip_probability:
        xyz[:, 1] = -xyz[:, 1]
    if rng.random() < options.flip_probability:
        xyz[:, 0] = -xyz[:, 0]
    yaw = rng.uniform(*options.rotation_range)
    cos, sin = np.cos(yaw), np.sin(yaw)
    xyz = xyz @ np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    xyz *= rng.uniform(*options.scale_range)
    return np.concatenate([xyz.astype(np.float32), points[:, 3:]], axis=1)


class SuperFlowPretrainDataset(Dataset):
    """Keyframes of an info index as :class:`PretrainSample`\\ s (random cameras and augmentations).

    Randomness comes from torch's global generator (seeded per DataLoader worker and restored on
    resume by the Trainer), one NumPy generator per sample drawn from it.

    Args:
        options: dataset root, split and sample contents.
        index: keyframes to serve (their ``prev_index``/``next_index`` refer to it); ``None`` loads
            the split's info index (cached) with the sweeps the dense cloud needs.

    Raises:
        ValueError: a bad version or split, or a missing superpixel directory or ``meta.json``.
    """

    def __init__(self, options: PretrainDataConfig, index: InfoIndex | None = None) -> None:
        self.root = Path(options.root)
        self.options = options
        if index is None:
            index = load_info_index(self.root, options.version, options.split, max_sweeps=options.num_sweeps,
                                    cache_dir=options.cache_dir)
        self.index = index
        self.superpixel_dir = superpixel_dir(self.root, options.superpixels)
        if options.superpixels == SEMANTIC_KIND:
            self.num_superpixel_ids = int(read_superpixel_meta(self.superpixel_dir)["num_ids"])
        else:
            # SLIC maps are computed (and cached) on first use with the default SLidR settings.
            self.num_superpixel_ids = SlicParams().n_segments

    @property
    def view_consistent(self) -> bool:
        """Whether a superpixel id means the same region in every camera (class-level ids)."""
        return self.options.superpixels == SEMANTIC_KIND

    @property
    def groups_per_sample(self) -> int:
        """Exclusive bound of the per-sample group ids: per-image ids are offset by camera slot."""
        cameras = 1 if self.view_consistent else self.options.num_cameras
        return cameras * self.num_superpixel_ids

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> PretrainSample:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        keyframe = self.index.keyframes[position]
        channels = [str(c) for c in rng.permutation(CAMERA_CHANNELS)[: self.options.num_cameras]]
        frames = [keyframe] + [self.index.keyframes[i] if i is not None else keyframe
                               for i in (keyframe.prev_index, keyframe.next_index)]
        raw_clouds = [load_lidar_points(self.root / frame.lidar.path) for frame in frames]
        raw_clouds.append(self._dense_cloud(keyframe, raw_clouds[0]))
        images, superpixels, flips = [], [], []
        for frame in frames:
            frame_images, frame_superpixels, frame_flips = self._load_views(frame, channels, rng)
            images.append(frame_images)
            superpixels.append(frame_superpixels)
            flips.append(frame_flips)
        pairs = []
        for cloud, frame_slot in zip(raw_clouds, CLOUD_FRAMES):
            frame = frames[frame_slot]
            cameras = [frame.cameras[c] for c in channels]
            pairs.append(self._pairs(cloud, frame, cameras, flips[frame_slot]))
        clouds = [augment_points(cloud, self.options.augmentation, rng) for cloud in raw_clouds]
        return PretrainSample(cameras=channels, clouds=clouds, pairs=pairs, images=np.stack(images),
                              superpixels=np.stack(superpixels))

    def _dense_cloud(self, keyframe: KeyframeInfo, keyframe_points: np.ndarray) -> np.ndarray:
        """Keyframe points followed by the first ``num_sweeps`` sweeps in the keyframe LiDAR frame."""
        parts = [keyframe_points]
        for sweep in keyframe.sweeps[: self.options.num_sweeps]:
            points = load_lidar_points(self.root / sweep.path)
            points[:, :3] = sweep.sweep_to_keyframe.apply(points[:, :3])
            parts.append(points)
        return np.concatenate(parts)

    def _load_views(self, frame: KeyframeInfo, channels: Sequence[str], rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Resized (and randomly flipped) images ``(K, H, W, 3)``, group ids ``(K, H, W)``, flip flags ``(K,)``."""
        height, width = self.options.image_size
        images, groups = [], []
        flips = rng.random(len(channels)) < self.options.augmentation.image_flip_probability
        for slot, (channel, flip) in enumerate(zip(channels, flips)):
            camera = frame.cameras[channel]
            with Image.open(self.root / camera.path) as image:
                rgb = image.convert("RGB")
                ids = self._superpixels(camera, rgb.size)
                rgb = np.asarray(rgb.resize((width, height), Image.BILINEAR))
            ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((width, height), Image.NEAREST), np.int64)
            if not self.view_consistent:
                ids = ids + slot * self.num_superpixel_ids
            if flip:
                rgb, ids = rgb[:, ::-1], ids[:, ::-1]
            images.append(rgb)
            groups.append(ids)
        return np.stack(images), np.stack(groups), flips

    def _superpixels(self, camera: CameraFrame, image_size: tuple[int, int]) -> np.ndarray:
        if self.view_consistent:
            path = self.superpixel_dir / f"{camera.sample_data_token}.png"
        else:
            path = cached_slic_superpixels(self.root / camera.path, camera.sample_data_token, self.superpixel_dir)
        return load_superpixels(path, self.num_superpixel_ids, expected_size=image_size)

    def _pairs(self, cloud: np.ndarray, frame: KeyframeInfo, cameras: Sequence[CameraFrame],
               flips: np.ndarray) -> np.ndarray:
        """Pairs on the raw cloud and full-size images, with pixels moved into the resized, flipped images."""
        found = pair_points_with_cameras(cloud, frame.lidar, cameras, self.options.min_depth, self.options.margin_px)
        height, width = self.options.image_size
        sizes = np.array([[c.width, c.height] for c in cameras], dtype=np.float64).reshape(-1, 2)
        scale = np.array([[width, height]]) / sizes[found.camera_index]
        # Pixel centres sit at integer coordinates, so a resize maps u -> (u + 0.5) * s - 0.5.
        uv = (found.pixel_uv + 0.5) * scale - 0.5
        col = np.clip(np.rint(uv[:, 0]), 0, width - 1).astype(np.int64)
        row = np.clip(np.rint(uv[:, 1]), 0, height - 1).astype(np.int64)
        col = np.where(flips[found.camera_index], width - 1 - col, col)
        return np.stack([found.point_index, found.camera_index, row, col], axis=1)


def collate_pretrain(samples: Sequence[PretrainSample]) -> dict[str, torch.Tensor]:
    """Concatenate samples into one batch of flat tensors (the input of :meth:`SuperFlow.forward`).

    Clouds are numbered ``kind * B + sample`` (kind 0..3: keyframe, previous, next, dense) and
    images ``(frame * B + sample) * K + camera``; every index below is global to the batch.

    Returns:
        - ``points`` ``(N, 4)`` float32 and ``point_cloud`` ``(N,)``: all clouds, cloud by cloud;
        - ``cloud_kind``, ``cloud_sample`` ``(4B,)``: kind (0..3) and sample of every cloud;
        - ``images`` ``(3BK, 3, H, W)`` uint8, ``superpixels`` ``(3BK, H, W)`` group ids,
          ``image_frame``, ``image_sample`` ``(3BK,)``;
        - ``pair_point``, ``pair_image`` ``(P,)`` and ``pair_pixel`` ``(P, 2)`` ``(row, col)``.
    """
    batch_size = len(samples)
    cameras = samples[0].images.shape[1]
    points, point_cloud, cloud_kind, cloud_sample, pair_rows = [], [], [], [], []
    point_offset = 0
    for kind, frame in enumerate(CLOUD_FRAMES):
        for sample_number, sample in enumerate(samples):
            cloud_id = kind * batch_size + sample_number
            cloud, pairs = sample.clouds[kind], sample.pairs[kind]
            points.append(cloud)
            point_cloud.append(np.full(len(cloud), cloud_id, dtype=np.int64))
            cloud_kind.append(kind)
            cloud_sample.append(sample_number)
            image = (frame * batch_size + sample_number) * cameras + pairs[:, 1]
            pair_rows.append(np.stack([pairs[:, 0] + point_offset, image, pairs[:, 2], pairs[:, 3]], axis=1))
            point_offset += len(cloud)
    # (B, F, K, ...) -> (F, B, K, ...) so that images are numbered frame-major.
    images = np.stack([s.images for s in samples], axis=1)
    superpixels = np.stack([s.superpixels for s in samples], axis=1)
    frame_grid, sample_grid = np.meshgrid(np.arange(NUM_FRAMES), np.arange(batch_size), indexing="ij")
    pairs = np.concatenate(pair_rows)
    return {
        "points": torch.from_numpy(np.concatenate(points)),
        "point_cloud": torch.from_numpy(np.concatenate(point_cloud)),
        "cloud_kind": torch.tensor(cloud_kind, dtype=torch.int64),
        "cloud_sample": torch.tensor(cloud_sample, dtype=torch.int64),
        "images": torch.from_numpy(np.ascontiguousarray(images.reshape(-1, *images.shape[3:]))).permute(0, 3, 1, 2),
        "superpixels": torch.from_numpy(np.ascontiguousarray(superpixels.reshape(-1, *superpixels.shape[3:]))),
        "image_frame": torch.from_numpy(np.repeat(frame_grid.reshape(-1), cameras)),
        "image_sample": torch.from_numpy(np.repeat(sample_grid.reshape(-1), cameras)),
        "pair_point": torch.from_numpy(pairs[:, 0].copy()),
        "pair_image": torch.from_numpy(pairs[:, 1].copy()),
        "pair_pixel": torch.from_numpy(pairs[:, 2:].copy()),
    }


class SuperFlowModelConfig(StrictModel):
    """The networks: MinkUNet student, DINOv2 teacher, contrast width and voxel grid."""

    backbone: BackboneConfig = BackboneConfig()
    teacher: TeacherConfig = TeacherConfig()
    embed_dim: int = Field(64, ge=1, description="width of the shared 2D/3D contrast space")
    voxel_size: tuple[float, float, float] = Field(DEFAULT_VOXEL_SIZE, description="(rho m, phi deg, z m)")

    @model_validator(mode="after")
    def _voxel_size_is_positive(self) -> SuperFlowModelConfig:
        if min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size: every size must be positive, got {self.voxel_size}")
        return self


class SuperFlow(nn.Module):
    """SuperFlow pretraining model: 3D student, frozen 2D teacher, heads and losses.

    Args:
        backbone_3d: sparse backbone, ``backbone_3d(voxel_features (V, C_in), coords (V, 4) int32)
            -> (V, C_out)`` (``SFMinkUNetBackbone``); its weights are what pretraining produces.
        teacher: frozen DINOv2.
        loss: the three contrastive terms.
        backbone_channels: ``C_out`` of the backbone (96 for MinkUNet-34).
        embed_dim: contrast dimension (64).
        voxel_size: cylindrical voxel size ``(rho m, phi deg, z m)``.
    """

    def __init__(self, backbone_3d: nn.Module, teacher: DinoV2Teacher, loss: SuperFlowLoss,
                 backbone_channels: int = 96, embed_dim: int = 64,
                 voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE) -> None:
        super().__init__()
        self.backbone_3d = backbone_3d
        self.head_3d = PointHead(backbone_channels, embed_dim)
        self.teacher = teacher
        self.head_2d = PixelHead(teacher.embed_dim, embed_dim, teacher.patch_size)
        self.loss = loss
        self.voxel_size = tuple(voxel_size)

    def point_features(self, points: torch.Tensor, point_cloud: torch.Tensor, num_clouds: int) -> torch.Tensor:
        """``(N, 4)`` points of ``num_clouds`` clouds -> ``(N, embed_dim)`` unit features (per voxel, gathered)."""
        voxels = cylindrical_voxelize(points, point_cloud, num_clouds, self.voxel_size)
        return voxels.to_points(self.head_3d(self.backbone_3d(voxels.features, voxels.coords)))

    def pixel_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(I, 3, H, W)`` images -> ``(I, embed_dim, H, W)`` unit features."""
        return self.head_2d(self.teacher(images))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of a :func:`collate_pretrain` batch: ``{"loss", "spatial", "dense_to_sparse", "temporal"}``."""
        point_features = self.point_features(batch["points"], batch["point_cloud"], len(batch["cloud_kind"]))
        pixel_features = self.pixel_features(batch["images"])
        superpixels, image_sample = batch["superpixels"], batch["image_sample"]

        pair_image = batch["pair_image"]
        pairs = GroupedFeatures(point_features[batch["pair_point"]],
                                superpixels[pair_image, batch["pair_pixel"][:, 0], batch["pair_pixel"][:, 1]],
                                image_sample[pair_image])
        pair_kind = batch["cloud_kind"][batch["point_cloud"][batch["pair_point"]]]
        points = [GroupedFeatures(*(t[pair_kind == kind] for t in pairs)) for kind in range(len(CLOUD_FRAMES))]

        pixels = []
        channels = pixel_features.shape[1]
        pixels_per_image = superpixels.shape[1] * superpixels.shape[2]
        for frame in range(NUM_FRAMES):
            in_frame = batch["image_frame"] == frame
            pixels.append(GroupedFeatures(
                pixel_features[in_frame].permute(0, 2, 3, 1).reshape(-1, channels),
                superpixels[in_frame].reshape(-1),
                image_sample[in_frame].repeat_interleave(pixels_per_image)))
        return self.loss(points[:NUM_FRAMES], pixels, points[NUM_FRAMES])


def build_superflow(model: SuperFlowModelConfig, loss: SuperFlowLossConfig, groups_per_sample: int) -> SuperFlow:
    """The pretraining model of a config (imports mmdet3d and spconv for the backbone).

    Args:
        model: the networks.
        loss: the contrastive terms.
        groups_per_sample: group-id bound of the dataset (:attr:`SuperFlowPretrainDataset.groups_per_sample`).
    """
    from accord_superflow.models.backbone import build_backbone

    return SuperFlow(build_backbone(model.backbone), build_teacher(model.teacher),
                     SuperFlowLoss(groups_per_sample, loss), backbone_channels=model.backbone.out_channels,
                     embed_dim=model.embed_dim, voxel_size=model.voxel_size)


def superflow_model(cfg: Any, groups_per_sample: int) -> SuperFlow:
    """Model factory ``superflow.superflow``: a ``pretrain`` run's model from its config and the dataset's
    group-id bound (recorded in its checkpoints)."""
    return build_superflow(cfg.model, cfg.loss, groups_per_sample)
