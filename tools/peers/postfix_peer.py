"""A private Postfix instance (with an auth-only Dovecot) on loopback for tests.

:class:`PostfixPeer` writes its own Postfix configuration under a work
directory and runs ``postfix -c <dir> start`` as root, next to (and without
touching) any system instance.  It listens on three free high ports of
127.0.0.1:

* ``smtp``: plain SMTP, STARTTLS offered, AUTH offered with or without TLS;
* ``smtps``: implicit TLS (``smtpd_tls_wrappermode``), AUTH offered;
* ``submission``: STARTTLS offered, AUTH offered only after STARTTLS, and
  (by default) recipients refused unless the client authenticated.

SASL (PLAIN and LOGIN) is answered by a Dovecot started with its own
configuration and ``base_dir`` that only runs its auth service.

Every recipient in one of the peer's domains (``example.org`` and
``localhost`` by default) is delivered to a single Maildir, except local parts
starting with ``refuse`` (``550 5.1.1`` at RCPT) and ``later`` (``450 4.2.1``
at RCPT), the same conventions as the aiosmtpd peer.  Any other domain is
refused with ``554 5.7.1 ... Relay access denied``, so nothing ever leaves the
machine.

Postfix stores messages with LF line endings and prepends ``Return-Path``,
``Delivered-To`` and ``Received`` headers.

Use :func:`available` to learn whether this machine can run the peer (for a
pytest skip reason).  ``tools/install_peers.sh`` installs the packages.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "DEFAULT_DOMAINS",
    "DEFAULT_USERS",
    "PeerError",
    "PeerPorts",
    "PostfixPeer",
    "available",
    "free_ports",
]

DEFAULT_USERS: Mapping[str, str] = {"alice": "s3cret"}
DEFAULT_DOMAINS: tuple[str, ...] = ("example.org", "localhost")

_SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
_ENV_PATH = ":".join(_SBIN_DIRS)
_MAIL_UID_NAME = "nobody"
_MAIL_GID_NAME = "nogroup"
# Characters Postfix or Dovecot would interpret in a configuration value.
_UNSAFE_PATH = re.compile(r"[\s,$#\"'\\{}=]")

# Log lines that mean the peer will not work: stop waiting for the ports.
_FAILURE_SIGNS = (
    " fatal: ",
    " panic: ",
    "bad command startup -- throttling",
    "disabling TLS support",
    "TLS context initialization failed",
)


class PeerError(RuntimeError):
    """The peer could not be set up, started or stopped."""


@dataclass(frozen=True)
class PeerPorts:
    """The peer's TCP ports on 127.0.0.1."""

    smtp: int
    smtps: int
    submission: int

    def __iter__(self) -> Iterator[int]:
        return iter((self.smtp, self.smtps, self.submission))


def _which(name: str) -> str | None:
    return shutil.which(name, path=_ENV_PATH)


def _postconf_default(postconf: str, name: str) -> str:
    out = subprocess.run(
        [postconf, "-dh", name],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=True,
    )
    return out.stdout.strip()


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": _ENV_PATH, "LANG": "C", "LC_ALL": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    if extra:
        env.update(extra)
    return env


