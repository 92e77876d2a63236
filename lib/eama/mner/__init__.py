"""Multimodal NER: ITA and BGA-MNER taggers, import, image-text views, training, batch tagging, scoring."""
