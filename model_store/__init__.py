"""Exported models and their cards: the card type, the image -> input function, and the store.

Importing this package is cheap and torch-free; the BentoML store functions live in
``model_store.store`` and import BentoML only there.
"""

from model_store.card import ModelCard
from model_store.preprocess import ImageError, decode_image, image_bytes_to_input, load_image, open_image, to_input

__all__ = ["ImageError", "ModelCard", "decode_image", "image_bytes_to_input", "load_image", "open_image", "to_input"]
