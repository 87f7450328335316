"""The checkpoint's error: a file, key, shard or setting that makes a checkpoint unusable, named."""


class CheckpointError(RuntimeError):
    pass
