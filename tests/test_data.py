"""Tests for gpt/data.py: finding and downloading the dataset, encoding it, and sampling batches.

Downloads go to a local HTTP server on 127.0.0.1 serving small fake files; nothing leaves the machine.
Every test that could touch the user cache passes a temporary ``cache_dir`` instead.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from dyndrop import UserError
from gpt.data import (
    DATA_ENV_VAR,
    DATASET_SUBPATH,
    BatchSampler,
    CharData,
    default_cache_dir,
    fixed_eval_batches,
    resolve_dataset,
)

SHARED_DATA_DIR = Path(os.environ.get(DATA_ENV_VAR) or Path(__file__).resolve().parents[2] / "shared" / "data")
FAKE_TEXT = b"To be, or not to be: that is the question.\n" * 50
FAKE_SHA256 = hashlib.sha256(FAKE_TEXT).hexdigest()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    """Tests start without $DYNDROP_DATA_DIR; those that want it set it themselves."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def write_dataset(folder: Path, content: bytes = FAKE_TEXT) -> Path:
    file = folder / DATASET_SUBPATH
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    return file


# --------------------------------------------------------------------------------------------------
# The real dataset


@pytest.fixture(scope="module")
def shakespeare() -> CharData:
    if not (SHARED_DATA_DIR / DATASET_SUBPATH).is_file():
        pytest.skip(f"no shared dataset at {SHARED_DATA_DIR / DATASET_SUBPATH}")
    return CharData.load(SHARED_DATA_DIR)


def test_shared_copy_loads_via_env_var(shakespeare, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV_VAR, str(SHARED_DATA_DIR))
    found = resolve_dataset(cache_dir=tmp_path, download=False)
    assert found.resolve() == (SHARED_DATA_DIR / DATASET_SUBPATH).resolve()
    assert files_under(tmp_path) == []


def test_shakespeare_vocab_and_nanogpt_split(shakespeare):
    assert shakespeare.vocab_size == 65
    assert len(shakespeare.train) == 1003854
    assert len(shakespeare.heldout) == 111540  # nanoGPT's validation split, used only for checks like this one
    assert len(shakespeare.val) == len(shakespeare.test) == 55770  # its halves: val steers, test scores at the end
    assert torch.equal(torch.cat([shakespeare.val, shakespeare.test]), shakespeare.heldout)
    assert shakespeare.train.dtype == torch.long and shakespeare.train.device.type == "cpu"
    assert shakespeare.itos[0] == "\n" and shakespeare.stoi["a"] == 39  # nanoGPT's meta.pkl


def test_encode_decode_round_trip(shakespeare):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = shakespeare.encode(text)
    assert all(0 <= i < shakespeare.vocab_size for i in ids)
    assert shakespeare.decode(ids) == text
    assert shakespeare.decode(torch.tensor(ids)) == text
    assert shakespeare.decode(shakespeare.val[:500]) == shakespeare.decode(shakespeare.val[:500].tolist())


def test_encode_unknown_character_is_user_error():
    data = CharData.from_text("abcabc")
    with pytest.raises(UserError, match="'z'"):
        data.encode("abz")


# --------------------------------------------------------------------------------------------------
# Resolution order


def test_explicit_path_beats_env_var_beats_cache(tmp_path, monkeypatch):
    explicit, env, cache = (write_dataset(tmp_path / name) for name in ("explicit", "env", "cache"))
    find = lambda path=None: resolve_dataset(path, cache_dir=tmp_path / "cache", sha256=FAKE_SHA256)

    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    assert find(tmp_path / "explicit") == explicit
    assert find(explicit) == explicit  # the file itself
    assert find() == env
    monkeypatch.delenv(DATA_ENV_VAR)
    assert find() == cache


def test_explicit_folder_may_hold_input_txt_directly(tmp_path):
    (tmp_path / "input.txt").write_bytes(FAKE_TEXT)
    assert resolve_dataset(tmp_path, cache_dir=tmp_path / "c", sha256=FAKE_SHA256) == tmp_path / "input.txt"


