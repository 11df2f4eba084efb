from tckr.components.generator.component import generator

__all__ = ["generator"]
