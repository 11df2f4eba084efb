from tckr.components.shadow_group.component import shadow_group

__all__ = ["shadow_group"]
