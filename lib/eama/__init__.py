"""eama: entity-aware news image captioning and multimodal alignment on Ray."""

__version__ = "0.1.0"