def test_missing_explicit_path_is_user_error_not_download(tmp_path, monkeypatch):
    write_dataset(tmp_path / "env")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(UserError, match="not found"):
        resolve_dataset(tmp_path / "nope.txt", url="http://127.0.0.1:9/never", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_env_var_without_dataset_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(UserError, match=DATA_ENV_VAR):
        resolve_dataset(url="http://127.0.0.1:9/never", cache_dir=tmp_path / "c")


def test_checksum_checked_for_local_files(tmp_path):
    write_dataset(tmp_path / "explicit", b"not shakespeare")
    with pytest.raises(UserError, match=f"checksum mismatch.*expected sha256 {FAKE_SHA256}"):
        resolve_dataset(tmp_path / "explicit", sha256=FAKE_SHA256)

    cached = write_dataset(tmp_path / "cache", b"truncated")
    with pytest.raises(UserError, match=f"checksum mismatch for {cached}.*delete"):
        resolve_dataset(cache_dir=tmp_path / "cache", sha256=FAKE_SHA256)


def test_no_download_when_disallowed(tmp_path):
    with pytest.raises(UserError, match="--data PATH"):
        resolve_dataset(cache_dir=tmp_path, download=False, sha256=FAKE_SHA256)


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dynamic-dropout"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "dynamic-dropout"


# --------------------------------------------------------------------------------------------------
# Download, from a server on loopback


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves ``tmp_path / "www"`` on 127.0.0.1; yields (base url, list of requested paths)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    (www / "good.txt").write_bytes(FAKE_TEXT)
    (www / "corrupt.txt").write_bytes(FAKE_TEXT[:-1] + b"!")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(www))

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep test output quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_into_empty_cache_then_reuse(server, tmp_path):
    base, requests = server
    cache = tmp_path / "cache"
    got = resolve_dataset(url=f"{base}/good.txt", cache_dir=cache, sha256=FAKE_SHA256)
    assert got == cache / DATASET_SUBPATH
    assert got.read_bytes() == FAKE_TEXT
    assert files_under(cache) == [got]  # no temp file left beside it
    assert requests == ["/good.txt"]

    assert resolve_dataset(url=f"{base}/good.txt", cache_dir=cache, sha256=FAKE_SHA256) == got
    assert requests == ["/good.txt"]  # served from the cache


def test_corrupt_download_leaves_nothing(server, tmp_path):
    base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"checksum mismatch.*expected sha256 {FAKE_SHA256}"):
        resolve_dataset(url=f"{base}/corrupt.txt", cache_dir=cache, sha256=FAKE_SHA256)
    assert files_under(cache) == []


def test_missing_url_is_user_error(server, tmp_path):
    base, _ = server
    with pytest.raises(UserError, match="could not download.*404"):
        resolve_dataset(url=f"{base}/absent.txt", cache_dir=tmp_path / "cache", sha256=FAKE_SHA256)
    assert files_under(tmp_path / "cache") == []


