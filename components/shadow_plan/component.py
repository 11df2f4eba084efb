from kfp import dsl

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def shadow_plan(config_json: str) -> list[int]:
    """The shadow-model groups, for the ParallelFor fan-out."""
    from tckr.config import parse_config
    from tckr.stages import shadow_group_numbers

    return shadow_group_numbers(parse_config(config_json))
