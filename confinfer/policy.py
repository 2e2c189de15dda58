"""Key Vault's release-policy grammar, evaluated against attestation-token claims.

The same grammar gates Secure Key Release in Key Vault and, locally, what attestd accepts from
MAA, so an operator writes one policy and both sides read it the same way::

    policy    = {"version": "1.0.0", "anyOf": [authority, ...]}
    authority = {"authority": "<issuer URL>", "anyOf" | "allOf": [rule, ...]}   (exactly one)
    rule      = {"claim": "<dotted.path>", <operator>: <value>}
              | {"claim": "<dotted.path>", "condition": "<operator>", "value": <value>}
              | {"anyOf": [rule, ...]} | {"allOf": [rule, ...]}
    operator  = equals | notEquals | less | lessOrEquals | greater | greaterOrEquals | exists

Semantics: an authority applies when it names the token's issuer (a trailing ``/`` and letter
case of scheme and host do not matter; an authority written without a scheme, as in
``"sharedeus2.eus2.attest.azure.net"``, means ``https://`` and that host, as Key Vault reads
it). Dots walk nested JSON objects; arrays are not indexed; a missing claim fails every operator
but ``exists: false``, and a claim that is an object, array or null fails every comparison (fail
closed; ``exists`` only asks whether it is there). Values are strings, numbers or booleans;
``equals`` never treats ``true`` as ``1``; the ordering operators compare numbers with numbers
and strings with strings. Keywords match regardless of case (the documented EBNF spells them
``anyof``/``allof``).

:func:`parse` rejects anything outside the grammar with a one-line
:class:`~confinfer.errors.ConfigError` (reason ``policy-invalid``); :func:`evaluate` raises
:class:`~confinfer.errors.PolicyError` naming the claim that failed, what was expected and what
the token carried, with ``details["claim"]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from confinfer.errors import ConfigError, PolicyError, Reason

VERSION = "1.0.0"
Value = str | int | float | bool
GroupKind = Literal["anyOf", "allOf"]

OPERATORS = ("equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals", "exists")
_OPERATOR = {name.lower(): name for name in OPERATORS}
_GROUP: dict[str, GroupKind] = {"anyof": "anyOf", "allof": "allOf"}
_SYMBOL = {
    "notEquals": "not ",
    "less": "< ",
    "lessOrEquals": "<= ",
    "greater": "> ",
    "greaterOrEquals": ">= ",
}


@dataclass(frozen=True)
class Condition:
    claim: str
    operator: str
    value: Value


@dataclass(frozen=True)
class Group:
    kind: GroupKind
    rules: tuple[Condition | Group, ...]


Rule = Condition | Group


@dataclass(frozen=True)
class Authority:
    url: str
    rule: Group


@dataclass(frozen=True)
class Policy:
    version: str
    authorities: tuple[Authority, ...]

    def for_issuer(self, issuer: str) -> tuple[Authority, ...]:
        want = normalise_issuer(issuer)
        return tuple(a for a in self.authorities if normalise_issuer(a.url) == want)


def normalise_issuer(url: str) -> str:
    """Compare issuers the way tokens and policies spell them: case-blind host, no final '/'."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


# --- parsing --------------------------------------------------------------------------------


def _invalid(where: str, message: str) -> ConfigError:
    return ConfigError(f"release policy: {where}: {message}", reason=Reason.POLICY_INVALID)


