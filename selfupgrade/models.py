"""Data shared by the agent and the control server: releases, orders, heartbeats, states.

Everything here is a frozen dataclass, validated when built, so that a value that exists is a
value that is safe to act on: a :class:`Version` that cannot hold ``../``, a :class:`Digest`
whose hex has the right length, an :class:`Artifact` whose URL is http or https.

The wire form (JSON objects) of orders and heartbeats is defined here too, by
:meth:`UpgradeOrder.to_wire` / :meth:`UpgradeOrder.from_wire` and the same pair on
:class:`Heartbeat`; both transports and the server use these, nothing else parses them.
"""

from __future__ import annotations

import enum
import functools
import hmac
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from packaging.version import InvalidVersion as _PackagingInvalidVersion
from packaging.version import Version

from .errors import InvalidVersion, UnsafePath, UnsafeURL

__all__ = [
    "FALCON_TYPES",
    "MAX_VERSION_LENGTH",
    "Artifact",
    "Digest",
    "HashAlgorithm",
    "Heartbeat",
    "Patch",
    "Release",
    "Role",
    "UpgradeOrder",
    "UpgradeState",
    "Version",
    "check_relative_target",
    "check_url",
    "falcon_release",
    "parse_version",
    "visible",
]

MAX_VERSION_LENGTH = 64
"""Longest version string accepted. Real versions are short; a long one is an attack or a bug."""

_HOSTILE_VERSION = re.compile(r"[/\\\x00\s]|\.\.")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")

