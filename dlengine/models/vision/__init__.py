"""Vision towers of the multimodal models."""
