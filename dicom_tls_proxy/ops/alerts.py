"""Which association endings are security events, and how they are coded: one decision for all.

The syslog sink sends a DICOM Security Alert (PS3.15 A.5.3.11, Node Authentication) for every
connection refused because of who the peer is. The association's JSON log line, and so its line in
the audit file, carries the same classification as a `security_alert` object, so that a SIEM
reading the file can filter the very events the collector receives. Both take it from `classify`
here, so they cannot disagree: a reason added to ALERT_REASONS shows in both at once.

Pure data and one pure function: no I/O, and nothing from the package but the vocabulary, so
`audit` (the log line) and `syslogsink` both import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicom_tls_proxy.protocol.vocabulary import TLS_REASONS, Reason

SCHEME = "DCM"  # the coding scheme of every code here (PS3.16)
FIELD = "security_alert"  # the key of the classification in an association's JSON line


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value of the DCM coding scheme: `csd-code`, `originalText` (the Code Meaning)."""

    value: str
    meaning: str

    def fields(self) -> dict[str, str]:
        return {"code": self.value, "scheme": SCHEME, "meaning": self.meaning}


SECURITY_ALERT = Code("110113", "Security Alert")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")

# EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881) and what its values mean.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
OUTCOME_MEANINGS: dict[int, str] = {
    SUCCESS: "Success",
    MINOR_FAILURE: "Minor failure",
    SERIOUS_FAILURE: "Serious failure",
    MAJOR_FAILURE: "Major failure",
}

# Reasons that make a connection a Node Authentication alert; the serious ones are a peer that
# presented an identity the proxy refuses (as opposed to a misconfigured or out-of-date peer).
ALERT_REASONS: frozenset[Reason] = TLS_REASONS | {
    Reason.PLAINTEXT_ON_TLS,
    Reason.TLS_ON_PLAINTEXT,
    Reason.CALLING_AE_NOT_ALLOWED,
    Reason.PEER_NOT_ALLOWED,
    Reason.SOURCE_NOT_ALLOWED,
    Reason.UPSTREAM_TLS_FAILED,
}
SERIOUS_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.TLS_UNTRUSTED,
        Reason.TLS_THUMBPRINT_MISMATCH,
        Reason.TLS_REVOKED,
        Reason.TLS_NAME_MISMATCH,
        Reason.PEER_NOT_ALLOWED,
    }
)


@dataclass(frozen=True, slots=True)
class Classification:
    """What kind of security event an association ending is: EventID, EventTypeCode and
    EventOutcomeIndicator, as the syslog message codes them."""

    event_id: Code
    event_type: Code
    outcome: int  # MINOR_FAILURE or SERIOUS_FAILURE

    def fields(self) -> dict[str, Any]:
        """The JSON line's `security_alert` object: each code with its scheme and meaning, the
        outcome with its meaning, so a reader needs no table to make sense of it. A new dict
        each time: a sink may keep or change what it is given."""
        return {
            "event_id": self.event_id.fields(),
            "event_type": self.event_type.fields(),
            "outcome": {"code": self.outcome, "meaning": OUTCOME_MEANINGS[self.outcome]},
        }


def classify(reason: str) -> Classification | None:
    """The security event an association that ended for `reason` is, or None (a relayed
    association, a refusal that says nothing about who the peer is, such as no-route)."""
    try:
        known = Reason(reason)
    except ValueError:
        return None
    if known not in ALERT_REASONS:
        return None
    outcome = SERIOUS_FAILURE if known in SERIOUS_REASONS else MINOR_FAILURE
    return Classification(SECURITY_ALERT, NODE_AUTHENTICATION, outcome)
