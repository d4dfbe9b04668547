"""Several ranks (torchrun): the world, the collectives, and each rank's share of the work.

The rest of saetrain asks this room "which rows / dictionaries / latents are mine" (sharding)
and "reduce this" (collectives), and never calls torch.distributed itself. World size 1 runs the
same code with no process group.
"""

from saetrain.distributed.world import World, close_world, init_world, world_session
from saetrain.errors import DistributedError

__all__ = ["DistributedError", "World", "close_world", "init_world", "world_session"]
