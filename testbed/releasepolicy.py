"""Key Vault's Secure Key Release policy: parse the grammar, evaluate it against token claims.

The grammar (Key Vault "secure key release policy grammar"):

    policy    = {"version": "1.0.0", "anyOf": [authority, ...]}
    authority = {"authority": "<issuer URL or host>", "anyOf" | "allOf": [condition, ...]}
                                                                             (one, not both)
    condition = {"claim": "<dotted.path>", <operator>: <value>}
              | {"claim": "<dotted.path>", "condition": "<operator>", "value": <value>}
              | {"anyOf": [condition, ...]} | {"allOf": [condition, ...]}
    operator  = equals | notEquals | less | lessOrEquals | greater | greaterOrEquals | exists
    value     = string | number | true | false

Keywords match case-insensitively (the documented EBNF spells them ``anyof``/``allof`` while every
example writes ``anyOf``/``allOf``). Dots in a claim navigate nested JSON objects; arrays are not
indexed; a missing claim fails its condition (``exists: false`` is the one way to ask for absence).
``equals`` compares JSON values exactly (strings case-sensitively, ``true`` never equals ``1``);
the ordering operators compare two numbers or two strings and fail on anything else.

``parse`` raises :class:`PolicyError` for anything outside the grammar; ``evaluate`` returns a
:class:`Verdict` whose ``failure`` names the claim that did not hold, what was expected and what
the token carried, so a refusal can say exactly why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

Scalar = str | int | float | bool
GroupKind = Literal["anyOf", "allOf"]

VERSIONS = ("1.0.0",)
OPERATORS = ("equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals", "exists")
_OPERATOR_BY_KEY = {op.lower(): op for op in OPERATORS}
_GROUP_BY_KEY: dict[str, GroupKind] = {"anyof": "anyOf", "allof": "allOf"}
_MISSING = object()


class PolicyError(ValueError):
    """The policy document does not follow the release-policy grammar."""


@dataclass(frozen=True)
class Condition:
    claim: str
    operator: str
    value: Scalar


@dataclass(frozen=True)
class Group:
    kind: GroupKind
    items: tuple[Condition | Group, ...]


@dataclass(frozen=True)
class Authority:
    authority: str
    rule: Group


@dataclass(frozen=True)
class Policy:
    version: str
    authorities: tuple[Authority, ...]

    def authorities_for(self, issuer: str) -> tuple[Authority, ...]:
        """The authorities whose URL names ``issuer`` (trailing slash and host case ignored)."""
        want = normalise_authority(issuer)
        return tuple(a for a in self.authorities if normalise_authority(a.authority) == want)


@dataclass(frozen=True)
class Failure:
    """One condition that did not hold."""

    claim: str
    operator: str
    expected: Scalar
    found: Any  # the token's value; _MISSING is reported as None with present=False
    present: bool

    def describe(self) -> str:
        found = json.dumps(self.found) if self.present else "no such claim"
        return (
            f"claim '{self.claim}' expected {self.operator} {json.dumps(self.expected)}, "
            f"found {found}"
        )


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    failure: Failure | None = None  # set when a matching authority's rule failed
    untrusted_issuer: bool = False  # no authority in the policy names the token's issuer

    def describe(self) -> str:
        if self.allowed:
            return "policy satisfied"
        if self.untrusted_issuer:
            return "the token's issuer is not an authority of the release policy"
        assert self.failure is not None  # noqa: S101 - a refusal always carries its failure
        return self.failure.describe()


def normalise_authority(url: str) -> str:
    """An authority or issuer as compared: case-insensitively, without a trailing ``/``.
    (A policy's bare-host authority already became ``https://host`` when it was parsed; an
    issuer is taken as it is.)"""
    return url.strip().rstrip("/").lower()


def _key(obj: Mapping[str, Any], where: str) -> dict[str, tuple[str, Any]]:
    """Keys of ``obj`` lower-cased (original spelling kept), refusing case-only duplicates."""
    out: dict[str, tuple[str, Any]] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise PolicyError(f"{where}: keys must be strings")
        low = k.lower()
        if low in out:
            raise PolicyError(f"{where}: key {k!r} appears twice")
        out[low] = (k, v)
    return out


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, str | bool | int | float):
        return value
    raise PolicyError(
        f"{where}: a value must be a string, number, true or false, not {type(value).__name__}"
    )


def _group(kind: GroupKind, items: Any, where: str) -> Group:
    if not isinstance(items, list) or not items:
        raise PolicyError(f"{where}.{kind}: expected a non-empty array of conditions")
    return Group(kind, tuple(_condition(c, f"{where}.{kind}[{i}]") for i, c in enumerate(items)))


def _condition(obj: Any, where: str) -> Condition | Group:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected an object")
    keys = _key(obj, where)
    groups = [g for g in _GROUP_BY_KEY if g in keys]
    if groups:
        if len(keys) != 1:
            raise PolicyError(
                f"{where}: a nested anyOf/allOf stands alone, found keys "
                f"{sorted(k for k, _ in keys.values())}"
            )
        kind = _GROUP_BY_KEY[groups[0]]
        return _group(kind, keys[groups[0]][1], where)
    if "claim" not in keys:
        raise PolicyError(f"{where}: a condition needs 'claim'")
    claim = keys.pop("claim")[1]
    if not isinstance(claim, str) or not claim or any(not part for part in claim.split(".")):
        raise PolicyError(f"{where}.claim: expected a dotted claim name, found {claim!r}")
    if "condition" in keys or "value" in keys:
        if set(keys) != {"condition", "value"}:
            raise PolicyError(
                f"{where}: the 'condition'/'value' form takes exactly those two "
                f"keys besides 'claim'"
            )
        op_name = keys["condition"][1]
        if not isinstance(op_name, str) or op_name.lower() not in _OPERATOR_BY_KEY:
            raise PolicyError(
                f"{where}.condition: unknown operator {op_name!r}; expected one of "
                f"{', '.join(OPERATORS)}"
            )
        operator, raw = _OPERATOR_BY_KEY[op_name.lower()], keys["value"][1]
    else:
        ops = [k for k in keys if k in _OPERATOR_BY_KEY]
        extra = [keys[k][0] for k in keys if k not in _OPERATOR_BY_KEY]
        if extra:
            raise PolicyError(f"{where}: unknown key(s) {sorted(extra)}")
        if len(ops) != 1:
            raise PolicyError(
                f"{where}: a condition takes exactly one operator of {', '.join(OPERATORS)}"
            )
        operator, raw = _OPERATOR_BY_KEY[ops[0]], keys[ops[0]][1]
    value = _scalar(raw, f"{where}.{operator}")
    if operator == "exists" and not isinstance(value, bool):
        raise PolicyError(f"{where}.exists: expected true or false")
    return Condition(claim, operator, value)


def _authority_url(value: Any, where: str) -> str:
    """An authority as policies write it: an https URL, or a bare host (``"authority":
    "sharedeus2.eus2.attest.azure.net"``), which means ``https://`` + it."""
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}: expected an https:// issuer URL or a host, found {value!r}")
    url = value.strip()
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if (
        parts.scheme != "https"
        or not parts.hostname
        or any(c.isspace() for c in url)
        or parts.query
        or parts.fragment
    ):
        raise PolicyError(f"{where}: expected an https:// issuer URL or a host, found {value!r}")
    return url


