from tckr.components.generate_shard.component import generate_shard

__all__ = ["generate_shard"]
