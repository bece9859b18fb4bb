"""The tinyshakespeare character dataset: finding the file, encoding it, and sampling batches.

Three parts, read top to bottom:

- :func:`resolve_dataset` finds the text: a file given with ``--data`` is taken as it is (any UTF-8 text);
  otherwise tinyshakespeare's ``input.txt`` (a folder given with ``--data``, ``$DYNDROP_DATA_DIR``, the user
  cache, or a download into that cache), whose sha256 is checked.
- :class:`CharData` turns the text into a vocabulary and three token tensors: train (the first 90 %, nanoGPT's
  ``data/shakespeare_char/prepare.py`` split), val (the first half of the last 10 %) and test (its second half).
  Everything that steers a run reads val; test is read once, at the end, to score the chosen weights.
- :class:`BatchSampler` draws random training windows, and :func:`fixed_eval_batches` draws one fixed set
  of evaluation windows. Both live entirely on the data's device: the random indices come from a
  ``torch.Generator`` on that device, so a batch never costs a host round trip.

Token tensors are int64 throughout (1.1 M characters is 9 MB; a smaller dtype would save nothing that
matters and would need a cast on every gather).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from tqdm import tqdm

from dyndrop import UserError

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV_VAR = "DYNDROP_DATA_DIR"
DATASET_SUBPATH = Path("shakespeare_char") / "input.txt"
"""Where the text lives under a data folder, the cache folder included."""

TRAIN_FRACTION = 0.9
_DOWNLOAD_CHUNK_BYTES = 1 << 16


# --------------------------------------------------------------------------------------------------
# Finding the file


def default_cache_dir() -> Path:
    """The user cache folder: ``$XDG_CACHE_HOME/dynamic-dropout``, else ``~/.cache/dynamic-dropout``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "dynamic-dropout"


def resolve_dataset(
    path: str | Path | None = None,
    *,
    url: str = DATA_URL,
    cache_dir: Path | None = None,
    download: bool = True,
    sha256: str = DATA_SHA256,
    timeout_s: float = 30.0,
) -> Path:
    """Find the dataset file, downloading it into the cache if nowhere else has it.

    Looks, in order, at: ``path``; the folder named by ``$DYNDROP_DATA_DIR``; the cache
    (``cache_dir / shakespeare_char/input.txt``); and finally downloads ``url`` into the cache.
    A ``path`` or ``$DYNDROP_DATA_DIR`` that names no file is an error rather than a reason to download,
    so a typo never silently costs a download. ``path`` naming a file is the user's own text and is returned
    as it is; every other source is tinyshakespeare, and its sha256 is checked.

    :param path: a text file of your own, or a folder holding ``shakespeare_char/input.txt`` or ``input.txt``.
    :param url: where to download from when no copy is found.
    :param cache_dir: the cache folder; defaults to :func:`default_cache_dir`.
    :param download: if False, a missing cache copy is an error instead of a download.
    :param sha256: expected hex digest of the file (the default is tinyshakespeare's).
    :param timeout_s: network timeout for connecting and for each read, in seconds.
    :raises UserError: the file is missing, fails its checksum, or cannot be downloaded.
    """
    if path is not None and str(path) != "":
        path = Path(path).expanduser()
        if path.is_file():
            return path  # the user's own text (load checks that it is text)
        _refuse_special(path, "--data")
        return _verified(_find_in(path, source="the data path"), sha256, _fix_local_copy(url))
    env_dir = os.environ.get(DATA_ENV_VAR)
    if env_dir:
        _refuse_special(Path(env_dir), f"${DATA_ENV_VAR}")
        return _verified(_find_in(Path(env_dir), source=f"${DATA_ENV_VAR}"), sha256, _fix_local_copy(url))

    cached = (cache_dir if cache_dir is not None else default_cache_dir()) / DATASET_SUBPATH
    if cached.is_file():
        return _verified(cached, sha256, f"delete {cached} and run again to download a fresh copy")
    if not download:
        raise UserError(
            f"dataset not found: no {cached}; set {DATA_ENV_VAR} to a folder holding "
            f"{DATASET_SUBPATH.as_posix()}, pass --data PATH, or allow the download"
        )
    _download(url, cached, sha256, timeout_s)
    return cached


