from tckr.components.report.component import report

__all__ = ["report"]
