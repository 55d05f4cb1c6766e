"""txcolombe: send email from Twisted, directly (:func:`sendmail`) or through a
submission server (:func:`submit`); a port of colombe's ``sendmail-lwt``.
"""

from txcolombe.address import Mailbox
from txcolombe.api import sendmail, submit
from txcolombe.auth import Authentication, Mechanism
from txcolombe.deliver import deliver
from txcolombe.dkim import DKIMSigner
from txcolombe.dsn import DSN, Notify, Recipient, Return
from txcolombe.errors import *  # noqa: F403 - the error classes are public API
from txcolombe.errors import __all__ as _error_names
from txcolombe.extensions import Extensions
from txcolombe.machine import TLSMode
from txcolombe.mtasts import MTASTS, PolicyCache
from txcolombe.outcome import Attempt, DeliveryResult, DeliveryStatus, Outcome, TLSStatus
from txcolombe.pool import Pool
from txcolombe.protocol import Timeouts
from txcolombe.receipt import Receipt, TLSInfo
from txcolombe.reply import Reply
from txcolombe.routing import AddressPreference
from txcolombe.session import Session, connect
from txcolombe.tlspolicy import TLSLevel, TLSPolicy

__all__ = [
    "MTASTS",
    "AddressPreference",
    "Attempt",
    "DKIMSigner",
    "DeliveryResult",
    "DeliveryStatus",
    "Outcome",
    "PolicyCache",
    "Pool",
    "TLSLevel",
    "TLSPolicy",
    "TLSStatus",
    "deliver",
    "DSN",
    "Authentication",
    "Extensions",
    "Mailbox",
    "Mechanism",
    "Notify",
    "Receipt",
    "Recipient",
    "Reply",
    "Return",
    "Session",
    "TLSInfo",
    "TLSMode",
    "Timeouts",
    "connect",
    "sendmail",
    "submit",
    *_error_names,
]
