"""Recipes: each method as stages over the shared packages (``tckr``: TCKR; ``privimage``: PrivImage).

A recipe is a configuration model (the shared sections of :class:`tckr.recipes.base.RunBase` plus its
own), a :class:`tckr.core.stage.StageRegistry` of declared stages, and its profiles (``<recipe>/profiles``).
"""
