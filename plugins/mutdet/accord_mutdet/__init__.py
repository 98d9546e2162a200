"""accord-mutdet: MutDet detection pretraining for rotated DETR detectors (DIOR-R, DOTA)."""
