# mmdet3d MinkUNet-34 segmentor on SuperFlow's cylindrical voxels (nuScenes lidarseg, 16 classes).
#
# Pretrained SuperFlow weights drop in unchanged:
#   accord export runs/superflow-pretrain/checkpoints/step_00087900.pt --format mmdet3d --out superflow_minkunet34.pth
# then either set `load_from = 'superflow_minkunet34.pth'` in a training config that inherits this
# model, or `model.backbone.init_cfg = dict(type='Pretrained', checkpoint='superflow_minkunet34.pth',
# prefix='backbone.')`. The checkpoint holds only `backbone.*` keys; the head is trained from scratch.
#
# `SFMinkUNetBackbone` is mmdet3d's `MinkUNetBackbone(sparseconv_backend='spconv')` with the spatial
# shape padded to a multiple of 16 and a settable BN momentum (0.02 downstream); the exported weights
# also load into the stock `MinkUNetBackbone`. `SFCylindricalDataPreprocessor` voxelises like
# pretraining (rho 0.1 m, phi 1 deg, z 0.1 m; mean point features).
custom_imports = dict(imports=['accord_superflow.models.segmentor'], allow_failed_imports=False)
default_scope = 'mmdet3d'

model = dict(
    type='MinkUNet',
    data_preprocessor=dict(type='SFCylindricalDataPreprocessor', voxel_size=[0.1, 1.0, 0.1]),
    backbone=dict(
        type='SFMinkUNetBackbone',
        in_channels=4,
        base_channels=32,
        encoder_channels=[32, 64, 128, 256],
        encoder_blocks=[2, 3, 4, 6],
        decoder_channels=[256, 128, 96, 96],
        decoder_blocks=[2, 2, 2, 2],
        bn_momentum=0.02),
    decode_head=dict(
        type='MinkUNetHead',
        channels=96,
        num_classes=16,
        dropout_ratio=0,
        # MinkUNetHead takes a single loss; accord's `finetune` task trains SuperFlow's CE + 2 x Lovasz.
        loss_decode=dict(type='mmdet.CrossEntropyLoss', avg_non_ignore=True),
        ignore_index=16),
    train_cfg=dict(),
    test_cfg=dict())
