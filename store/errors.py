"""One error type for everything a user can get wrong; the CLI prints it as one line."""


class FlexfeedError(Exception):
    """A problem with the user's input or files: message says what, where, and the fix."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class StoreError(FlexfeedError):
    """The signal store refused an operation (wrong dataset, dim, dtype, rows...)."""


class LockBusy(StoreError):
    """Another writer holds the lock of a shard."""


class DamagedFile(StoreError):
    """A store file that cannot be read or holds wrong fields; ``path`` names it."""

    def __init__(self, message: str, hint: str | None, path):
        self.path = path
        super().__init__(message, hint)


class CorruptShard(StoreError):
    """A committed shard whose bytes no longer match its checksum (or cannot be read); names it and the fix."""

    def __init__(self, message: str, hint: str | None, *, key: str, shard: int, path):
        self.key = key
        self.shard = shard
        self.path = path
        super().__init__(message, hint)
