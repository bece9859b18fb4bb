"""The file format of a trained dropout policy: plain tensors and JSON, nothing that runs code when read.

A policy is two files side by side:

- ``<name>.safetensors`` — the weights of stable-baselines3's ``ActorCriticPolicy`` (its ``state_dict``, all
  float32), in the safetensors format: a JSON header of names, dtypes and shapes, then raw bytes.
- ``<name>.json`` — what the env used and how to rebuild the network: ``format``, ``feature_version``,
  ``p_min``/``p_max``, ``per_layer``, ``n_layer``, ``network`` (``obs_dim``, ``n_actions``, ``net_arch``,
  ``activation``, ``log_std_init``), ``weights_sha256`` (the .safetensors file it belongs to), and the
  training details (preset, episode, reward, seeds, library versions).

:func:`load_policy` checks the metadata, the weights' checksum and every tensor's name, dtype and shape
against the network the metadata describes before it reads a single weight, then builds that network from
code and loads the weights into it. stable-baselines3's own ``.zip`` is not accepted: loading it unpickles
objects, which can run arbitrary code. ``python -m runs.convert_policy`` converts a ``.zip`` you trust.

torch, safetensors and stable-baselines3 are imported only when a policy is saved or loaded.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from dyndrop import UserError, read_json, write_json

from .features import FEATURE_VERSION, Featurizer, check_bounds

POLICY_FORMAT = "dyndrop-ppo-policy-v1"
SUFFIX = ".safetensors"
ACTIVATIONS = ("tanh", "relu")


def metadata_path(policy: str | Path) -> Path:
    """Where a policy's metadata lives: ``policy.safetensors`` -> ``policy.json``."""
    return Path(policy).with_suffix(".json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build_network(network: dict[str, Any]) -> Any:
    """The stable-baselines3 ``ActorCriticPolicy`` that ``network`` describes, with fresh weights."""
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3.common.policies import ActorCriticPolicy

    obs_space = gym.spaces.Box(Featurizer.low, Featurizer.high, dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (network["n_actions"],), dtype=np.float32)
    activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[network["activation"]]
    return ActorCriticPolicy(obs_space, action_space, lambda _: 0.0, net_arch=network["net_arch"],
                             activation_fn=activation, log_std_init=network["log_std_init"])


def network_description(policy: Any) -> dict[str, Any]:
    """The ``network`` metadata of an sb3 ``ActorCriticPolicy`` (what :func:`_build_network` rebuilds)."""
    import torch

    activation = {torch.nn.Tanh: "tanh", torch.nn.ReLU: "relu"}.get(policy.activation_fn)
    arch = policy.net_arch
    net_arch = ([int(n) for n in arch] if isinstance(arch, list)
                else {k: [int(n) for n in arch[k]] for k in ("pi", "vf")} if isinstance(arch, dict) else None)
    if activation is None or net_arch is None:
        raise UserError(f"this policy's network ({policy.activation_fn.__name__}, net_arch {arch}) cannot be "
                        "saved in the policy format; use tanh or relu and a list or a pi/vf dict of widths")
    return {"obs_dim": int(policy.observation_space.shape[0]), "n_actions": int(policy.action_space.shape[0]),
            "net_arch": net_arch, "activation": activation, "log_std_init": float(policy.log_std_init)}


def save_policy(policy: Any, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write an sb3 ``ActorCriticPolicy``'s weights to ``<path>.safetensors`` and ``meta`` (plus the format,
    the network description and the weights' checksum) to ``<path>.json``, each atomically. Returns the
    weights' path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype=v.dtype).contiguous() for k, v in policy.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": POLICY_FORMAT})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(metadata_path(path), {**meta, "format": POLICY_FORMAT, "feature_version": FEATURE_VERSION,
                                     "network": network_description(policy), "weights_sha256": sha256_of(path)})
    return path


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise UserError(f"policy metadata {path} is invalid: {what}; save the policy again with runs.train_policy")


