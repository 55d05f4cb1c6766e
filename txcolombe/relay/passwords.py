"""AUTH users: a file of salted scrypt hashes, and the command that writes it.

One user a line: ``name:scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>``.
Blank lines and lines starting with ``#`` are ignored. Passwords never
appear in the file, in logs or on a command line::

    python -m txcolombe.relay.passwords users.txt alice   # asks twice
    printf 's3cret\n' | python -m txcolombe.relay.passwords --stdin users.txt alice
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys
from pathlib import Path

LOG_N, R, P = 14, 8, 1
_SALT = 16
_DKLEN = 32


def hash_password(password: str, *, log_n: int = LOG_N) -> str:
    """The stored form of ``password``, with a fresh random salt."""
    salt = os.urandom(_SALT)
    digest = _scrypt(password, salt, log_n, R, P)
    b64 = base64.b64encode
    return f"scrypt${log_n}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << log_n, r=r, p=p,
        maxmem=256 * 1024 * 1024, dklen=_DKLEN,
    )  # fmt: skip


def verify_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored`` (constant-time comparison)."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(log_n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, actual)


def load_users(path: Path) -> dict[str, str]:
    """User name to stored hash.

    :raises ValueError: a line that is not ``name:scrypt$...``.
    """
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith("scrypt$"):
            raise ValueError(f"{path}:{number}: expected name:scrypt$...")
        users[name] = stored
    return users


def set_user(path: Path, name: str, password: str, *, log_n: int = LOG_N) -> None:
    """Add or replace ``name`` in the file (created with mode 0600)."""
    if not name or ":" in name or any(c in name for c in "\r\n\x00"):
        raise ValueError("a user name may not be empty or hold ':' or line breaks")
    lines = path.read_text("utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0] != name]
    kept.append(f"{name}:{hash_password(password, log_n=log_n)}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m txcolombe.relay.passwords",
        description="Add or replace a user in an smtprelay users file (salted scrypt hashes).",
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("user")
    parser.add_argument("--stdin", action="store_true", help="read the password from stdin")
    args = parser.parse_args(argv)
    if not args.file.parent.is_dir():
        return _usage_error(f"{args.file}: no directory {args.file.parent}")
    if args.stdin:
        if sys.stdin is None:
            return _usage_error("--stdin: standard input is closed")
        line = sys.stdin.readline()
        if not line:
            return _usage_error("--stdin: no password on standard input")
        password = line.rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:
            return _usage_error("no password given (end of input)")
        if again != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    try:
        set_user(args.file, args.user, password)
    except UnicodeDecodeError:
        return _usage_error(f"{args.file}: not a text file")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    except OSError as error:
        return _usage_error(f"{args.file}: {error.strerror or error}")
    return 0


def _usage_error(message: str) -> int:
    """One line on stderr; the exit status of a usage mistake."""
    print(f"passwords: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
