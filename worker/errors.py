"""The control exceptions from which the consumer decides ack / dead-letter / retry."""

from enum import StrEnum

# Headers of a message the worker dead-letters itself.
REASON_HEADER = "x-leadrouter-reason"
ERROR_HEADER = "x-leadrouter-error"


class Reason(StrEnum):
    """Why a message was dead-lettered: the x-leadrouter-reason header."""

    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    MISSING_MESSAGE_ID = "missing_message_id"
    UNKNOWN_SOURCE = "unknown_source"
    UNKNOWN_CONTACT = "unknown_contact"
    UNKNOWN_OPERATOR = "unknown_operator"
    TOO_LARGE = "too_large"
    INVALID_PROPERTIES = "invalid_properties"
    # Set by the broker (the reason in x-death), never in our header.
    DELIVERY_LIMIT = "delivery_limit"
    EXPIRED = "expired"


BROKER_REASONS = frozenset({Reason.DELIVERY_LIMIT, Reason.EXPIRED})


class DeadLetter(Exception):
    """The message can never succeed: dead-letter it once, at once, with this reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class UserError(Exception):
    """Wrong input to an admin action: shown to the person as one line."""
