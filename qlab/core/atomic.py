"""Files written all at once, so that nothing is lost or half-written when a run is killed.

The new content goes to a temporary file beside the target (its name carries the process id, so two runs never
write into the same temporary file), then one rename puts it in place: a reader sees the old file or the new
one, never part of one. Sweeps, benchmarks, checkpoints and caches all write through here.
"""
from contextlib import contextmanager
import json
import os
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` to write to; rename it onto ``path`` when the block ends, or
    remove it if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
