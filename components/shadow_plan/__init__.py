from tckr.components.shadow_plan.component import shadow_plan

__all__ = ["shadow_plan"]