def _authority(obj: Any, where: str) -> Authority:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected an object")
    keys = _key(obj, where)
    if "authority" not in keys:
        raise PolicyError(f"{where}: missing 'authority'")
    url = _authority_url(keys.pop("authority")[1], f"{where}.authority")
    groups = [g for g in keys if g in _GROUP_BY_KEY]
    extra = [keys[k][0] for k in keys if k not in _GROUP_BY_KEY]
    if extra:
        raise PolicyError(f"{where}: unknown key(s) {sorted(extra)}")
    if len(groups) != 1:
        raise PolicyError(f"{where}: an authority takes exactly one of anyOf or allOf")
    kind = _GROUP_BY_KEY[groups[0]]
    return Authority(url, _group(kind, keys[groups[0]][1], where))


def parse(document: bytes | str | Mapping[str, Any]) -> Policy:
    """Parse a release policy (JSON text or an already-decoded object)."""
    if isinstance(document, bytes | str):
        try:
            obj: Any = json.loads(document)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyError(f"policy is not JSON: {exc}") from None
    else:
        obj = dict(document)
    if not isinstance(obj, dict):
        raise PolicyError("policy: expected a JSON object")
    keys = _key(obj, "policy")
    version = keys.pop("version", (None, None))[1]
    if version not in VERSIONS:
        raise PolicyError(
            f"policy.version: expected one of {', '.join(VERSIONS)}, found {version!r}"
        )
    if set(keys) != {"anyof"}:
        raise PolicyError("policy: expected exactly 'version' and 'anyOf' (a list of authorities)")
    items = keys["anyof"][1]
    if not isinstance(items, list) or not items:
        raise PolicyError("policy.anyOf: expected a non-empty array of authorities")
    return Policy(version, tuple(_authority(a, f"policy.anyOf[{i}]") for i, a in enumerate(items)))


