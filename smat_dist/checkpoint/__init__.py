"""Checkpoints: the checkpointer and its part protocols, the manifest, the shard file format, re-slicing to
another world size, and the DeepSpeed engine as a part (import that one from
smat_dist.checkpoint.deepspeed_part: it needs smat_dist.distributed).

Above distributed, method and the pool in the layer order (it saves what they hold), below build and train.
"""
from smat_dist.checkpoint.checkpointer import Checkpointer
from smat_dist.checkpoint.errors import CheckpointError, ShardError
from smat_dist.checkpoint.manifest import (FORMAT_VERSION, check_compatible, checkpoint_tasks, find_latest,
                                           read_manifest, verify_file)
from smat_dist.checkpoint.parts import EnginePart, ShardedPart, StatePart, part_kind

__all__ = ["Checkpointer", "CheckpointError", "ShardError", "FORMAT_VERSION", "check_compatible",
           "checkpoint_tasks", "find_latest", "read_manifest", "verify_file", "EnginePart", "ShardedPart",
           "StatePart", "part_kind"]
