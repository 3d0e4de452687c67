"""What data/ shares: read a user's or a raw text file, download a raw file, and write and read a
prepared directory (its arrays, and meta.json recording each file's size) as one set."""

import codecs
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from common import atomic_write, atomic_write_set


def read_text(path, newline=None) -> str:
    """A UTF-8 file's text, as open(path, encoding="utf-8-sig", newline=newline).read() gives it
    (a byte-order mark dropped; newline=None reads CR LF and CR line ends as LF, "" keeps them),
    except that a byte that is not UTF-8 is one ValueError naming the file and its line."""
    raw = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): save the "
                         f"file as UTF-8") from None
    return text if newline == "" else text.replace("\r\n", "\n").replace("\r", "\n")


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


def write_prepared(out_dir, files: dict, meta: dict) -> dict:
    """A prepared directory as one set: files {name: np.ndarray (its raw bytes, what np.memmap
    and np.fromfile read back) or str (UTF-8)} and meta.json, which records each file's size in
    meta["files"]. Everything is written before anything is renamed (common.atomic_write_set):
    a failure halfway leaves the old set whole; meta.json goes last. Prints the directory and
    its files (one line). -> meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = {name: f.encode() if isinstance(f, str) else np.ascontiguousarray(f).tobytes()
             for name, f in files.items()}
    meta = {**meta, "files": {name: len(b) for name, b in blobs.items()}}
    blobs["meta.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    atomic_write_set({out_dir / name: lambda p, b=b: Path(p).write_bytes(b)
                      for name, b in blobs.items()})
    print(f"wrote {os.path.relpath(out_dir)}/: {', '.join(blobs)}")
    return meta


def read_meta(directory) -> dict:
    """meta.json of a prepared directory, checked: JSON with "kind" and "files", and each file
    it lists of the size it records (a directory that mixes two prepare runs is refused, not
    read), no array empty. Any fault: one ValueError naming the file."""
    path = Path(directory) / "meta.json"
    redo = "prepare it again (python data/NAME/prepare.py --out-dir DIR)"
    text = read_text(path)
    try:
        meta = json.loads(text)
        sizes = {str(name): int(size) for name, size in meta["files"].items()}
        if meta["kind"] not in ("examples", "stream"):
            raise ValueError(f"kind {meta['kind']!r} is neither 'examples' nor 'stream'")
    except KeyError as e:
        raise ValueError(f"{path}: no {e} key: {redo}") from None
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, bad values
        raise ValueError(f"{path}: not a prepared set's meta.json ({e}): {redo}") from None
    for name, size in sizes.items():
        f = path.parent / name
        got = f.stat().st_size if f.exists() else None
        if got != size:
            raise ValueError(f"{f}: {'missing' if got is None else f'{got:,} bytes'}, but "
                             f"meta.json says {size:,}: the directory mixes two prepare runs "
                             f"or lost a file; {redo}")
        if size == 0 and name.endswith(".bin"):  # a split with no tokens or no examples
            raise ValueError(f"{f}: empty (0 bytes): a split with nothing in it; give more "
                             f"raw text and {redo}")
    return meta