def _keys(obj: Mapping[Any, Any], where: str) -> dict[str, tuple[str, Any]]:
    """Lower-cased keys -> (spelling, value); refuses keys that differ only in case."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _invalid(where, "object keys must be strings")
        if key.lower() in out:
            raise _invalid(where, f"key {key!r} is given twice")
        out[key.lower()] = (key, value)
    return out


def _value(raw: Any, where: str) -> Value:
    if isinstance(raw, float) and not math.isfinite(raw):
        raise _invalid(where, "numbers must be finite")
    if isinstance(raw, str | bool | int | float):
        return raw
    kind = "null" if raw is None else type(raw).__name__
    raise _invalid(where, f"a value is a string, number, true or false, not {kind}")


def _group(kind: GroupKind, raw: Any, where: str) -> Group:
    where = f"{where}.{kind}"
    if not isinstance(raw, list) or not raw:
        raise _invalid(where, "expected a non-empty array")
    return Group(kind, tuple(_rule(item, f"{where}[{i}]") for i, item in enumerate(raw)))


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise _invalid(where, "expected an object")
    keys = _keys(raw, where)
    groups = [k for k in keys if k in _GROUP]
    if groups:
        if len(keys) != 1:
            raise _invalid(
                where,
                "anyOf/allOf must stand alone in its object "
                f"(found {sorted(s for s, _ in keys.values())})",
            )
        return _group(_GROUP[groups[0]], keys[groups[0]][1], where)
    if "claim" not in keys:
        raise _invalid(where, "a condition needs a 'claim'")
    claim = keys.pop("claim")[1]
    if not isinstance(claim, str) or not claim or "" in claim.split("."):
        raise _invalid(f"{where}.claim", f"expected a dotted claim name, got {claim!r}")
    if "condition" in keys or "value" in keys:
        if set(keys) != {"condition", "value"}:
            raise _invalid(
                where, "the condition/value form takes 'claim', 'condition' and 'value' only"
            )
        name = keys["condition"][1]
        if not isinstance(name, str) or name.lower() not in _OPERATOR:
            raise _invalid(
                f"{where}.condition",
                f"unknown operator {name!r} (expected one of {', '.join(OPERATORS)})",
            )
        operator, raw_value = _OPERATOR[name.lower()], keys["value"][1]
    else:
        unknown = sorted(spelling for k, (spelling, _) in keys.items() if k not in _OPERATOR)
        if unknown:
            raise _invalid(where, f"unknown key(s) {unknown}")
        if len(keys) != 1:
            raise _invalid(
                where, f"a condition takes exactly one operator of {', '.join(OPERATORS)}"
            )
        ((key, (_, raw_value)),) = keys.items()
        operator = _OPERATOR[key]
    value = _value(raw_value, f"{where}.{operator}")
    if operator == "exists" and not isinstance(value, bool):
        raise _invalid(f"{where}.exists", "expected true or false")
    return Condition(claim, operator, value)


def _authority(raw: Any, where: str) -> Authority:
    if not isinstance(raw, Mapping):
        raise _invalid(where, "expected an object")
    keys = _keys(raw, where)
    if "authority" not in keys:
        raise _invalid(where, "missing 'authority'")
    url = keys.pop("authority")[1]
    if isinstance(url, str) and "://" not in url:
        # As people write them (the tutorial's own policy): a bare host means https://.
        url = "https://" + url
    if not isinstance(url, str) or not url.startswith("https://") or not urlsplit(url).netloc:
        raise _invalid(f"{where}.authority", f"expected an https:// issuer URL, got {url!r}")
    unknown = sorted(spelling for k, (spelling, _) in keys.items() if k not in _GROUP)
    if unknown:
        raise _invalid(where, f"unknown key(s) {unknown}")
    if len(keys) != 1:
        raise _invalid(where, "an authority takes exactly one of anyOf or allOf")
    ((key, (_, rules)),) = keys.items()
    return Authority(url, _group(_GROUP[key], rules, where))


def parse(document: Policy | Mapping[str, Any] | str | bytes) -> Policy:
    """Parse and validate a release policy (JSON text, or the decoded object)."""
    if isinstance(document, Policy):
        return document
    if isinstance(document, str | bytes):
        try:
            raw: Any = json.loads(document)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid("policy", f"not JSON ({exc})") from None
        except RecursionError:
            raise _invalid("policy", "nested too deeply") from None
    else:
        raw = document
    if not isinstance(raw, Mapping):
        raise _invalid("policy", "expected a JSON object")
    keys = _keys(raw, "policy")
    version = keys.pop("version", ("version", None))[1]
    if version != VERSION:
        raise _invalid("policy.version", f"expected {VERSION!r}, got {version!r}")
    if set(keys) != {"anyof"}:
        raise _invalid("policy", "expected exactly 'version' and 'anyOf'")
    authorities = keys["anyof"][1]
    if not isinstance(authorities, list) or not authorities:
        raise _invalid("policy.anyOf", "expected a non-empty array of authorities")
    try:
        return Policy(
            version,
            tuple(_authority(a, f"policy.anyOf[{i}]") for i, a in enumerate(authorities)),
        )
    except RecursionError:
        raise _invalid("policy", "rules nested too deeply") from None


def load(path: Path) -> Policy:
    """Read and parse a policy file; errors name the file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the release policy: {exc.strerror}", reason=Reason.POLICY_INVALID
        ) from None
    try:
        return parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", reason=exc.reason) from None