HashAlgorithm = Literal["md5", "sha256", "sha512"]
_HEX_LENGTH: dict[str, int] = {"md5": 32, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


def parse_version(text: object) -> Version:
    """Parse a version string, refusing anything that is not a plain PEP 440 version.

    Versions end up in file names and URLs (``bin_<version>``), so before asking ``packaging``
    this refuses path separators, ``..``, NUL, whitespace and over-long strings.

    Raises:
        InvalidVersion: naming the string and what is wrong with it.
    """
    if isinstance(text, str):
        known = _PARSED.get(text)
        if known is not None:
            return known
    else:
        raise InvalidVersion(repr(text), f"a version must be a string, not {type(text).__name__}")
    if not text:
        raise InvalidVersion(text, "it is empty")
    if len(text) > MAX_VERSION_LENGTH:
        raise InvalidVersion(text[:80], f"longer than {MAX_VERSION_LENGTH} characters")
    if _HOSTILE_VERSION.search(text):
        raise InvalidVersion(text, "it contains a path separator, '..', NUL or whitespace")
    try:
        version = Version(text)
    except _PackagingInvalidVersion:
        raise InvalidVersion(text, "not a PEP 440 version such as 1.2.3") from None
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[text] = version
    return version


# A fleet reports a handful of versions, thousands of times a second: each string is parsed
# once (``Version`` is immutable). Bounded, so that hostile strings cannot grow it.
_PARSED: dict[str, Version] = {}
_PARSED_MAX = 1024


def visible(text: str) -> str:
    """``text`` with every character that is not printable (newlines, ANSI escapes, bidi
    overrides such as U+202E) written as an escape, so that a client's text cannot forge a log
    line or reverse what a dashboard shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def check_url(url: object) -> str:
    """Return ``url`` if it is an absolute http or https URL with a host.

    Raises:
        UnsafeURL: for any other scheme (``file:``, ``ftp:``, ...), a missing host,
            credentials in the URL, control characters, or a ``{...}`` placeholder.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeURL(f"a URL must be a non-empty string, not {url!r}", url=repr(url))
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UnsafeURL(f"URL {url!r} contains whitespace or control characters", url=url)
    if "{" in url or "}" in url:
        raise UnsafeURL(
            f"URL {url!r} contains a template placeholder ({{...}}); give the URL itself",
            url=url,
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"URL {url!r}: only http and https are allowed", url=url)
    if not parts.hostname:
        raise UnsafeURL(f"URL {url!r} has no host", url=url)
    if not _HOSTNAME.fullmatch(parts.hostname) and not _is_ip(parts.hostname):
        raise UnsafeURL(
            f"URL {url!r}: {parts.hostname!r} is not a host name or an IP address", url=url
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise UnsafeURL(f"URL {url!r} has an invalid port", url=url) from None
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL(f"URL {url!r} carries credentials; configure them instead", url=url)
    return url


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_relative_target(target: object) -> str:
    """Return ``target`` if it is a plain relative path that stays inside its base directory.

    Raises:
        UnsafePath: for absolute paths, ``..`` parts, NUL, backslashes or empty names.
    """
    if not isinstance(target, str) or not target:
        raise UnsafePath(f"a target must be a non-empty string, not {target!r}", path=repr(target))
    parts = target.split("/")
    if (
        target.startswith("/")
        or "\x00" in target
        or "\\" in target
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise UnsafePath(
            f"target {target!r} must be a relative path inside the install directory", path=target
        )
    return target


class Role(str, enum.Enum):
    """The three files of an installed daemon: its program, its config, its service file."""

    BIN = "bin"
    CFG = "cfg"
    SERVICE = "service"


class UpgradeState(str, enum.Enum):
    """What the agent is doing, as reported in every heartbeat."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    RESTARTING = "restarting"
    CONFIRMING = "confirming"
    """Started as a new version; waiting for health to be confirmed."""
    FAILED = "failed"
    """The last attempt failed before the swap; the old version runs. ``error`` says why."""
    ROLLED_BACK = "rolled_back"
    """The new version failed after the swap and the previous one was restored."""


@dataclass(frozen=True)
class Digest:
    """An expected digest: an algorithm and its lowercase hex value.

    md5 exists only for the falcon protocol: it detects corruption, not tampering.

    Raises:
        ValueError: for an unknown algorithm or a hex string of the wrong form.
    """

    algorithm: HashAlgorithm
    hex: str

    def __post_init__(self) -> None:
        if self.algorithm not in _HEX_LENGTH:
            raise ValueError(
                f"unknown digest algorithm {self.algorithm!r}; use one of {sorted(_HEX_LENGTH)}"
            )
        value = self.hex.lower() if isinstance(self.hex, str) else ""
        if len(value) != _HEX_LENGTH[self.algorithm] or not _HEX.fullmatch(value):
            raise ValueError(
                f"{self.algorithm} digest must be {_HEX_LENGTH[self.algorithm]} hex digits, "
                f"got {self.hex!r}"
            )
        object.__setattr__(self, "hex", value)

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``"sha256:<hex>"`` (or ``md5:``, ``sha512:``).

        Raises:
            ValueError: if the text is not of that form.
        """
        algorithm, sep, value = text.partition(":") if isinstance(text, str) else ("", "", "")
        if not sep:
            raise ValueError(f"digest {text!r} must look like 'sha256:<hex>'")
        return cls(cast(HashAlgorithm, algorithm), value)

    @property
    def integrity_only(self) -> bool:
        """True for md5: it catches a corrupted download, not a forged one."""
        return self.algorithm == "md5"

    def matches(self, hex_value: str) -> bool:
        """Compare with ``hex_value`` in constant time."""
        return hmac.compare_digest(self.hex.encode(), hex_value.lower().encode())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Patch:
    """A delta from one earlier version's file to an artifact's bytes (zstd's patch-from
    format: the earlier file is the dictionary; ``selfupgrade release patch`` makes one).

    An agent running ``from_version`` may fetch this instead of the whole artifact. What the
    patch builds is held to the artifact's own digest (and signature), so a wrong patch can
    only cost a full download, never install other bytes.

    Attributes:
        from_version: the version whose installed file the patch applies to.
        url: an http or https address of the patch.
        digest: the digest of the patch's own bytes.
        size: the patch's exact size in bytes, when known.

    Raises:
        UnsafeURL, InvalidVersion, ValueError: when a field is not acceptable.
    """

    from_version: Version
    url: str
    digest: Digest
    size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.from_version, Version):
            object.__setattr__(self, "from_version", parse_version(self.from_version))
        check_url(self.url)
        if not isinstance(self.digest, Digest):
            raise ValueError(f"a patch's digest must be a Digest, got {self.digest!r}")
        _check_size(self.size)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of an order's ``patches`` list."""
        return _drop_none(
            {
                "from": str(self.from_version),
                "url": self.url,
                "digest": str(self.digest),
                "size": self.size,
            }
        )

    @classmethod
    def from_wire(cls, data: object, name: str) -> Patch:
        """Build a patch from its JSON object; ``name`` names it in errors.

        Raises:
            ValueError: (``InvalidVersion``, ``UnsafeURL`` among them) naming the field.
        """
        obj = _require_mapping(data, name)
        unknown = set(obj) - {"from", "url", "digest", "size"}
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {sorted(unknown)}")
        digest = obj.get("digest")
        if not isinstance(digest, str):
            raise ValueError(f"{name}.digest must be a string")
        try:
            return cls(
                from_version=parse_version(obj.get("from")),
                url=cast(str, obj.get("url")),
                digest=Digest.parse(digest),
                size=cast("int | None", obj.get("size")),
            )
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc


def _check_size(size: object) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a non-negative integer, got {size!r}")


@dataclass(frozen=True)
class Artifact:
    """One file of a release: where to get it, what it must hash to, where it goes.

    Attributes:
        role: which of the three files this is.
        url: an http or https address.
        digest: the digest the bytes must have.
        mirrors: more addresses of the same bytes, tried in order after ``url`` when a
            download from it fails (a transfer cut off midway goes on from where it stopped).
        size: the exact size in bytes, when known (a download of another size is refused).
        target: a path relative to the install directory; ``None`` means the role's default.
        mode: the file mode to install with; ``None`` keeps the mode of the file it replaces.
        patches: deltas from earlier versions to these bytes, at most one per version.

    Raises:
        UnsafeURL, UnsafePath, ValueError: when a field is not acceptable.
    """

    role: Role
    url: str
    digest: Digest
    size: int | None = None
    target: str | None = None
    mode: int | None = None
    mirrors: tuple[str, ...] = ()
    patches: tuple[Patch, ...] = ()

    MAX_MIRRORS = 16
    MAX_PATCHES = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        check_url(self.url)
        if isinstance(self.mirrors, (str, bytes)) or not isinstance(self.mirrors, (tuple, list)):
            raise ValueError(f"mirrors must be a list of URLs, got {self.mirrors!r}")
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        if len(self.mirrors) > self.MAX_MIRRORS:
            raise ValueError(f"at most {self.MAX_MIRRORS} mirrors, got {len(self.mirrors)}")
        for mirror in self.mirrors:
            if not isinstance(mirror, str):
                raise ValueError(f"mirrors must be URLs (strings), got {mirror!r}")
            check_url(mirror)
        _check_size(self.size)
        if isinstance(self.patches, (str, bytes)) or not isinstance(self.patches, (tuple, list)):
            raise ValueError(f"patches must be a list, got {self.patches!r}")
        object.__setattr__(self, "patches", tuple(self.patches))
        if len(self.patches) > self.MAX_PATCHES:
            raise ValueError(f"at most {self.MAX_PATCHES} patches, got {len(self.patches)}")
        if not all(isinstance(p, Patch) for p in self.patches):
            raise ValueError("patches must be Patch values")
        sources = [p.from_version for p in self.patches]
        if len(set(sources)) != len(sources):
            raise ValueError(f"one patch per earlier version, got {[str(v) for v in sources]}")
        if self.target is not None:
            check_relative_target(self.target)
        if self.mode is not None and (
            isinstance(self.mode, bool)
            or not isinstance(self.mode, int)
            or not 0 <= self.mode <= 0o777
        ):
            raise ValueError(f"mode must be between 0 and 0o777, got {self.mode!r}")

    @property
    def urls(self) -> tuple[str, ...]:
        """``url``, then the mirrors: where the bytes are, in the order to try them."""
        return (self.url, *self.mirrors)

    def patch_from(self, version: Version) -> Patch | None:
        """The patch that applies to ``version``'s file, if the release has one."""
        return next((p for p in self.patches if p.from_version == version), None)


@dataclass(frozen=True)
class Release:
    """A version and the artifacts that make it up (any subset of the three roles; empty only
    in a rollback order, where the host restores its backup generation).

    Raises:
        ValueError: for two artifacts of the same role.
    """

    version: Version
    artifacts: tuple[Artifact, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.version, Version):
            object.__setattr__(self, "version", parse_version(self.version))
        object.__setattr__(self, "artifacts", tuple(self.artifacts))
        roles = [a.role for a in self.artifacts]
        if len(set(roles)) != len(roles):
            raise ValueError(f"a release has one artifact per role, got {[r.value for r in roles]}")

    def artifact(self, role: Role) -> Artifact | None:
        """The artifact of ``role``, or ``None`` if this release does not change that file."""
        return next((a for a in self.artifacts if a.role == role), None)

    @functools.cached_property
    def roles(self) -> frozenset[Role]:
        """The roles this release carries."""
        return frozenset(a.role for a in self.artifacts)


@dataclass(frozen=True)
class UpgradeOrder:
    """What the control server tells one agent to do.

    Attributes:
        release: the version and artifacts to install.
        task_id: the server's id of the task or rollout (echoed back in heartbeats).
        allow_downgrade: install even if the release is older than the running version.
        manifest: a signed release manifest (bytes), when the server has one.
        rollback: go back to ``release.version``: from the host's backup generation when it
            holds that version, else by installing the release's artifacts.

    Raises:
        ValueError: an order that is not a rollback carries no artifact.
    """

    release: Release
    task_id: str = ""
    allow_downgrade: bool = False
    manifest: bytes | None = field(default=None, repr=False)
    rollback: bool = False

    def __post_init__(self) -> None:
        if not self.release.artifacts and not self.rollback:
            raise ValueError("an order needs at least one artifact (only a rollback may have none)")

    @property
    def version(self) -> Version:
        """The release's version."""
        return self.release.version

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent to agents."""
        wire: dict[str, Any] = {
            "task_id": self.task_id,
            "version": str(self.release.version),
            "allow_downgrade": self.allow_downgrade,
            "artifacts": {
                a.role.value: _drop_none(
                    {
                        "url": a.url,
                        "digest": str(a.digest),
                        "size": a.size,
                        "target": a.target,
                        "mode": a.mode,
                        "mirrors": list(a.mirrors) or None,
                        "patches": [p.to_wire() for p in a.patches] or None,
                    }
                )
                for a in self.release.artifacts
            },
        }
        if self.manifest is not None:
            wire["manifest"] = self.manifest.decode("utf-8")
        if self.rollback:
            wire["rollback"] = True
        return wire

    @classmethod
    def from_wire(cls, data: object) -> UpgradeOrder:
        """Build an order from its JSON object.

        Raises:
            OrderRejected: (``InvalidVersion``, ``UnsafeURL``, ``UnsafePath``) or ValueError
                when a field is missing or malformed; the message names the field.
        """
        obj = _require_mapping(data, "order")
        version = parse_version(obj.get("version"))
        raw_artifacts = _require_mapping(obj.get("artifacts"), "order.artifacts")
        artifacts = []
        for role_name, raw in raw_artifacts.items():
            try:
                role = Role(role_name)
            except ValueError:
                raise ValueError(f"order.artifacts: unknown role {role_name!r}") from None
            spec = _require_mapping(raw, f"order.artifacts.{role_name}")
            digest_text = spec.get("digest")
            if not isinstance(digest_text, str):
                raise ValueError(f"order.artifacts.{role_name}.digest must be a string")
            artifacts.append(
                Artifact(
                    role=role,
                    url=cast(str, spec.get("url")),
                    digest=Digest.parse(digest_text),
                    size=cast("int | None", spec.get("size")),
                    target=cast("str | None", spec.get("target")),
                    mode=cast("int | None", spec.get("mode")),
                    mirrors=cast("tuple[str, ...]", spec.get("mirrors") or ()),
                    patches=_patches(spec.get("patches"), f"order.artifacts.{role_name}.patches"),
                )
            )
        task_id = obj.get("task_id", "")
        if not isinstance(task_id, str) or len(task_id) > 128:
            raise ValueError("order.task_id must be a string of at most 128 characters")
        allow_downgrade = obj.get("allow_downgrade", False)
        if not isinstance(allow_downgrade, bool):
            raise ValueError("order.allow_downgrade must be true or false")
        manifest = obj.get("manifest")
        if manifest is not None and not isinstance(manifest, str):
            raise ValueError("order.manifest must be a string")
        rollback = obj.get("rollback", False)
        if not isinstance(rollback, bool):
            raise ValueError("order.rollback must be true or false")
        return cls(
            release=Release(version, tuple(artifacts)),
            task_id=task_id,
            allow_downgrade=allow_downgrade,
            manifest=manifest.encode("utf-8") if manifest is not None else None,
            rollback=rollback,
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What an agent tells the control server on every beat.

    Attributes:
        host: the host's identity (its hostname by default).
        version: the version it runs now.
        state: what it is doing.
        error: why the last attempt failed or was rolled back, if it did.
        task_id: the task the state refers to.
        failed_version: the version that failed or was rolled back, if any.
        labels: host labels for targeting (``{"dc": "bj", "role": "db"}``).
        files: digests of the installed small files, ``{"cfg": {"md5": ..., "sha256": ...}}``,
            so that a config-only task can tell when it is done.
        confirmed: the running version has confirmed its health.
        served_by: for the upgrade in progress, the URL each downloaded file came from
            (``{"bin": url}``; an order's mirrors make it more than one choice).
        failures: how many attempts at ``failed_version`` failed so far; a server compares it
            with the count it saw when it admitted the host, to tell a new failure from the
            report of an old one.
        reports_state: the agent reports its state, errors and file digests (every agent
            built on selfupgrade does). ``False`` for an unmodified falcon agent, which sends
            only its version and whether a download is running: the server must then infer
            what happened from ``process`` and the version.
        process: which process of the agent sent the beat, as the server's front end tells
            it (``"<listener>/<n>"``; ``""``: unknown). Set by the server, never sent by an
            agent: :meth:`to_wire` leaves it and ``reports_state`` out.
        source: the network address the beat came from, as the server's front end tells it
            (``""``: the front end identified the host otherwise, by its own token, or does
            not know). hbs binds a host name to the address it was first seen from. Set by
            the server, never sent by an agent.
    """

    host: str
    version: Version
    state: UpgradeState = UpgradeState.IDLE
    error: str | None = None
    task_id: str = ""
    failed_version: Version | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    confirmed: bool = True
    failures: int = 0
    served_by: Mapping[str, str] = field(default_factory=dict)
    reports_state: bool = True
    process: str = ""
    source: str = ""

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent to the server."""
        return {
            "host": self.host,
            "version": str(self.version),
            "state": self.state.value,
            "error": self.error,
            "task_id": self.task_id,
            "failed_version": str(self.failed_version) if self.failed_version else None,
            "labels": dict(self.labels),
            "files": {k: dict(v) for k, v in self.files.items()},
            "confirmed": self.confirmed,
            "failures": self.failures,
            **({"served_by": dict(self.served_by)} if self.served_by else {}),
        }

    @classmethod
    def from_wire(cls, data: object) -> Heartbeat:
        """Build a heartbeat from its JSON object.

        Raises:
            ValueError: (``InvalidVersion`` among them) naming the field that is wrong.
        """
        obj = _require_mapping(data, "heartbeat")
        host = obj.get("host")
        if not isinstance(host, str) or not 0 < len(host) <= 255 or not host.isprintable():
            raise ValueError("heartbeat.host must be a printable string of 1 to 255 characters")
        raw_state = obj.get("state", "idle")
        state = _STATES.get(raw_state) if isinstance(raw_state, str) else None
        if state is None:
            raise ValueError(f"heartbeat.state must be one of {list(_STATES)}")
        error = obj.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError("heartbeat.error must be a string or null")
        task_id = obj.get("task_id") or ""
        if not isinstance(task_id, str) or len(task_id) > 128:
            raise ValueError("heartbeat.task_id must be a string of at most 128 characters")
        failed = obj.get("failed_version")
        labels = _string_map(obj.get("labels", {}), "heartbeat.labels")
        files_raw = _require_mapping(obj.get("files", {}), "heartbeat.files")
        files = {
            str(role): _string_map(v, "heartbeat.files.", key=role) for role, v in files_raw.items()
        }
        confirmed = obj.get("confirmed", True)
        if not isinstance(confirmed, bool):
            raise ValueError("heartbeat.confirmed must be true or false")
        failures = obj.get("failures", 0)
        if isinstance(failures, bool) or not isinstance(failures, int) or not 0 <= failures < 2**31:
            raise ValueError("heartbeat.failures must be a non-negative integer")
        served_by = _string_map(obj.get("served_by", {}), "heartbeat.served_by")
        return cls(
            host=host,
            version=parse_version(obj.get("version")),
            state=state,
            error=visible(error[:1000]) if error else None,
            task_id=task_id,
            failed_version=parse_version(failed) if failed else None,
            labels=labels,
            files=files,
            confirmed=confirmed,
            failures=failures,
            served_by={k: visible(v) for k, v in served_by.items()},
        )


# One shared empty mapping: hbs keeps the labels of every host's last heartbeat, and most
# have none.
_NO_STRINGS: Mapping[str, str] = MappingProxyType({})
_STATES: Mapping[str, UpgradeState] = {s.value: s for s in UpgradeState}


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _patches(value: object, name: str) -> tuple[Patch, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of patches")
    if len(value) > Artifact.MAX_PATCHES:
        raise ValueError(f"{name}: at most {Artifact.MAX_PATCHES} patches, got {len(value)}")
    return tuple(Patch.from_wire(p, f"{name}[{i}]") for i, p in enumerate(value))


def _require_mapping(value: object, name: str) -> Mapping[str, Any]:
    if type(value) is dict:
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _string_map(
    value: object, name: str, max_items: int = 64, *, key: object = ""
) -> Mapping[str, str]:
    """A copy of ``value`` checked to map short strings to short strings; ``name`` (with
    ``key`` after it) names it in errors."""
    if type(value) is dict and not value:
        return _NO_STRINGS
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}{key} must be a JSON object")
    if len(value) > max_items:
        raise ValueError(f"{name}{key} has more than {max_items} entries")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 128 or len(v) > 256:
            raise ValueError(f"{name}{key} must map short strings to short strings")
        out[k] = v
    return out


FALCON_TYPES: Mapping[int, tuple[Role, ...]] = {
    0: (Role.BIN,),
    1: (Role.CFG,),
    2: (Role.BIN, Role.CFG),
}


def falcon_release(kind: int, wgeturl: str, version: str, bin_md5: str, cfg_md5: str) -> Release:
    """The release a falcon upgrade instruction describes.

    ``kind`` 0 is the program, 1 the config, 2 both; the files are at
    ``<wgeturl>/bin_<version>`` and ``<wgeturl>/cfg_<version>``, checked by md5.

    Raises:
        ValueError: (``InvalidVersion``, ``UnsafeURL`` among them) naming what is wrong.
    """
    if isinstance(kind, bool) or not isinstance(kind, int) or kind not in FALCON_TYPES:
        raise ValueError(f"type must be 0 (bin), 1 (cfg) or 2 (both), got {kind!r}")
    parsed = parse_version(version)
    base = check_url(wgeturl).rstrip("/")
    md5 = {Role.BIN: bin_md5, Role.CFG: cfg_md5}
    return Release(
        parsed,
        tuple(
            Artifact(role, f"{base}/{role.value}_{version}", Digest("md5", md5[role]))
            for role in FALCON_TYPES[kind]
        ),
    )
