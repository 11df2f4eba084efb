from tckr.components.start_run.component import start_run

__all__ = ["start_run"]
