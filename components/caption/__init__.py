from tckr.components.caption.component import caption

__all__ = ["caption"]
