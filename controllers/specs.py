"""Controller specs: the strings users type, and the controllers they build.

One grammar, used by every entry point:

- ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` is one controller (:func:`make_controller`), e.g.
  ``pid:kp=2,setpoint=0.1`` or ``ppo:policy=policies/ppo/policy.safetensors``;
- a list of them, comma-separated, where ``NAME@V1,V2`` sweeps the controller's first parameter and
  ``NAME:FIXED@KEY=V1,V2`` another one (:func:`parse_controllers`): ``constant@0,0.1,linear`` is
  ``constant:rate=0``, ``constant:rate=0.1`` and ``linear``.

A spec is carried as this one string from the command line to the trainer, the checkpoint and the
comparison's folders; ``--policy PATH`` is only a shorthand that :func:`with_policy` folds into it.
"""
from __future__ import annotations

import hashlib
import inspect
import re
from typing import Any, Iterable, Sequence

from dyndrop import UserError

from .base import CONTROLLERS, Controller

_NAME = re.compile(r"^([A-Za-z_]\w*)(?=$|[:@])")


def spec_name(spec: str) -> str:
    """The controller name of ``spec``: ``pid:kp=2`` -> ``pid``."""
    return spec.strip().partition(":")[0].strip()


def spec_params(spec: str) -> dict[str, str]:
    """The ``key=value`` pairs of ``spec`` as text, in order (keys with ``-`` read as ``_``).

    :raises UserError: an item without ``=``, or a key given twice (which one would count is a guess).
    """
    name, _, arg_text = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in arg_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"controller {name.strip()!r}: bad parameter {item!r}; expected key=value")
        key = key.strip().replace("-", "_")
        if key in params:
            raise UserError(f"controller {name.strip()!r}: parameter {key} is given twice ({key}={params[key]} and "
                            f"{key}={value.strip()}); give it once")
        params[key] = value.strip()
    return params


def _number_text(value: int | float) -> str:
    """The one way a number is written in a spec: Python's shortest round-trip form, without a trailing ``.0``
    (``0.10`` -> ``0.1``, ``+2.0`` -> ``2``, ``1e-3`` -> ``0.001``)."""
    text = repr(value + 0 if isinstance(value, int) else value + 0.0)  # + 0.0: -0.0 is 0
    return text[:-2] if text.endswith(".0") else text


def canonical_spec(spec: str) -> str:
    """``spec`` written the one way its controller is: the name, then each ``key=value`` in the order given, every
    number in :func:`_number_text` form. Two specs that build the same controller this way are one table row and
    one trial folder (``constant:rate=0.1`` and ``constant:rate=+0.10``). Names that are not controllers (a
    comparison's ``pbt`` row) come back as given.

    :raises UserError: a value that is not of its parameter's type, or a key given twice.
    """
    name = spec_name(spec)
    if name not in CONTROLLERS:
        return spec.strip()
    hints = {k: p.annotation for k, p in inspect.signature(CONTROLLERS[name].__init__).parameters.items()
             if k != "self"}
    items = []
    for key, text in spec_params(spec).items():
        value = _parse_value(text, hints[key], key, name) if key in hints else text
        items.append(f"{key}={_number_text(value) if isinstance(value, (int, float)) else text}")
    return f"{name}:{','.join(items)}" if items else name


