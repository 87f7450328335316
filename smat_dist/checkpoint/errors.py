"""The checkpoint's errors, in one module so that every part of the package (and its callers) names the same
classes: a CheckpointError says which file, key, shard or setting makes a checkpoint unusable; a ShardError is
the shard file format's own, raised by the reader and writer of one file."""


class CheckpointError(RuntimeError):
    pass


class ShardError(RuntimeError):
    """A shard file is missing, truncated, malformed or does not match its recorded digests."""
