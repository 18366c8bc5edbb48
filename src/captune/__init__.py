"""captune: fine-tune, evaluate and serve BLIP image-captioning models on your own images."""

__version__ = "0.1.0"

__all__ = ["Captioner", "GenerationOptions", "__version__"]


def __getattr__(name: str):
    # Lazy on purpose: `import captune` (the CLI's --help, config tooling) must not pay for importing torch.
    if name == "Captioner":
        from .captioner import Captioner

        return Captioner
    if name == "GenerationOptions":
        from .generate import GenerationOptions

        return GenerationOptions
    raise AttributeError(f"module 'captune' has no attribute {name!r}")
