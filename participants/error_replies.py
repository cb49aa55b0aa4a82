"""What a device's error reply may say: the exception's type, or a refusal's own words, never the details.

When a handler raises, Flower sends the coordinator an error reply whose reason is the exception's text. That text
can name the device's folder ("/home/ann/device/history.jsonl:3: …"), a user ("duplicate id 7 of user 'ann'")
or a record's words, so `plain_errors`, a mod of the ClientApp, keeps the whole exception in the device's own log
and lets only this cross the wire:
    a Refusal (the device's limits or policy saying no)   its message, which names the setting that refused
    anything else                                         "<message type>: <ExceptionType> on the device
                                                           (its own log has the details)"
A Refusal's message must therefore name settings and numbers only, never data, paths or names.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message

log = logging.getLogger("bouquet")


class Refusal(ValueError):
    """A request the device turns down on purpose; its message is sent to the coordinator as it is."""


class DeviceError(RuntimeError):
    """What the coordinator learns of any other failure on a device: the step and the exception's type."""


def plain_errors(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: the handler's reply, or an exception whose text is safe to send."""
    try:
        return call_next(msg, context)
    except Refusal:
        raise
    except Exception as err:
        log.exception("%s failed on this device", msg.metadata.message_type)
        raise DeviceError(f"{msg.metadata.message_type}: {type(err).__name__} on the device (its own log has the "
                          f"details)") from None