# --- evaluation -----------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def lookup(claims: Mapping[str, Any], claim: str) -> Any:
    """The claim's value, or :data:`MISSING`. A literal top-level name wins over a path."""
    if claim in claims:
        return claims[claim]
    node: Any = claims
    for part in claim.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return "null" if value is None else type(value).__name__


def _holds(cond: Condition, actual: Any) -> bool:
    if cond.operator == "exists":
        return (actual is not MISSING) is cond.value
    if actual is MISSING or _kind(actual) not in ("string", "number", "boolean"):
        return False  # objects, arrays and null are not values: fail closed
    same = _kind(actual) == _kind(cond.value)
    if cond.operator == "equals":
        return same and bool(actual == cond.value)
    if cond.operator == "notEquals":
        return not (same and bool(actual == cond.value))
    if not same or isinstance(actual, bool):  # booleans have no order
        return False
    if cond.operator == "less":
        return bool(actual < cond.value)
    if cond.operator == "lessOrEquals":
        return bool(actual <= cond.value)
    if cond.operator == "greater":
        return bool(actual > cond.value)
    return bool(actual >= cond.value)


def _show(value: Any) -> str:
    if value is MISSING:
        return "nothing (claim missing)"
    if isinstance(value, Mapping | list | tuple):
        return f"an {_kind(value)}" if _kind(value) in ("object", "array") else repr(value)
    return json.dumps(value)


@dataclass(frozen=True)
class _Failure:
    claim: str
    operator: str
    expected: Value
    actual: Any

    def line(self) -> str:
        if self.operator == "exists":
            want = "to be present" if self.expected else "to be absent"
            got = "nothing (claim missing)" if self.actual is MISSING else _show(self.actual)
            return f"{self.claim}: expected {want}, got {got}"
        prefix = _SYMBOL.get(self.operator, "")
        return (
            f"{self.claim}: expected {prefix}{json.dumps(self.expected)}, got {_show(self.actual)}"
        )


def _check(rule: Rule, claims: Mapping[str, Any]) -> list[_Failure]:
    """No failures when ``rule`` holds; otherwise why (every alternative of an anyOf)."""
    if isinstance(rule, Condition):
        actual = lookup(claims, rule.claim)
        if _holds(rule, actual):
            return []
        return [_Failure(rule.claim, rule.operator, rule.value, actual)]
    failures: list[_Failure] = []
    for sub in rule.rules:
        found = _check(sub, claims)
        if rule.kind == "allOf" and found:
            return found
        if rule.kind == "anyOf":
            if not found:
                return []
            failures.extend(found)
    return failures


def evaluate(
    policy: Policy | Mapping[str, Any] | str | bytes, claims: Mapping[str, Any], issuer: str
) -> None:
    """Raise :class:`PolicyError` unless ``claims`` from ``issuer`` satisfy ``policy``."""
    parsed = parse(policy)
    authorities = parsed.for_issuer(issuer)
    if not authorities:
        named = ", ".join(a.url for a in parsed.authorities)
        raise PolicyError(
            f"iss: token issuer {issuer!r} is not an authority of the policy ({named})",
            reason=Reason.POLICY_UNTRUSTED_ISSUER,
            details={
                "claim": "iss",
                "expected": [a.url for a in parsed.authorities],
                "actual": issuer,
            },
        )
    failures: list[_Failure] = []
    for authority in authorities:
        found = _check(authority.rule, claims)
        if not found:
            return
        failures.extend(found)
    first = failures[0]
    message = first.line()
    if len(failures) > 1:
        message += f" (and {len(failures) - 1} other alternative(s) failed)"
    actual = None if first.actual is MISSING else first.actual
    raise PolicyError(
        message,
        reason=Reason.POLICY_UNSATISFIED,
        details={
            "claim": first.claim,
            "operator": first.operator,
            "expected": first.expected,
            "actual": actual if not isinstance(actual, Mapping | list) else _kind(actual),
            "present": first.actual is not MISSING,
            "failures": [f.line() for f in failures],
        },
    )