def available() -> str | None:
    """Return None if this machine can run a :class:`PostfixPeer`, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "PostfixPeer needs root (Postfix's master runs as root)"
    postfix = _which("postfix")
    postconf = _which("postconf")
    dovecot = _which("dovecot")
    if postfix is None or postconf is None:
        return "Postfix is not installed (run tools/install_peers.sh)"
    if dovecot is None:
        return "Dovecot is not installed (run tools/install_peers.sh)"
    try:
        daemon_dir = _postconf_default(postconf, "daemon_directory")
        version = _postconf_default(postconf, "mail_version")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"postconf does not work: {exc}"
    for program in ("master", "smtpd", "virtual", "postlogd", "postfix-script"):
        if not os.access(os.path.join(daemon_dir, program), os.X_OK):
            return f"Postfix program {daemon_dir}/{program} is missing"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"cannot parse Postfix version {version!r}"
    if (major, minor) < (3, 4):
        return f"Postfix {version} is too old (need 3.4+ for maillog_file)"
    for user in ("postfix", "dovecot", "dovenull", _MAIL_UID_NAME):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} is missing"
    for group in ("postdrop", _MAIL_GID_NAME):
        try:
            grp.getgrnam(group)
        except KeyError:
            return f"system group {group!r} is missing"
    return None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` just now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _traversable_by_others(path: Path) -> bool:
    """True if an unprivileged user could reach files below ``path``."""
    for part in (path, *path.parents):
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z"


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        remaining = [pid for pid in remaining if _pid_alive(pid)]
        if remaining:
            time.sleep(0.02)
    return remaining


def _pids_with_environ(marker: bytes) -> list[int]:
    """PIDs of processes whose environment contains the exact entry ``marker``."""
    found = []
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


class PostfixPeer:
    """A private Postfix + Dovecot (SASL) instance on 127.0.0.1 high ports.

    Use as a context manager (``with PostfixPeer(...) as peer:``) or call
    :meth:`start` and :meth:`stop`.  Needs root; see :func:`available`.

    :param workdir: where the configuration (``workdir/etc``), queue
        (``workdir/queue``), logs, data directory and Maildir go; created
        if missing.  Must not contain whitespace or ``,$#"'\\{}=``.  If
        other users cannot traverse it (pytest's ``tmp_path`` is under a
        0700 directory), the data directory and the Maildir live in a
        runtime directory under /tmp instead, ``workdir/Maildir`` is a
        symlink to it while the peer runs, and :meth:`stop` moves the
        Maildir into ``workdir``.
    :param cert_pem: the server certificate chain, PEM (leaf first).
    :param key_pem: the private key, PEM.
    :param users: SASL user names and passwords (PLAIN and LOGIN).
    :param domains: mail domains delivered to the Maildir (any local part).
    :param hostname: ``myhostname``: the banner and EHLO greeting name.
    :param ports: fixed ports; by default three free ones are picked
        (and picked again if Postfix cannot bind them).
    :param submission_requires_auth: on the submission port refuse
        RCPT (``554 5.7.1``) unless the client authenticated.
    :param message_size_limit: Postfix ``message_size_limit`` (SIZE).
    :param main_cf: extra or overriding ``main.cf`` settings.
    :param start_timeout: seconds to wait for the daemons to be ready.
    """

    def __init__(
        self,
        workdir: Path,
        cert_pem: Path,
        key_pem: Path,
        users: Mapping[str, str] | None = None,
        *,
        domains: Iterable[str] = DEFAULT_DOMAINS,
        hostname: str = "localhost",
        ports: PeerPorts | None = None,
        submission_requires_auth: bool = True,
        message_size_limit: int = 10_240_000,
        main_cf: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self._workdir = Path(workdir).absolute()
        if _UNSAFE_PATH.search(str(self._workdir)):
            raise ValueError(f"workdir path not usable in a Postfix config: {self._workdir}")
        self._cert_src = Path(cert_pem)
        self._key_src = Path(key_pem)
        self._users = dict(DEFAULT_USERS if users is None else users)
        for name, password in self._users.items():
            if not name or re.search(r"[:\s\0]", name) or re.search(r"[:\n\r\0]", password):
                raise ValueError(f"unusable user name or password for {name!r}")
        self._domains = tuple(domains)
        if not self._domains:
            raise ValueError("need at least one domain")
        self._hostname = hostname
        self._fixed_ports = ports
        self._ports = ports
        self._submission_requires_auth = submission_requires_auth
        self._message_size_limit = message_size_limit
        self._main_cf_extra = dict(main_cf or {})
        self._start_timeout = start_timeout

        self._tag = uuid.uuid4().hex[:10]
        self._config_dir = self._workdir / "etc"
        self._queue_dir = self._workdir / "queue"
        self._data_dir = self._workdir / "data"
        self._log_path = self._workdir / "postfix.log"
        self._command_log_path = self._workdir / "postfix-commands.log"
        self._dovecot_log_path = self._workdir / "dovecot.log"
        self._maildir_link = self._workdir / "Maildir"
        # Short, world-traversable directory for Dovecot's sockets and, when
        # workdir is private (pytest's tmp_path is 0700), for the Maildir.
        self._runtime_dir: Path | None = None
        self._mailbox_base: Path | None = None
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._postfix_started = False
        self._log_mark = 0
        self._running = False

    # -- properties -----------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def config_dir(self) -> Path:
        """The directory holding main.cf and master.cf (``postfix -c``)."""
        return self._config_dir

    @property
    def queue_dir(self) -> Path:
        return self._queue_dir

    @property
    def log_path(self) -> Path:
        """Postfix's log file (``maillog_file``)."""
        return self._log_path

    @property
    def dovecot_log_path(self) -> Path:
        return self._dovecot_log_path

    @property
    def ports(self) -> PeerPorts:
        if self._ports is None:
            raise PeerError("the peer has no ports yet: start it first")
        return self._ports

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def users(self) -> Mapping[str, str]:
        return dict(self._users)

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    @property
    def hostname(self) -> str:
        return self._hostname

    @property
    def maildir(self) -> Path:
        """The Maildir every accepted message is delivered to.

        While the peer runs this may be a symlink to a directory outside
        ``workdir``; :meth:`stop` moves the Maildir into ``workdir``.
        """
        return self._maildir_link

    @property
    def running(self) -> bool:
        return self._running

    # -- context manager ------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- messages ---------------------------------------------------------

    def message_paths(self) -> list[Path]:
        """Delivered message files, oldest first."""
        entries: list[tuple[int, str, Path]] = []
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entries.append((path.stat().st_mtime_ns, path.name, path))
        return [path for _, _, path in sorted(entries)]

    def messages(self) -> list[bytes]:
        """The delivered messages as stored (LF line endings, trace headers on top)."""
        result = []
        for path in self.message_paths():
            with contextlib.suppress(FileNotFoundError):
                result.append(path.read_bytes())
        return result

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until at least ``count`` messages were delivered; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(found)} of {count} messages delivered after {timeout}s; "
                    f"queue: {self.queue_summary()}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def clear_messages(self) -> None:
        """Delete every delivered message."""
        for path in self.message_paths():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def queue_summary(self) -> str:
        """Counts of queue files per queue (incoming, active, deferred...)."""
        counts = []
        for name in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            folder = self._queue_dir / name
            if folder.is_dir():
                n = sum(len(files) for _, _, files in os.walk(folder))
                counts.append(f"{name}={n}")
        return " ".join(counts) or "no queue"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the Postfix, command and Dovecot logs."""
        parts = []
        for path in (self._log_path, self._command_log_path, self._dovecot_log_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or "(no logs)"

    # -- start / stop -----------------------------------------------------

    def start(self) -> Self:
        """Write the configuration, start Dovecot and Postfix, wait for the ports."""
        if self._running:
            return self
        reason = available()
        if reason is not None:
            raise PeerError(reason)
        try:
            self._prepare()
            # Dovecot first: an smtpd that finds no SASL socket exits, and the
            # master then throttles that service for a minute.
            self._start_dovecot()
            self._wait_for_auth_socket()
            attempts = 1 if self._fixed_ports is not None else 4
            for attempt in range(1, attempts + 1):
                if self._fixed_ports is None:
                    self._ports = PeerPorts(*free_ports(3))
                self._write_postfix_config()
                try:
                    self._start_postfix()
                    break
                except PeerError:
                    in_use = "Address already in use" in self._read(self._log_path)
                    if attempt == attempts or not in_use:
                        raise
                    self._stop_postfix()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._running = True
        _LIVE.add(self)
        return self

    def stop(self) -> None:
        """Stop Postfix and Dovecot and wait for them; safe to call repeatedly."""
        errors: list[str] = []
        try:
            self._stop_dovecot()
        except Exception as exc:
            errors.append(f"dovecot: {exc}")
        try:
            self._stop_postfix()
        except Exception as exc:
            errors.append(f"postfix: {exc}")
        self._running = False
        _LIVE.discard(self)
        try:
            self._release_runtime_dir()
        except Exception as exc:
            errors.append(f"cleanup: {exc}")
        if errors:
            raise PeerError("; ".join(errors))

    # -- internals: configuration ----------------------------------------

    def _prepare(self) -> None:
        postfix_user = pwd.getpwnam("postfix")
        dovecot_gid = grp.getgrnam("dovecot").gr_gid if _group_exists("dovecot") else 0
        mail_uid = pwd.getpwnam(_MAIL_UID_NAME).pw_uid
        mail_gid = grp.getgrnam(_MAIL_GID_NAME).gr_gid

        self._workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self._log_path, self._command_log_path, self._dovecot_log_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._config_dir.mkdir(mode=0o755, exist_ok=True)
        # A fresh queue: nothing left over from an earlier run gets delivered.
        shutil.rmtree(self._queue_dir, ignore_errors=True)
        self._queue_dir.mkdir(mode=0o755)
        os.chown(self._queue_dir, 0, 0)
        os.chmod(self._queue_dir, 0o755)

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self._cert_src, self._key_src
            )
        except (OSError, ssl.SSLError) as exc:
            raise PeerError(
                f"unusable certificate {self._cert_src} / key {self._key_src}: {exc}"
            ) from exc
        cert = self._config_dir / "smtpd-cert.pem"
        key = self._config_dir / "smtpd-key.pem"
        shutil.copyfile(self._cert_src, cert)
        os.chmod(cert, 0o644)
        with contextlib.suppress(FileNotFoundError):
            key.unlink()
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self._key_src.read_bytes())

        runtime = Path(tempfile.mkdtemp(prefix=f"txc-peer-{self._tag[:6]}-", dir="/tmp"))
        self._runtime_dir = runtime
        os.chmod(runtime, 0o755)

        # Postfix's data_directory and the Maildir are used by unprivileged
        # processes: keep them under workdir only if those can reach it.
        home = self._workdir if _traversable_by_others(self._workdir) else runtime
        self._data_dir = home / "data"
        self._data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self._data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        if self._maildir_link.is_symlink():
            self._maildir_link.unlink()
        base = home / "mailboxes"
        base.mkdir(mode=0o755, exist_ok=True)
        os.chown(base, mail_uid, mail_gid)
        self._mailbox_base = base
        maildir = base / "Maildir"
        if base.parent == self._workdir:
            # Keep messages from an earlier run out of this run's Maildir.
            shutil.rmtree(maildir, ignore_errors=True)
        if self._maildir_link.exists():
            shutil.rmtree(self._maildir_link)
        for sub in ("", "tmp", "new", "cur"):
            folder = maildir / sub
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chown(folder, mail_uid, mail_gid)
        self._maildir_link.symlink_to(maildir)

        # Dovecot: own base_dir and state_dir, users in a passwd-file.
        (runtime / "dovecot").mkdir(mode=0o755)
        (runtime / "dovecot-state").mkdir(mode=0o750)
        users_file = runtime / "users"
        users_file.write_text(
            "".join(f"{name}:{{PLAIN}}{password}::::::\n" for name, password in self._users.items())
        )
        os.chown(users_file, 0, dovecot_gid)
        os.chmod(users_file, 0o640)
        (self._config_dir / "dovecot.conf").write_text(self._dovecot_conf())

        (self._config_dir / "recipient_access").write_text(
            "# local parts that test per-recipient failures\n"
            "/^refuse[^@]*@/  550 5.1.1 No such user here (test peer)\n"
            "/^later[^@]*@/   450 4.2.1 Mailbox busy, try later (test peer)\n"
        )

    def _auth_socket(self) -> Path:
        assert self._runtime_dir is not None
        return self._runtime_dir / "auth-postfix"

    def _dovecot_conf(self) -> str:
        assert self._runtime_dir is not None
        mail_uid = pwd.getpwnam(_MAIL_UID_NAME).pw_uid
        mail_gid = grp.getgrnam(_MAIL_GID_NAME).gr_gid
        return f"""\
