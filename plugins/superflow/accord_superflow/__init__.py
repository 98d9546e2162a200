"""accord-superflow: SuperFlow LiDAR-camera cross-modal pretraining as an accord plugin.

The nuScenes data layer is :mod:`accord_superflow.data`, pretraining :mod:`accord_superflow.pretrain`,
the downstream segmentation :mod:`accord_superflow.finetune` / :mod:`accord_superflow.evaluate`; the
tasks are listed in :mod:`accord_superflow.tasks` and the hooks are in :mod:`accord_superflow.plugin`.
"""

__version__ = "0.1.0"