def test_unreachable_server_is_user_error_with_fix(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/input.txt"
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as caught:
        resolve_dataset(url=url, cache_dir=cache, sha256=FAKE_SHA256, timeout_s=5)
    message = str(caught.value)
    assert DATA_ENV_VAR in message and "--data PATH" in message
    assert str(cache / DATASET_SUBPATH) in message
    assert files_under(cache) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    import gpt.data

    def half_then_interrupt(url, out, target, timeout_s):
        out.write(FAKE_TEXT[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt.data, "_stream_to", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        resolve_dataset(url="http://127.0.0.1:9/never", cache_dir=tmp_path, sha256=FAKE_SHA256)
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Batches


def counting_data(device: str, n: int = 1000) -> torch.Tensor:
    """Token i is i, so a window's tokens say where it came from."""
    return torch.arange(n, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_windows_with_shifted_targets(device):
    sampler = BatchSampler(counting_data(device), block_size=16, batch_size=8, seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert x.device.type == y.device.type == device
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.long, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batches_different_seed_differs(device):
    data = counting_data(device)
    batches = lambda seed: [x for x, _ in _take(BatchSampler(data, 16, 8, seed), 3)]
    for a, b in zip(batches(1), batches(1)):
        assert torch.equal(a, b)
    assert not torch.equal(torch.stack(batches(1)), torch.stack(batches(2)))


def _take(sampler: BatchSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next() for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_resumes_identically(device):
    data = counting_data(device)
    sampler = BatchSampler(data, 16, 8, seed=3)
    _take(sampler, 5)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)  # as a checkpoint would
    expected = _take(sampler, 4)

    resumed = BatchSampler(data, 16, 8, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, map_location=device))
    for (x, y), (rx, ry) in zip(expected, _take(resumed, 4)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_state_from_another_device_type_is_user_error():
    sampler = BatchSampler(counting_data("cpu"), 16, 8, seed=0)
    with pytest.raises(UserError, match="resume on a cuda device"):
        sampler.load_state_dict({"generator": torch.zeros(16, dtype=torch.uint8), "device_type": "cuda"})


def test_block_size_too_large_is_user_error():
    with pytest.raises(UserError, match="smaller block_size"):
        BatchSampler(counting_data("cpu", 10), block_size=10, batch_size=2, seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_batches_fixed_per_seed_and_apart_from_training(device):
    data = counting_data(device)
    first = fixed_eval_batches(data, block_size=16, batch_size=8, n_batches=5, seed=7)
    again = fixed_eval_batches(data, block_size=16, batch_size=8, n_batches=5, seed=7)
    other = fixed_eval_batches(data, block_size=16, batch_size=8, n_batches=5, seed=8)
    assert first.x.shape == first.y.shape == (5, 8, 16) and first.n_batches == 5
    assert first.x.device.type == device
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert torch.equal(first.y, first.x + 1)
    assert not torch.equal(first.x, other.x)
    train_first = BatchSampler(data, 16, 8, seed=7).next()[0]
    assert not torch.equal(first.x[0], train_first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_never_syncs_with_host():
    data = counting_data("cuda")
    sampler = BatchSampler(data, 16, 8, seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _take(sampler, 3)
        fixed_eval_batches(data, 16, 8, 2, seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")



def test_train_chars_limits_training_and_keeps_the_standard_validation(shakespeare):
    """--train-chars N: the sampler and the training evaluation batches draw only from the first N characters
    of the training split; validation is the file's last 10 % whatever N is."""
    import dataclasses

    from gpt import Trainer, make_config

    cfg = make_config("tiny", train_chars=500, max_iters=0, wandb="disabled", progress=False, checkpoint=False)
    trainer = Trainer(cfg, data=shakespeare)
    assert trainer.sampler.data.data_ptr() == shakespeare.train.data_ptr() and len(trainer.sampler.data) == 500
    x, y = trainer.eval_batches["train"]
    train_text = shakespeare.train[:500]
    windows = {tuple(train_text[i:i + cfg.block_size].tolist()) for i in range(500 - cfg.block_size)}
    assert all(tuple(row.tolist()) in windows for row in x.flatten(0, 1))
    full = Trainer(dataclasses.replace(cfg, train_chars=0), data=shakespeare)
    assert torch.equal(trainer.eval_batches["val"].x, full.eval_batches["val"].x)


@pytest.mark.parametrize("n, words", [(-1, "at least 0"), (32, "more than --block-size"), (10**7, "larger than the training split")])
def test_bad_train_chars_is_a_user_error(shakespeare, n, words):
    from gpt import Trainer, make_config

    with pytest.raises(UserError, match=words):
        Trainer(make_config("tiny", train_chars=n, wandb="disabled"), data=shakespeare)


# --------------------------------------------------------------------------------------------------
# Your own text


def own_text(path: Path, n: int = 6000) -> Path:
    path.write_text("".join("the quick brown fox jumps over the lazy dog. "[(i * 7) % 45] for i in range(n)))
    return path


def test_any_utf8_text_file_trains_and_is_recorded(tmp_path):
    from runs.train import cli

    text = own_text(tmp_path / "mine.txt")
    out = tmp_path / "run"
    assert cli(["--data", str(text), "--preset", "tiny", "--max-iters", "4", "--eval-interval", "2", "--eval-iters",
                "1", "--gen-tokens", "4", "--no-progress", "--wandb", "disabled", "--out", str(out)]) == 0
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["dataset"] == "own text" and data["chars"] == 6000 and data["vocab_size"] == len(set(text.read_text()))
    assert data["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["data"] == data


@pytest.mark.parametrize("content, words", [(b"", "empty"), (b"  \n", "empty"), (b"abc\0def" * 500, "binary"),
                                            (b"\xff\xfe\x00a" * 10, "binary"), (b"caf\xe9 " * 1000, "UTF-8"),
                                            (b"just a few words here", "characters of val text")])
def test_bad_text_files_are_one_line(tmp_path, capsys, content, words):
    from runs.train import cli

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    out = tmp_path / "run"
    assert cli(["--data", str(bad), "--preset", "tiny", "--no-progress", "--wandb", "disabled", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not out.exists()


def test_resume_refuses_a_changed_text(tmp_path, capsys):
    from runs.train import cli

    text = own_text(tmp_path / "mine.txt")
    args = ["--data", str(text), "--preset", "tiny", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--gen-tokens", "0", "--no-progress", "--wandb", "disabled", "--out", str(tmp_path / "run")]
    assert cli(args) == 0
    own_text(text, n=6001)
    assert cli([*args, "--resume", "--max-iters", "6"]) == 2
    assert "different now" in capsys.readouterr().err
