"""accord-medrpg: MedRPG medical phrase grounding (TransVG + TaCo) on MS-CXR-layout data."""