def read_metadata(policy: str | Path) -> dict[str, Any]:
    """The policy's metadata, checked against this code, before anything of the weights is read.

    :raises UserError: one line: a ``.zip`` or other non-policy file, missing or malformed metadata, another
        feature version, bad bounds, or a network description this code cannot build.
    """
    policy = Path(policy)
    if policy.suffix == ".zip":
        raise UserError(f"policy {policy} is a stable-baselines3 .zip, which loads by unpickling (it can run "
                        f"code); if you trust the file, convert it once with python -m runs.convert_policy {policy} "
                        "--trust, or retrain with python -m runs.train_policy")
    if policy.suffix != SUFFIX:
        raise UserError(f"policy {policy} is not a {SUFFIX} file saved by python -m runs.train_policy")
    if not policy.is_file():
        raise UserError(f"policy {policy} does not exist; train one with python -m runs.train_policy")
    path = metadata_path(policy)
    if not path.is_file():
        raise UserError(f"policy {policy} has no metadata file {path}; it was not saved by runs.train_policy")
    meta = read_json(path, "policy metadata")
    _require(meta.get("format") == POLICY_FORMAT, path, f"format {meta.get('format')!r} is not {POLICY_FORMAT!r}")
    version = meta.get("feature_version")
    if version != FEATURE_VERSION:
        raise UserError(f"policy {policy} was trained on features {version!r}, but this code computes "
                        f"{FEATURE_VERSION!r}; retrain it with python -m runs.train_policy")
    missing = [k for k in ("p_min", "p_max") if k not in meta]
    _require(not missing, path, f"it has no {' and no '.join(missing)} (the action's rate range)")
    try:
        check_bounds(float(meta["p_min"]), float(meta["p_max"]))
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"policy metadata {path} has bad action bounds: {e}") from None
    net = meta.get("network")
    _require(isinstance(net, dict), path, "no 'network' description")
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536  # noqa: E731
    _require(net.get("obs_dim") == Featurizer.dim, path, f"obs_dim {net.get('obs_dim')} is not {Featurizer.dim}")
    _require(ints(net.get("n_actions")), path, "n_actions is not a positive integer")
    widths = lambda v: isinstance(v, list) and len(v) <= 16 and all(ints(n) for n in v)  # noqa: E731
    arch = net.get("net_arch")
    _require(widths(arch) or (isinstance(arch, dict) and set(arch) == {"pi", "vf"} and all(map(widths, arch.values()))),
             path, "net_arch is not a list of layer widths or a dict of pi and vf widths")
    _require(net.get("activation") in ACTIVATIONS, path, f"activation is not one of {ACTIVATIONS}")
    log_std = net.get("log_std_init")
    _require(isinstance(log_std, (int, float)) and not isinstance(log_std, bool) and abs(log_std) <= 20, path,
             "log_std_init is not a number in [-20, 20]")
    per_layer = meta.get("per_layer")
    _require(isinstance(per_layer, bool), path, "per_layer is not true or false")
    if per_layer:
        _require(ints(meta.get("n_layer")), path, "per_layer is set but n_layer is missing or not a positive integer")
    _require(net["n_actions"] == (meta["n_layer"] if per_layer else 1), path,
             f"{net['n_actions']} actions, which per_layer={per_layer} does not explain")
    _require(isinstance(meta.get("weights_sha256"), str), path, "no weights_sha256")
    return meta


def parameter_count(network: dict[str, Any]) -> int:
    """How many numbers the network that ``network`` (the metadata's description) builds holds, computed without
    building it: the policy and value MLPs, the action and value heads, and ``log_std``."""
    arch = network["net_arch"]
    pi, vf = (arch["pi"], arch["vf"]) if isinstance(arch, dict) else (arch, arch)

    def mlp(widths: list[int], out: int) -> int:
        sizes = [network["obs_dim"], *widths]
        return sum((a + 1) * b for a, b in zip(sizes, sizes[1:])) + (sizes[-1] + 1) * out

    return mlp(pi, network["n_actions"]) + mlp(vf, 1) + network["n_actions"]


def load_policy(policy: str | Path) -> tuple[Any, dict[str, Any]]:
    """The policy network (sb3 ``ActorCriticPolicy``, eval mode, CPU) and its metadata.

    Order of checks: the metadata (:func:`read_metadata`), the weights file's sha256 against it, the
    safetensors header's size against the network the metadata describes (:func:`parameter_count`: a network
    is built only once the file holds its numbers), then every tensor's name, dtype and shape against the built
    network; only then are the weights read, and they must be finite. Raises ``UserError`` (one line) at the first
    that fails.
    """
    meta = read_metadata(policy)
    policy = Path(policy)
    if sha256_of(policy) != meta["weights_sha256"]:
        raise UserError(f"policy {policy} does not match its metadata {metadata_path(policy)} (another weights "
                        "file); save the policy again with runs.train_policy")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(policy), framework="pt") as f:
            got = {k: (tuple(f.get_slice(k).get_shape()), _dtype_name(f.get_slice(k).get_dtype())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"policy {policy} is not a readable safetensors file ({e})") from None
    held, described = sum(math.prod(shape) for shape, _ in got.values()), parameter_count(meta["network"])
    if held != described:
        raise UserError(f"policy {policy} does not hold the network its metadata describes (it holds {held} numbers, "
                        f"that network {described}); save the policy again with runs.train_policy")
    network = _build_network(meta["network"])
    want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in network.state_dict().items()}
    if got != want:
        wrong = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
        raise UserError(f"policy {policy} does not hold the network its metadata describes "
                        f"(differs at: {', '.join(wrong[:3])})")
    weights = load_file(str(policy))
    broken = sorted(k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all())
    if broken:
        raise UserError(f"policy {policy} has weights that are NaN or infinite (in {', '.join(broken[:3])}); it "
                        "cannot act: retrain it with python -m runs.train_policy")
    network.load_state_dict(weights, strict=True)
    return network.eval(), meta


def _dtype_name(code: str) -> str:
    """safetensors' dtype codes (``F32``) as torch names (``float32``)."""
    return {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
            "I32": "int32", "BOOL": "bool", "U8": "uint8"}.get(code, code)
