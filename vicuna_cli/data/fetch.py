"""`fetch`: get a dataset file from the Hugging Face Hub, an http(s) URL or a local path.

Downloads go to a hidden `.NAME.part` beside the target and resume from where they stopped
(HTTP Range, guarded by If-Range so a changed file restarts), within a run (--retries) and
across runs. Only a complete file whose checksum matches is renamed into place (one that does
not match is deleted); then `DIR/manifest.yaml` records source, revision (and the commit it
resolved to), size, sha256 and time. Running the same fetch again finds the manifest entry and
the file, and does nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..core import console
from .config import FETCH_RETRIES
from ..core.errors import VicunaError
from ..core.store import atomic_write_text, human_size
from .report import Progress

MANIFEST = "manifest.yaml"
_BLOCK = 1 << 20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


@dataclass
class Fetched:
    path: Path
    entry: dict[str, Any]
    already: bool  # the manifest already held this exact fetch


def fetch(source: str, out_dir: Path, file: Optional[str] = None, revision: Optional[str] = None,
          sha256: Optional[str] = None, retries: int = FETCH_RETRIES, force: bool = False) -> Fetched:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VicunaError(f"-o {out_dir} is a file", hint="-o names the directory to fetch into")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise VicunaError("--sha256 must be 64 hexadecimal digits")
    expected = sha256.lower() if sha256 else None
    kind = "hf" if source.startswith("hf://") else "http" if re.match(r"https?://", source) else "local"
    if kind != "hf" and (file or revision):
        raise VicunaError("--file and --revision apply to hf:// sources only")
    name = _target_name(kind, source, file)
    target = out_dir / name
    wanted = {"source": source, "file": file, "revision": revision}
    entry = read_manifest(out_dir).get(name)
    if entry and not force and target.is_file() and target.stat().st_size == entry.get("size") \
            and all(entry.get(k) == v for k, v in wanted.items() if v is not None) \
            and (expected is None or entry.get("sha256") == expected):
        return Fetched(target, entry, already=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved_revision = None
    if kind == "hf":
        staged, resolved_revision = _fetch_hub(source, file or "", revision, out_dir)
    elif kind == "http":
        staged = _fetch_http(source, target, retries)
    else:
        staged = _copy_local(Path(source).expanduser(), target)
    digest = file_sha256(staged)
    if expected and digest != expected:
        staged.unlink()
        raise VicunaError(
            f"checksum mismatch for {name}: expected {expected}, got {digest}; the file was removed",
            hint="check the --sha256 value, or the source has changed",
        )
    os.replace(staged, target)
    entry = {"source": source, "file": file, "revision": revision}
    if resolved_revision:
        entry["commit"] = resolved_revision  # what the branch or tag pointed at
    entry |= {"size": target.stat().st_size, "sha256": digest,
              "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_manifest_entry(out_dir, name, entry)
    return Fetched(target, entry, already=False)


def _target_name(kind: str, source: str, file: Optional[str]) -> str:
    if kind == "hf":
        if not file:
            raise VicunaError("hf:// sources need --file: the path of the data file in the dataset repo",
                              hint="e.g. vicuna data fetch hf://owner/name --file data/train.json -o data/")
        return Path(file).name
    if kind == "http":
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path)).name
        if not name:
            raise VicunaError(f"cannot tell a file name from {source}", hint="give a URL that ends with the file name")
        return name
    path = Path(source).expanduser()
    if not path.is_file():
        raise VicunaError(f"{source} is not a file, a URL (http(s)://) or a Hub dataset (hf://owner/name)")
    return path.name


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}  # a damaged manifest only costs a re-fetch
    return data if isinstance(data, dict) else {}


def write_manifest_entry(out_dir: Path, name: str, entry: dict[str, Any]) -> None:
    manifest = read_manifest(out_dir)
    manifest[name] = entry
    atomic_write_text(Path(out_dir) / MANIFEST, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources


def _fetch_hub(source: str, file: str, revision: Optional[str], out_dir: Path) -> tuple[Path, str]:
    """huggingface_hub downloads (and resumes) into DIR/.hub; returns that file and the commit."""
    repo_id = source.removeprefix("hf://").removeprefix("datasets/").strip("/")
    if repo_id.count("/") != 1:
        raise VicunaError(f"{source} is not a Hub dataset id", hint="write it as hf://owner/name")
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, file, repo_type="dataset", revision=revision))
        path = Path(hf_hub_download(repo_id, file, repo_type="dataset", revision=revision, local_dir=out_dir / ".hub"))
    except Exception as exc:  # network, auth, missing repo or file: one clear line
        raise VicunaError(
            f"could not download {file} from the Hub dataset {repo_id}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}",
            hint="check the network (or HF_ENDPOINT / HF_TOKEN for gated datasets) and the --file path",
        ) from exc
    return path, meta.commit_hash


def _copy_local(source: Path, target: Path) -> Path:
    part = target.with_name(f".{target.name}.part")
    with open(source, "rb") as src, open(part, "wb") as dst, Progress(f"copy {source.name}", source.stat().st_size) as progress:
        while block := src.read(_BLOCK):
            dst.write(block)
            progress.update(dst.tell())
    return part


def _fetch_http(url: str, target: Path, retries: int) -> Path:
    """Download into `.NAME.part` (resuming what is there); returns it once complete."""
    part = target.with_name(f".{target.name}.part")
    validator = target.with_name(f".{target.name}.part.etag")
    attempt = 0
    for _ in range(retries + 3):  # a 416 on a stale part restarts once without counting as a retry
        try:
            if _http_attempt(url, part, validator):
                break
        except urllib.error.HTTPError as exc:
            raise VicunaError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except _NETWORK_ERRORS as exc:
            have = part.stat().st_size if part.exists() else 0
            attempt += 1
            if attempt > retries:
                raise VicunaError(
                    f"download of {url} interrupted at {human_size(have)} ({_reason(exc)})",
                    hint="run the same command again: it resumes from there",
                ) from None
            console.warn(f"connection lost at {human_size(have)} ({_reason(exc)}); resuming ({attempt}/{retries})")
            time.sleep(min(0.2 * 2 ** attempt, 5))
    else:
        raise VicunaError(f"download of {url} did not complete", hint="run the same command again")
    with contextlib.suppress(FileNotFoundError):
        validator.unlink()
    return part


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", "") or exc or type(exc).__name__)[:200]


def _http_attempt(url: str, part: Path, validator: Path) -> bool:
    """One request; True when `part` holds the whole file. Raises on a dropped connection."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vicuna-cli", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.is_file():
            headers["If-Range"] = validator.read_text().strip()
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left after `have`: complete if the sizes agree
            total = _total_from_range(exc.headers.get("Content-Range", ""))
            if total == have:
                return True
            part.unlink()
            return False
        raise
    with response:
        if response.status == 206 and _range_start(response.headers.get("Content-Range", "")) == have:
            mode, done = "ab", have
        else:  # a full body: the server ignored the range, or the file changed (If-Range)
            mode, done = "wb", 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if tag:
            validator.write_text(tag)
        with open(part, mode) as f, Progress(f"fetch {part.name[1:-5]}", total) as progress:
            progress.update(done)
            while block := response.read(_BLOCK):
                f.write(block)
                done += len(block)
                progress.update(done)
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)
    return True


def _range_start(header: str) -> Optional[int]:
    match = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", header)
    return int(match.group(1)) if match else None


def _total_from_range(header: str) -> Optional[int]:
    match = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", header)
    return int(match.group(1)) if match else None
