"""captune: fine-tune, evaluate and serve BLIP image-captioning models on your own images."""

__version__ = "0.1.0"
