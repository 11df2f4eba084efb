from tckr.components.generate.component import generate

__all__ = ["generate"]
