from tckr.components.finetune.component import finetune

__all__ = ["finetune"]