def _parse_value(text: str, annotation: Any, key: str, name: str) -> Any:
    kind = annotation if isinstance(annotation, type) else str(annotation)
    if isinstance(kind, str) and "|" in kind:  # "float | None": a value given is a float
        kind = next(k.strip() for k in kind.split("|") if k.strip() != "None")
    kind_name = getattr(kind, "__name__", kind)  # "float", not "<class 'float'>"
    try:
        if kind in (float, "float"):
            return float(text)
        if kind in (int, "int"):
            return int(text)
        if kind in (bool, "bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise UserError(f"controller {name!r}: parameter {key}={text!r} is not a valid {kind_name}") from None
    return text


def controller_class(name: str) -> type[Controller]:
    """The registered class called ``name``. Raises ``UserError`` for an unknown name."""
    if name not in CONTROLLERS:
        raise UserError(f"unknown controller {name!r}; choose one of: {', '.join(sorted(CONTROLLERS))}")
    return CONTROLLERS[name]


def make_controller(spec: str, **overrides: Any) -> Controller:
    """Build a controller from ``"name"`` or ``"name:key=value,key=value"``.

    Values are converted with the constructor's type hints. ``overrides`` (already typed) win over the spec.
    Raises ``UserError`` for an unknown name or parameter, or a value the controller rejects.
    """
    name = spec_name(spec)
    cls = controller_class(name)
    hints = {k: p.annotation for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    kwargs: dict[str, Any] = {}
    for key, value in spec_params(spec).items():
        if key not in hints:
            valid = ", ".join(hints) or "none"
            raise UserError(f"controller {name!r}: bad parameter '{key}={value}'; expected key=value with key in: {valid}")
        kwargs[key] = _parse_value(value, hints[key], key, name)
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"controller {name!r}: {e}") from None


def with_policy(spec: str, policy: str | None) -> str:
    """``spec`` with ``policy=PATH`` added when it is a ``ppo`` spec without one: what ``--policy PATH``
    means on every command line. Other specs, and a ``None`` policy, come back unchanged.

    :raises UserError: the spec already names another policy, or the path contains a comma.
    """
    if policy is None or spec_name(spec) != "ppo":
        return spec
    given = spec_params(spec).get("policy")
    if given is not None:
        if given != policy:
            raise UserError(f"{spec!r} names policy {given}, and --policy names {policy}; give one of them")
        return spec
    if "," in policy:
        raise UserError(f"--policy {policy!r}: a policy path cannot contain a comma")
    return f"{spec}{',' if ':' in spec else ':'}policy={policy}"


def spec_policy(spec: str) -> str | None:
    """The policy file a ``ppo`` spec names (None for other controllers, or a ppo spec without one)."""
    return spec_params(spec).get("policy") if spec_name(spec) == "ppo" else None


def parse_controllers(text: str | Sequence[str], rows: Iterable[str] = ()) -> list[str]:
    """Expand a comma-separated list of controller specs, with sweeps, into one spec per controller.

    - ``linear`` or ``linear:start=0.3,end=0`` is one controller (its parameters may contain commas).
    - ``NAME@V1,V2,...`` sweeps the controller's first parameter: ``constant@0,0.1`` gives
      ``constant:rate=0`` and ``constant:rate=0.1``.
    - ``NAME:FIXED@KEY=V1,V2`` sweeps ``KEY`` with the other parameters fixed:
      ``linear:end=0@start=0.1,0.3`` gives ``linear:end=0,start=0.1`` and ``linear:end=0,start=0.3``.

    A comma-separated item starts a new controller when it begins with a name (``pid``, ``val_loss:...``);
    items like ``0.2`` or ``end=0`` continue the one before. Each spec comes back in its :func:`canonical_spec`
    form, and duplicates (``constant@0.1,0.10``) are dropped. Specs are not built here (see :func:`check_specs`).
    ``rows``: further names that start an item though they are not controllers (a comparison's ``pbt`` row).
    Raises ``UserError`` for an empty list, a stray value, a value not of its type, or a key given twice.
    """
    rows = tuple(rows)
    items = [s.strip() for s in ([text] if isinstance(text, str) else text) for s in s.split(",")]
    groups: list[str] = []
    for item in filter(None, items):
        m = _NAME.match(item)
        in_sweep = bool(groups) and "@" in groups[-1]
        if m and (not in_sweep or m.group(1) in CONTROLLERS or m.group(1) in rows):
            groups.append(item)
        elif groups:
            groups[-1] += "," + item
        else:
            raise UserError(f"--controllers must start with a controller name, not {item!r}")
    if not groups:
        raise UserError("--controllers is empty; name at least one controller, e.g. constant@0,0.1,linear")
    specs: list[str] = []
    for group in groups:
        for spec in map(canonical_spec, _expand_sweep(group)):
            if spec not in specs:
                specs.append(spec)
    return specs


def _expand_sweep(group: str) -> list[str]:
    head, at, sweep = group.partition("@")
    if not at:
        return [head]
    name, _, fixed = head.partition(":")
    values = [v.strip() for v in sweep.split(",")]
    key, eq, first = values[0].partition("=")
    if eq:
        values[0] = first.strip()
        key = key.strip()
    else:
        key = _first_parameter(name)
    if not all(values):
        raise UserError(f"sweep {group!r} has an empty value; write e.g. constant@0,0.1,0.2")
    prefix = f"{name}:{fixed}," if fixed else f"{name}:"
    return [f"{prefix}{key}={v}" for v in values]


def _first_parameter(name: str) -> str:
    params = [p for p in inspect.signature(controller_class(name).__init__).parameters if p != "self"]
    if not params:
        raise UserError(f"controller {name!r} has no parameter to sweep")
    return params[0]


def check_specs(specs: Iterable[str]) -> None:
    """Build every controller once, so a typo fails before any training. Raises ``UserError``."""
    for spec in specs:
        make_controller(spec)


SLUG_MAX = 200
"""Longest :func:`slug`, in characters: a trial folder ``<slug>-s<seed>`` stays within a file name's 255 bytes."""


def slug(spec: str) -> str:
    """A file-name-safe form of a controller spec: ``constant:rate=0.1`` -> ``constant_rate0.1``. One longer than
    :data:`SLUG_MAX` (a ppo spec with a deep policy path) is cut, and ends with 12 hex digits of the spec's sha256
    instead, so distinct specs keep distinct folders."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "", spec.replace(":", "_").replace(",", "_").replace("=", ""))
    if len(text) <= SLUG_MAX:
        return text
    return f"{text[:SLUG_MAX - 13]}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
