"""Multimodal keyphrase generation (MM-MKP) on the engine: import, metric, model, training, extraction."""