def _refuse_special(path: Path, source: str) -> None:
    """Raise ``UserError`` for a ``path`` that is there but is no regular file or folder (a FIFO, a device, a
    socket), or a symlink that leads nowhere (broken, or a loop): "no file" would send the user looking for a typo."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"{source} {path} is a symlink to {os.readlink(path)}, which does not exist") from None
        return
    except OSError as e:  # ELOOP: a symlink loop
        raise UserError(f"{source} {path} cannot be followed: {e.strerror or e}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise UserError(f"{source} {path} is {kind}, not a text file; save the text to a file and give that")


def _find_in(path: Path, *, source: str) -> Path:
    """The dataset file that ``path`` names: the file itself or a known place inside a folder."""
    path = path.expanduser()
    candidates = [path] if not path.is_dir() else [path / DATASET_SUBPATH, path / "input.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise UserError(
        f"dataset not found: {source} points at {path}, but there is no file {looked}; "
        f"point it at a text file or a folder holding {DATASET_SUBPATH.as_posix()}"
    )


def _fix_local_copy(url: str) -> str:
    return f"point it at an unmodified copy of {url}"


def _verified(path: Path, sha256: str, fix: str) -> Path:
    got = _sha256_of(path)
    if got != sha256:
        raise UserError(f"checksum mismatch for {path}: expected sha256 {sha256}, got {got}; {fix}")
    return path


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, sha256: str, timeout_s: float) -> None:
    """Stream ``url`` into ``target``, atomically: a temp file beside it, checked, then renamed.

    Any failure (network, checksum, disk, Ctrl-C) removes the temp file, so ``target`` either holds the
    verified file or does not exist.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise UserError(
            f"cannot write the dataset cache {target.parent} ({e}); set XDG_CACHE_HOME to a writable "
            f"folder, set {DATA_ENV_VAR}, or pass --data PATH"
        ) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _stream_to(url, out, target, timeout_s)
            out.flush()
            os.fsync(out.fileno())
        if got != sha256:
            raise UserError(
                f"checksum mismatch for the download of {url}: expected sha256 {sha256}, got {got}; "
                f"nothing was saved. Check the URL, or download the file yourself to {target}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache file is fine to share
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write the dataset cache {target} ({e}); free some space, set {DATA_ENV_VAR}, "
            "or pass --data PATH"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream_to(url: str, out, target: Path, timeout_s: float) -> str:
    """Copy ``url``'s body into ``out`` with a progress bar; returns its sha256 hex digest.

    Only reading from the network is guarded here, so a disk error still reads as a disk error.
    """
    network_errors = (urllib.error.URLError, http.client.HTTPException, OSError)
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except network_errors as e:
        raise _download_failed(url, target, e) from e
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
            while True:
                try:
                    chunk = response.read(_DOWNLOAD_CHUNK_BYTES)
                except network_errors as e:
                    raise _download_failed(url, target, e) from e
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _download_failed(url: str, target: Path, error: BaseException) -> UserError:
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    else:
        reason = getattr(error, "reason", None) or error
    return UserError(
        f"could not download the dataset from {url} ({reason}); set {DATA_ENV_VAR} to a folder holding "
        f"{DATASET_SUBPATH.as_posix()}, pass --data PATH, or download {url} yourself to {target}"
    )


# --------------------------------------------------------------------------------------------------
# Encoding


def read_text_file(path: Path) -> tuple[str, bytes]:
    """The text of ``path`` and its bytes. Raises ``UserError`` for an empty, binary or non-UTF-8 file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the dataset {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise UserError(f"dataset {path} is empty; give a text file with at least a few thousand characters")
    if b"\0" in raw:
        raise UserError(f"dataset {path} is a binary file (it holds NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as e:
        raise UserError(f"dataset {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


class CharData:
    """A character-level corpus: its vocabulary, and its tokens split into train, val and test.

    - ``train``: the first 90 % (nanoGPT's training split, to the character).
    - ``val``: the first half of the last 10 %. Everything that steers a run reads it: the controllers' signals,
      the choice of the best weights, PBT's exploits, presets and tuning.
    - ``test``: the second half of the last 10 %. Nothing reads it until the end of a run, which scores the
      chosen weights on it once (``test_loss``).
    - ``heldout``: the whole last 10 %, nanoGPT's own validation split; only the checks that compare a figure
      with nanoGPT's use it (the split sizes in tests/test_data.py).

    The vocabulary is every character of the text, as nanoGPT builds it: the only thing the test split shares with
    training (a test text over the same characters leaves every step of a run unchanged, tests/test_data.py).

    :param text: the whole corpus.
    :param device: where ``train`` and ``val`` live.
    :param source: the file the text came from, if any (for run records).
    :param sha256: the file's sha256 (of its bytes), if any; ``DATA_SHA256`` means tinyshakespeare.
    """

    def __init__(self, text: str, device: str | torch.device = "cpu", source: Path | None = None,
                 sha256: str | None = None):
        if len(text) < 2:
            raise UserError(f"dataset {source or '(text)'} has {len(text)} characters; it needs at least 2")
        if len(set(text)) < 2:  # every loss would be exactly 0, and every ratio of losses 0/0
            raise UserError(f"dataset {source or '(text)'} repeats one character ({text[0]!r}): there is nothing "
                            "to predict; give a text of at least two distinct characters")
        self.source, self.sha256 = source, sha256
        self.n_chars = len(text)
        self.chars: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.chars)}
        self.itos: dict[int, str] = dict(enumerate(self.chars))
        tokens = torch.tensor(self.encode(text), dtype=torch.long, device=device)
        n_train = int(len(tokens) * TRAIN_FRACTION)  # nanoGPT's split, to the character
        n_val = (len(tokens) - n_train) // 2
        self.train: torch.Tensor = tokens[:n_train]
        self.heldout: torch.Tensor = tokens[n_train:]
        self.val: torch.Tensor = tokens[n_train:n_train + n_val]
        self.test: torch.Tensor = tokens[n_train + n_val:]

    @classmethod
    def from_text(cls, text: str, device: str | torch.device = "cpu") -> CharData:
        return cls(text, device)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> CharData:
        """Read the dataset found by :func:`resolve_dataset` (downloading it if need be)."""
        file = resolve_dataset(path)
        text, raw = read_text_file(file)
        return cls(text, device, source=file, sha256=hashlib.sha256(raw).hexdigest())

    def record(self) -> dict[str, Any]:
        """What a run records about its data (summary.json, checkpoints): where it came from, its sha256,
        size and vocabulary, and whether it is tinyshakespeare."""
        return {"source": str(self.source) if self.source else None, "sha256": self.sha256,
                "chars": self.n_chars, "vocab_size": self.vocab_size,
                "split_chars": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "dataset": "tinyshakespeare" if self.sha256 == DATA_SHA256 else "own text"}

    def train_split(self, n_chars: int = 0) -> torch.Tensor:
        """The first ``n_chars`` tokens of the training split (all of it for 0). Raises ``UserError`` if
        ``n_chars`` is larger than the split."""
        if n_chars > len(self.train):
            raise UserError(f"--train-chars {n_chars} is larger than the training split "
                            f"({len(self.train)} characters); use at most {len(self.train)}, or 0 for all of it")
        return self.train[:n_chars] if n_chars else self.train

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            unknown = "".join(sorted(set(text) - self.stoi.keys()))
            raise UserError(
                f"text has characters outside the vocabulary: {unknown!r}; use only characters of the dataset"
            ) from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.itos[i] for i in ids)


_SHARED: dict[tuple[str, str], CharData] = {}


def shared_data(path: str | Path | None = None, device: str | torch.device = "cpu") -> CharData:
    """The dataset on ``device``, read once per process: every trainer, env and trial in it shares it (read
    again if the file has changed since)."""
    file = resolve_dataset(path)
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, str(torch.device(device)))
    if key not in _SHARED:
        _SHARED[key] = CharData.load(file, device=device)
    return _SHARED[key]


# --------------------------------------------------------------------------------------------------
# Batches


def _check_window(data: torch.Tensor, block_size: int, batch_size: int) -> None:
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D tokens, got shape {tuple(data.shape)}")
    if block_size < 1 or batch_size < 1:
        raise UserError(f"block_size ({block_size}) and batch_size ({batch_size}) must be at least 1")
    if len(data) <= block_size:
        raise UserError(
            f"block_size {block_size} needs more than {block_size} tokens, but the split has {len(data)}; "
            "use a smaller block_size"
        )


def _windows(
    data: torch.Tensor, block_size: int, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size + 1`` tokens, gathered in one op; returns inputs and next tokens."""
    ix = torch.randint(len(data) - block_size, shape, generator=generator, device=data.device)
    offsets = torch.arange(block_size + 1, device=data.device)
    window = data[ix.unsqueeze(-1) + offsets]  # (*shape, T + 1)
    # contiguous copies, so callers may .view() them (nanoGPT's loss does)
    return window[..., :-1].contiguous(), window[..., 1:].contiguous()


class BatchSampler:
    """Random contiguous windows of ``data``, as nanoGPT's ``get_batch``, drawn on ``data.device``.

    The indices come from a ``torch.Generator`` on that device, so no batch touches the host, and the
    generator's state is the sampler's whole state: :meth:`state_dict` / :meth:`load_state_dict` make a
    resumed run see exactly the batches the uninterrupted run would have.

    :param data: 1-D int64 tokens (e.g. ``CharData.train``).
    :param block_size: tokens per sequence, T.
    :param batch_size: sequences per batch, B.
    :param seed: seeds the generator.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int):
        _check_window(data, block_size, batch_size)
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator(device=data.device)
        self.generator.manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``x`` and ``y``, each int64 of shape (B, T); ``y[:, t]`` is the token after ``x[:, t]``."""
        return _windows(self.data, self.block_size, (self.batch_size,), self.generator)

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, torch.Tensor | str]:
        """The generator state (a CPU ByteTensor) and the device type it belongs to."""
        return {"generator": self.generator.get_state(), "device_type": self.data.device.type}

    def load_state_dict(self, state: dict) -> None:
        saved_type = state.get("device_type", self.data.device.type)
        if saved_type != self.data.device.type:
            raise UserError(
                f"the checkpoint's batch sampler ran on {saved_type}, but this run's data is on "
                f"{self.data.device.type}; resume on a {saved_type} device to get the same batches"
            )
        # a checkpoint loaded with map_location may have moved the state off the CPU
        self.generator.set_state(state["generator"].cpu())


class EvalBatches(NamedTuple):
    """A fixed evaluation set: ``x`` and ``y`` of shape (n_batches, B, T), int64, on the data's device."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def n_batches(self) -> int:
        return self.x.shape[0]


def fixed_eval_batches(
    data: torch.Tensor, block_size: int, batch_size: int, n_batches: int, seed: int
) -> EvalBatches:
    """Draw ``n_batches`` batches once, so every evaluation with the same ``seed`` scores the same tokens.

    The generator's seed is derived from ``seed`` (not ``seed`` itself), so a training
    :class:`BatchSampler` given the same seed draws a different stream; a fixed training-loss set is
    not simply the first batches trained on.
    """
    _check_window(data, block_size, batch_size)
    if n_batches < 1:
        raise UserError(f"the number of evaluation batches ({n_batches}) must be at least 1")
    generator = torch.Generator(device=data.device)
    generator.manual_seed(_eval_seed(seed))
    return EvalBatches(*_windows(data, block_size, (n_batches, batch_size), generator))


def _eval_seed(seed: int) -> int:
    digest = hashlib.sha256(f"dynamic-dropout eval batches {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
