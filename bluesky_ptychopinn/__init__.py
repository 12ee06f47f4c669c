"""bluesky-ptychopinn: PtychoPINN neural-network ptychography for Bluesky beamlines."""

__version__ = "0.1.0"
