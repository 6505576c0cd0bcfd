# A test's own pin directory under /sys/fs/bpf, removed with whatever is in it. A proxy that ran as
# its unprivileged user unpins its maps at stop but cannot remove the directory itself (its parent
# is root's: docs/operations.md), and dns_cache outlives the proxy on purpose: both are the test's
# to remove, also when the test failed.
from __future__ import annotations

import os


def remove_pin_dir(path: str) -> list[str]:
    """Unlink every pin in `path`, then the directory. Returns the names that were left, sorted, so the
    caller can assert what a stopped proxy may leave behind."""
    if not os.path.isdir(path):
        return []
    left = sorted(os.listdir(path))
    for name in left:  # the directory is the test's own: whatever is in it goes
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
    return left
