"""Image encoding and decoding shared by workers, producers and viewers."""
