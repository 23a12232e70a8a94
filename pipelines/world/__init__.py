"""Procedural worlds the embedded base models are pretrained on: pictures (`image`) and text (`text`)."""
