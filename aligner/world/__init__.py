"""The built-in aesthetic world: a seeded generator of images, captions, queries and an oracle."""

from aligner.world.generate import World, WorldSpec, generate_world, world_fingerprint

__all__ = ["World", "WorldSpec", "generate_world", "world_fingerprint"]
