from tckr.components.attack.component import attack

__all__ = ["attack"]
