from tckr.components.student.component import student

__all__ = ["student"]
