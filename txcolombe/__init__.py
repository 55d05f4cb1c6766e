"""txcolombe: send email from Twisted, directly (:func:`sendmail`) or through a
submission server (:func:`submit`); a port of colombe's ``sendmail-lwt``.
"""

from txcolombe import _moved
from txcolombe.client.api import sendmail, submit
from txcolombe.client.machine import TLSMode
from txcolombe.client.options import ConnectOptions, MessageOptions, Timeouts
from txcolombe.client.pool import Pool
from txcolombe.client.receipt import Receipt, TLSInfo
from txcolombe.client.session import Session, connect
from txcolombe.codec.address import Mailbox
from txcolombe.codec.dkim import DKIMSigner
from txcolombe.codec.dsn import DSN, Notify, Recipient, Return
from txcolombe.codec.errors import *  # noqa: F403 - the error classes are public API
from txcolombe.codec.errors import __all__ as _error_names
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, Mechanism
from txcolombe.delivery.deliver import deliver
from txcolombe.delivery.deliverer import AddressFamily, Deliverer
from txcolombe.delivery.mtasts import MTASTS, PolicyCache
from txcolombe.delivery.outcome import Attempt, DeliveryResult, DeliveryStatus, Outcome, TLSStatus
from txcolombe.delivery.routing import AddressPreference
from txcolombe.delivery.tlspolicy import TLSLevel, TLSPolicy

_moved.install()

__all__ = [
    "AddressFamily",
    "Deliverer",
    "MTASTS",
    "AddressPreference",
    "Attempt",
    "DKIMSigner",
    "ConnectOptions",
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
    "MessageOptions",
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
