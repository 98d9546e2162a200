"""accord-superflow: SuperFlow LiDAR-camera cross-modal pretraining as an accord plugin.

This release holds the nuScenes data layer (:mod:`accord_superflow.data`); the hooks are in
:mod:`accord_superflow.plugin`.
"""

__version__ = "0.1.0"