def lookup(claims: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` in ``claims``, or the module's missing marker.

    A top-level claim whose own name contains dots (``x-ms-sevsnpvm.foo`` is not one today, but
    the grammar cannot rule it out) is tried first, then the path is walked through objects.
    """
    if dotted in claims:
        return claims[dotted]
    node: Any = claims
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same_kind(a: Any, b: Any) -> bool:
    def kind(x: Any) -> str:
        if isinstance(x, bool):
            return "bool"
        if isinstance(x, int | float):
            return "number"
        return type(x).__name__

    return kind(a) == kind(b)


def _holds(cond: Condition, found: Any) -> bool:
    if cond.operator == "exists":
        return (found is not _MISSING) == cond.value
    if found is _MISSING:
        return False
    if cond.operator in ("equals", "notEquals"):
        equal = _same_kind(found, cond.value) and found == cond.value
        return equal if cond.operator == "equals" else not equal
    comparable = (
        _same_kind(found, cond.value)
        and isinstance(found, str | int | float)
        and (not isinstance(found, bool))
    )
    if not comparable:
        return False
    if cond.operator == "less":
        return bool(found < cond.value)
    if cond.operator == "lessOrEquals":
        return bool(found <= cond.value)
    if cond.operator == "greater":
        return bool(found > cond.value)
    return bool(found >= cond.value)  # greaterOrEquals


def _check(node: Condition | Group, claims: Mapping[str, Any]) -> Failure | None:
    if isinstance(node, Condition):
        found = lookup(claims, node.claim)
        if _holds(node, found):
            return None
        present = found is not _MISSING
        return Failure(node.claim, node.operator, node.value, found if present else None, present)
    first: Failure | None = None
    for item in node.items:
        failure = _check(item, claims)
        if node.kind == "allOf" and failure is not None:
            return failure
        if node.kind == "anyOf":
            if failure is None:
                return None
            first = first or failure
    return first


def evaluate(policy: Policy, issuer: str, claims: Mapping[str, Any]) -> Verdict:
    """Whether a token from ``issuer`` carrying ``claims`` satisfies ``policy``."""
    candidates = policy.authorities_for(issuer)
    if not candidates:
        return Verdict(False, untrusted_issuer=True)
    first: Failure | None = None
    for authority in candidates:
        failure = _check(authority.rule, claims)
        if failure is None:
            return Verdict(True)
        first = first or failure
    return Verdict(False, failure=first)
