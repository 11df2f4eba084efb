from tckr.components.generation_plan.component import generation_plan

__all__ = ["generation_plan"]
