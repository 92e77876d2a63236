"""Multimodal NER (ITA): import, image-text views, tagger training, batch tagging, scoring."""
