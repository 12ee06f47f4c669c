"""bluesky-ptychopinn."""