# Auth-only Dovecot for the txcolombe Postfix test peer (generated).
instance_name = txc-dovecot-{self._tag}
base_dir = {self._runtime_dir}/dovecot
state_dir = {self._runtime_dir}/dovecot-state
log_path = {self._dovecot_log_path}
protocols =
listen = 127.0.0.1
ssl = no
shutdown_clients = yes
disable_plaintext_auth = no
auth_mechanisms = plain login scram-sha-256
auth_failure_delay = 0
auth_verbose = yes
auth_cache_size = 0
# No per-IP penalty (exponential delays after a failed AUTH) for tests.
login_trusted_networks = 127.0.0.0/8 ::1
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self._runtime_dir}/users
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home=/nonexistent
}}
service auth {{
  unix_listener {self._auth_socket()} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""

    def _main_cf(self) -> dict[str, str]:
        assert self._mailbox_base is not None
        mail_uid = pwd.getpwnam(_MAIL_UID_NAME).pw_uid
        mail_gid = grp.getgrnam(_MAIL_GID_NAME).gr_gid
        no_relay = "error:5.7.1 the txcolombe test peer does not relay"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self._queue_dir),
            "data_directory": str(self._data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"postfix-txc-{self._tag}",
            "maillog_file": str(self._log_path),
            "maillog_file_prefixes": str(self._workdir),
            # Postfix's default minus X11; the daemons get a clean environment.
            "import_environment": (
                "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
            ),
            "myhostname": self._hostname,
            "mydomain": self._domains[0],
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "relay_domains": "",
            "virtual_mailbox_domains": " ".join(self._domains),
            "virtual_mailbox_base": str(self._mailbox_base),
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{mail_uid}",
            "virtual_gid_maps": f"static:{mail_gid}",
            "virtual_minimum_uid": "1",
            "virtual_mailbox_limit": "0",
            "mailbox_size_limit": "0",
            "default_transport": no_relay,
            "relay_transport": no_relay,
            "smtputf8_enable": "yes",
            "message_size_limit": str(self._message_size_limit),
            "smtpd_banner": "$myhostname ESMTP Postfix (txcolombe test peer)",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": (
                f"check_recipient_access regexp:{self._config_dir}/recipient_access"
            ),
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_junk_command_limit": "100000",
            "smtpd_client_event_limit_exceptions": "$mynetworks",
            "in_flow_delay": "0",
            "smtpd_tls_cert_file": str(self._config_dir / "smtpd-cert.pem"),
            "smtpd_tls_key_file": str(self._config_dir / "smtpd-key.pem"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_auth_only": "no",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_session_cache_database": "",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(self._auth_socket()),
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_sasl_authenticated_header": "yes",
            "broken_sasl_auth_clients": "no",
            "smtp_tls_security_level": "none",
            "delay_warning_time": "0",
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            "notify_classes": "",
        }
        settings.update(self._main_cf_extra)
        return settings

    def _master_cf(self) -> str:
        ports = self.ports
        tag = self._tag
        submission_restrictions = (
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            if self._submission_requires_auth
            else ""
        )
        services = [
            # service  type  private unpriv chroot wakeup maxproc command
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = [
            "# Private master.cf of the txcolombe Postfix test peer (generated).",
            f"127.0.0.1:{ports.smtp} inet n - n - - smtpd",
            f"  -o syslog_name=postfix-txc-{tag}/smtp",
            f"127.0.0.1:{ports.smtps} inet n - n - - smtpd",
            f"  -o syslog_name=postfix-txc-{tag}/smtps",
            "  -o smtpd_tls_wrappermode=yes",
            "  -o smtpd_tls_security_level=encrypt",
            f"127.0.0.1:{ports.submission} inet n - n - - smtpd",
            f"  -o syslog_name=postfix-txc-{tag}/submission",
            "  -o smtpd_tls_security_level=may",
            "  -o smtpd_tls_auth_only=yes",
            submission_restrictions.rstrip("\n"),
        ]
        lines = [line for line in lines if line]
        lines += ["{:<11}{:<11}{:<8}{:<7}{:<7}{:<7}{:<8}{}".format(*row) for row in services]
        return "\n".join(lines) + "\n"

    def _write_postfix_config(self) -> None:
        main = "".join(f"{key} = {value}\n" for key, value in self._main_cf().items())
        header = "# Private main.cf of the txcolombe Postfix test peer (generated).\n"
        (self._config_dir / "main.cf").write_text(header + main)
        (self._config_dir / "master.cf").write_text(self._master_cf())
        # "postfix start" waits ~2 s while main.cf is newer than a second or
        # so (it wants later edits to be detectable): backdate the files.
        past = time.time() - 10
        for name in ("main.cf", "master.cf", "recipient_access"):
            os.utime(self._config_dir / name, (past, past))

    # -- internals: processes --------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60.0) -> int:
        """Run ``postfix -c <config_dir> args``; output goes to the command log."""
        postfix = _which("postfix")
        if postfix is None:
            raise PeerError("postfix is not installed")
        # Output goes to a file, not a pipe: the daemonised master inherits it.
        with self._command_log_path.open("ab") as log:
            log.write(f"$ postfix -c {self._config_dir} {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.run(
                [postfix, "-c", str(self._config_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_clean_env(),
                timeout=timeout,
                check=False,
            )
        return proc.returncode

    def _start_postfix(self) -> None:
        # Only log lines after this point count when judging this attempt.
        try:
            self._log_mark = self._log_path.stat().st_size
        except OSError:
            self._log_mark = 0
        self._postfix_started = True
        code = self._postfix("start")
        if code != 0:
            raise PeerError(f"postfix start exited with {code}\n{self.log_tail()}")

    def _master_pid(self) -> int | None:
        try:
            text = (self._queue_dir / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _stop_postfix(self) -> None:
        if not self._postfix_started:
            return
        marker = f"MAIL_CONFIG={self._config_dir}".encode()
        pid = self._master_pid()
        if pid is not None and _pid_alive(pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("abort", timeout=15)
            if _wait_gone([pid], 5.0):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                _wait_gone([pid], 5.0)
        # Anything still running from this instance (children outliving the
        # master, a master whose pid file was never written...).
        leftovers = _pids_with_environ(marker)
        for leftover in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(leftover, signal.SIGKILL)
        still = _wait_gone(leftovers, 5.0)
        self._postfix_started = False
        if still:
            raise PeerError(f"Postfix processes would not die: {still}")

    def _start_dovecot(self) -> None:
        dovecot = _which("dovecot")
        if dovecot is None:
            raise PeerError("dovecot is not installed")
        # The child keeps its own copy of the log's descriptor.
        with self._dovecot_log_path.open("ab") as log:
            self._dovecot = subprocess.Popen(
                [dovecot, "-F", "-c", str(self._config_dir / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=_clean_env({"TXCOLOMBE_PEER": self._tag}),
                start_new_session=True,
            )

    def _stop_dovecot(self) -> None:
        proc = self._dovecot
        if proc is None:
            return
        # Dovecot runs in its own session and process group (start_new_session)
        # and holds no state we keep: kill the whole group at once (SIGTERM
        # makes its master wait a second for its children).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self._dovecot = None
        leftovers = _pids_with_environ(b"TXCOLOMBE_PEER=" + self._tag.encode())
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if _wait_gone(leftovers, 5.0):
            raise PeerError(f"Dovecot processes would not die: {leftovers}")

    def _release_runtime_dir(self) -> None:
        runtime = self._runtime_dir
        if runtime is None:
            return
        base = self._mailbox_base
        if base is not None and runtime in base.parents:
            # Bring the Maildir home so messages() still works after stop().
            if self._maildir_link.is_symlink():
                self._maildir_link.unlink()
            if (base / "Maildir").exists():
                shutil.move(str(base / "Maildir"), str(self._maildir_link))
        shutil.rmtree(runtime, ignore_errors=True)
        self._runtime_dir = None

    def _wait_for_auth_socket(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        socket_path = self._auth_socket()
        while not socket_path.is_socket():
            if self._dovecot is not None and self._dovecot.poll() is not None:
                raise PeerError(
                    f"dovecot exited with {self._dovecot.returncode}\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"no Dovecot auth socket {socket_path} after {self._start_timeout}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        ports = self.ports
        pending: dict[str, int] = {
            "smtp": ports.smtp,
            "smtps": ports.smtps,
            "submission": ports.submission,
        }
        last_error = ""
        while True:
            if self._dovecot is not None and self._dovecot.poll() is not None:
                raise PeerError(
                    f"dovecot exited with {self._dovecot.returncode}\n{self.log_tail()}"
                )
            for name, port in list(pending.items()):
                log = self._read(self._log_path)[self._log_mark :]
                if any(sign in log for sign in _FAILURE_SIGNS):
                    raise PeerError(f"Postfix failed to start: {last_error}\n{self.log_tail()}")
                try:
                    self._probe(port, implicit_tls=name == "smtps", timeout=1.0)
                except (OSError, ssl.SSLError) as exc:
                    last_error = f"{name} port {port}: {exc}"
                else:
                    del pending[name]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"peer not ready after {self._start_timeout}s: {last_error}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _probe(self, port: int, *, implicit_tls: bool, timeout: float) -> None:
        """Connect, read the 220 banner and say QUIT."""
        with socket.create_connection((self.host, port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if implicit_tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(raw, server_hostname=self._hostname)
            with sock:
                self._banner_and_quit(sock)

    @staticmethod
    def _banner_and_quit(sock: socket.socket) -> None:
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            banner += chunk
        if not banner.startswith(b"220"):
            raise ConnectionError(f"unexpected banner {banner!r}")
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
            sock.recv(1024)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_bytes().decode("latin-1")
        except OSError:
            return ""


# Peers still running when the interpreter exits are stopped then, so an
# aborted test session leaves no daemons behind (SIGKILL still would).
_LIVE: weakref.WeakSet[PostfixPeer] = weakref.WeakSet()


@atexit.register
def _stop_live_peers() -> None:
    for peer in list(_LIVE):
        with contextlib.suppress(Exception):
            peer.stop()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
