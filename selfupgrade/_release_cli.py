"""``selfupgrade release keygen|sign|verify|patch``: keys and signed manifests (the ``sign``
extra), and delta patches (the ``delta`` extra).

    selfupgrade release keygen --out keys/ --name release-1
    selfupgrade release sign --key keys/release-1.key --dir files/ --version 6.0.1 \\
        --product falcon-agent --platform linux-x86_64 --expires-days 30 --out manifest.json
    selfupgrade release verify --manifest manifest.json --trust keys/release-1.pub --dir files/ \\
        --product falcon-agent --platform linux-x86_64
    selfupgrade release patch --old files/bin_6.0.0 --new files/bin_6.0.1 --from 6.0.0 \
        --out files/bin_6.0.0-6.0.1.zst --url http://files.example/bin_6.0.0-6.0.1.zst
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``release`` and its subcommands to the ``selfupgrade`` parser."""
    p = sub.add_parser("release", help="generate keys, sign releases, verify manifests")
    rs = p.add_subparsers(dest="release_command", required=True)

    k = rs.add_parser("keygen", help="generate an Ed25519 key pair")
    k.add_argument("--out", type=Path, required=True, help="directory for NAME.key and NAME.pub")
    k.add_argument("--name", default="release", help="file name stem (default: release)")

    s = rs.add_parser("sign", help="sign the artifacts of a directory into a manifest")
    s.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        help="a private key (repeat for several signatures)",
    )
    s.add_argument(
        "--dir",
        type=Path,
        required=True,
        help="holds bin_<version>, cfg_<version>, service_<version>",
    )
    s.add_argument("--version", required=True)
    s.add_argument("--product", required=True)
    s.add_argument("--platform", required=True)
    s.add_argument("--expires-days", type=float, default=30.0)
    s.add_argument(
        "--rollback",
        action="store_true",
        help="allow agents on a newer version to install this one",
    )
    s.add_argument("--append", type=Path, help="add signatures to this existing manifest")
    s.add_argument("--out", type=Path, required=True, help="the manifest to write")

    v = rs.add_parser("verify", help="check a manifest's signatures (and the files)")
    v.add_argument("--manifest", type=Path, required=True)
    v.add_argument("--trust", type=Path, action="append", required=True, help="a public key")
    v.add_argument("--threshold", type=int, default=1)
    v.add_argument("--product", help="expected product (default: the manifest's)")
    v.add_argument("--platform", help="expected platform (default: the manifest's)")
    v.add_argument("--dir", type=Path, help="also check the files in this directory")

    d = rs.add_parser(
        "patch",
        help="make a delta patch from an earlier version's file; print its release entry",
    )
    d.add_argument("--old", type=Path, required=True, help="the earlier version's file")
    d.add_argument("--new", type=Path, required=True, help="the new version's file")
    d.add_argument("--from", dest="from_version", required=True, help="the earlier version")
    d.add_argument("--out", type=Path, required=True, help="the patch to write (a new file)")
    d.add_argument("--url", help="where the patch will be served (for the printed entry)")
    d.add_argument("--level", type=int, default=19, help="zstd level, 1 to 22 (default 19)")


def run(args: argparse.Namespace) -> int:
    """Carry out ``selfupgrade release ...``; return the exit status."""
    if args.release_command == "patch":
        return _patch(args)
    try:
        from .verify import signature as sig
    except ImportError as exc:
        print(f"selfupgrade release: {exc}", file=sys.stderr)
        return 1
    cmd = args.release_command
    try:
        if cmd == "keygen":
            private, public = sig.generate_key()
            args.out.mkdir(parents=True, exist_ok=True)
            key_path = args.out / f"{args.name}.key"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(private)
            (args.out / f"{args.name}.pub").write_bytes(public)
            kid = sig.key_id(sig.load_public_key(public))
            print(
                f"wrote {key_path} (private, mode 0600) and {args.out / args.name}.pub; "
                f"key id {kid}"
            )
            return 0
        if cmd == "sign":
            signed = sig.manifest_for_directory(
                args.dir,
                version=args.version,
                product=args.product,
                platform=args.platform,
                expires=time.time() + args.expires_days * 86400,
                rollback=args.rollback,
            )
            keys = [sig.load_private_key(p.read_bytes()) for p in args.key]
            existing = args.append.read_bytes() if args.append else None
            data = sig.sign_manifest(signed, keys, existing=existing)
            args.out.write_bytes(data)
            print(
                f"signed {sorted(signed['artifacts'])} of {args.version} with "
                f"{len(keys)} key(s) into {args.out}"
            )
            return 0
        manifest = sig.Manifest.parse(args.manifest.read_bytes())
        verifier = sig.SignatureVerifier(
            [sig.load_public_key(p.read_bytes()) for p in args.trust],
            threshold=args.threshold,
            product=args.product or manifest.product,
            platform=args.platform or manifest.platform,
        )
        from .models import Artifact, Digest, Release, UpgradeOrder

        order = UpgradeOrder(
            Release(
                manifest.version,
                tuple(
                    Artifact(role, f"http://manifest.invalid/{a.name}", Digest("sha256", a.sha256))
                    for role, a in manifest.artifacts.items()
                ),
            ),
            manifest=args.manifest.read_bytes(),
        )
        verifier.check_order(order)
        for a in manifest.artifacts.values() if args.dir is not None else ():
            data = (args.dir / a.name).read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if len(data) != a.size or actual != a.sha256:
                print(
                    f"selfupgrade release verify: {a.name} does not match the manifest "
                    f"({len(data)} bytes, sha256 {actual})",
                    file=sys.stderr,
                )
                return 1
        print(
            f"ok: {manifest.product} {manifest.version} for {manifest.platform}, "
            f"{len(manifest.artifacts)} artifact(s), expires "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(manifest.expires))}"
        )
        return 0
    except Exception as exc:  # every failure is a message and exit status 1, never a traceback
        print(f"selfupgrade release {cmd}: {exc}", file=sys.stderr)
        return 1


def _patch(args: argparse.Namespace) -> int:
    """Write the patch from ``--old`` to ``--new`` and print the JSON entry of the new
    artifact's ``patches`` list (the URL left out unless ``--url`` gives it)."""
    from . import _delta
    from .models import Digest, Patch, check_url, parse_version

    try:
        version = parse_version(args.from_version)
        if args.url is not None:
            check_url(args.url)
        if not 1 <= args.level <= 22:
            raise ValueError(f"--level must be between 1 and 22, got {args.level}")
        old, new = args.old.read_bytes(), args.new.read_bytes()
        if old == new:
            raise ValueError(f"{args.old} and {args.new} are the same bytes: no patch is needed")
        patch = _delta.make_patch(old, new, level=args.level)
        with open(args.out, "xb") as f:  # never overwrite: a served patch may be in use
            f.write(patch)
    except Exception as exc:  # every failure is a message and exit status 1, never a traceback
        print(f"selfupgrade release patch: {exc}", file=sys.stderr)
        return 1
    digest = Digest("sha256", hashlib.sha256(patch).hexdigest())
    entry = Patch(version, args.url or "http://url.invalid/", digest, len(patch)).to_wire()
    if args.url is None:
        del entry["url"]
    print(json.dumps(entry))
    print(
        f"wrote {args.out}: {len(patch):,} bytes for {len(new):,} "
        f"({len(patch) / len(new):.2%} of the whole file)",
        file=sys.stderr,
    )
    return 0
