"""What data/ shares: read a user's or a raw text file, download a raw file, and write and read a
prepared directory (meta.json, naming the folder of its arrays and recording each file's size)
as one set."""

import codecs
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from support.common import atomic_write, fsync_path, write_synced


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


class DownloadError(OSError):
    """A raw file could not be downloaded (no network, a refused connection, ...): url, reason."""

    def __init__(self, url: str, reason):
        super().__init__(f"could not download {url} ({reason}): offline, pass --raw-dir DIR "
                         f"with a local copy of the raw files")
        self.url, self.reason = url, reason


def download(url: str, dest: Path) -> Path:
    """Fetch url to dest (temporary file, then rename); nothing is fetched if dest exists.
    The network failing is a DownloadError (url, reason: what the network said), the file
    failing to be written an OSError naming it; neither leaves a file behind."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}")

    failed = []  # what the network said, apart from a failure to write the file

    def fetch(tmp):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                body = r.read()  # the raw files are a few MB
        except OSError as e:  # no network, a refused connection, a timeout, a cut transfer
            reason = getattr(e, "reason", e)
            failed.append(getattr(reason, "strerror", None) or reason)
            raise
        Path(tmp).write_bytes(body)

    try:
        atomic_write(dest, fetch)
    except OSError:
        if failed:
            raise DownloadError(url, failed[0]) from None
        raise  # the file could not be written (a full disk, ...): the error names it
    return dest


SET_PREFIX = "prepared-"  # the folder of one prepare run's arrays: prepared-XXXXXXXX


def write_prepared(out_dir, files: dict, meta: dict) -> dict:
    """A prepared directory as one set, all or nothing even across a crash or a power cut: the
    files {name: np.ndarray (its raw bytes, what np.memmap and np.fromfile read back) or str
    (UTF-8)} go into a new folder of their own, out_dir/prepared-XXXXXXXX, each flushed to the
    disk; then out_dir/meta.json, which names that folder ("folder") and records each file's
    size ("files"), replaces the old meta.json in one rename (common.atomic_write). A reader
    goes through meta.json (prepared_folder), so it sees the old set or the new one, whole. The
    old set's folder, and what a prepare run that was stopped left, are removed after.
    Prints the directory and its files (one line). -> meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = {name: f.encode() if isinstance(f, str) else np.ascontiguousarray(f).tobytes()
             for name, f in files.items()}
    folder = Path(tempfile.mkdtemp(prefix=SET_PREFIX, dir=out_dir))
    try:
        for name, b in blobs.items():
            write_synced(folder / name, lambda p, b=b: Path(p).write_bytes(b))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual mode
        fsync_path(folder)
        meta = {**meta, "folder": folder.name, "files": {n: len(b) for n, b in blobs.items()}}
        old = _old_set(out_dir)
        text = json.dumps(meta, indent=2) + "\n"
        atomic_write(out_dir / "meta.json", lambda p: Path(p).write_text(text))  # the swap
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    left = [*out_dir.glob(SET_PREFIX + "*"), *out_dir.glob("meta.json.*.tmp")]  # by a stopped run
    for stale in old + [f for f in left if f != folder]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists():
            stale.unlink()
    print(f"wrote {os.path.relpath(out_dir)}/: meta.json, {folder.name}/ "
          f"({', '.join(blobs)})")
    return meta


def _old_set(out_dir: Path) -> list:
    """The files of the set out_dir holds now, to remove once a new one replaces it: those an
    older prepare.py wrote beside meta.json, before sets had a folder of their own."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        return [] if "folder" in meta else [out_dir / str(n) for n in meta["files"]
                                            if Path(str(n)).name == str(n)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # none, or not ours: nothing to remove


def prepared_folder(directory, meta: dict) -> Path:
    """Where the files of a prepared directory are: the folder meta.json names (a sibling of
    meta.json, by name only), or the directory itself for a set an older prepare.py wrote."""
    name = meta.get("folder")
    if name is None:
        return Path(directory)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{Path(directory) / 'meta.json'}: folder {name!r} is not the name "
                         f"of a folder beside it: prepare it again (python -m data.NAME "
                         f"--out-dir DIR)")
    return Path(directory) / name


def read_meta(directory) -> dict:
    """meta.json of a prepared directory, checked: JSON with "kind" and "files", and each file
    it lists, in prepared_folder, of the size it records (a directory that mixes two prepare
    runs is refused, not read), no array empty. Any fault: one ValueError naming the file."""
    path = Path(directory) / "meta.json"
    redo = "prepare it again (python -m data.NAME --out-dir DIR)"
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
    folder = prepared_folder(directory, meta)
    for name, size in sizes.items():
        f = folder / name
        got = f.stat().st_size if f.exists() else None
        if got != size:
            raise ValueError(f"{f}: {'missing' if got is None else f'{got:,} bytes'}, but "
                             f"meta.json says {size:,}: the directory mixes two prepare runs "
                             f"or lost a file; {redo}")
        if size == 0 and name.endswith(".bin"):  # a split with no tokens or no examples
            raise ValueError(f"{f}: empty (0 bytes): a split with nothing in it; give more "
                             f"raw text and {redo}")
    return meta
