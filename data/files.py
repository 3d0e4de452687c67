"""What the prepare scripts share: download a raw file, write arrays and meta.json atomically."""

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from common import atomic_write


def download(url: str, dest: Path) -> Path:
    """Fetch url to dest (temporary file, then rename); nothing is fetched if dest exists."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}")

    def fetch(tmp):
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)

    try:
        atomic_write(dest, fetch)
    except OSError as e:  # URLError, timeouts, refused connections
        raise OSError(f"could not download {url} ({getattr(e, 'reason', e)}): offline, pass "
                      f"--raw-dir DIR with a local copy of the raw files") from None
    return dest


def write_tokens(path: Path, ids, dtype=np.uint16):
    """Token ids as a flat binary array (np.memmap reads it back without loading it)."""
    arr = np.asarray(ids, dtype=dtype)
    if dtype == np.uint16 and len(ids) and max(ids) >= 2**16:
        raise ValueError("token id does not fit in uint16")
    atomic_write(Path(path), lambda p: arr.tofile(p))


def write_meta(out_dir: Path, meta: dict):
    atomic_write(Path(out_dir) / "meta.json",
                  lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
