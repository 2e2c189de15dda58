"""testbed.releasepolicy: the release-policy grammar Key Vault enforces, parsed and evaluated."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.releasepolicy import (
    Condition,
    Group,
    PolicyError,
    evaluate,
    lookup,
    parse,
)

pytestmark = pytest.mark.unit

MAA = "https://sharedweu.weu.attest.azure.net"
CVM_POLICY = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": MAA + "/",
            "allOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                {
                    "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                    "equals": "azure-compliant-cvm",
                },
            ],
        }
    ],
}
CVM_CLAIMS = {
    "iss": MAA,
    "x-ms-isolation-tee": {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-cvm",
        "x-ms-sevsnpvm-guestsvn": 7,
        "x-ms-sevsnpvm-is-debuggable": False,
    },
    "secureboot": True,
}


def _single(condition: dict[str, Any], kind: str = "allOf") -> dict[str, Any]:
    return {"version": "1.0.0", "anyOf": [{"authority": MAA, kind: [condition]}]}


def test_canonical_cvm_policy_parses_and_admits_a_cvm_token() -> None:
    policy = parse(json.dumps(CVM_POLICY).encode())
    assert policy.authorities[0].rule.kind == "allOf"
    assert policy.authorities[0].rule.items[0] == Condition(
        "x-ms-isolation-tee.x-ms-attestation-type", "equals", "sevsnpvm"
    )
    assert evaluate(policy, MAA, CVM_CLAIMS).allowed


def test_failure_names_the_claim_the_expectation_and_the_value_found() -> None:
    claims = CVM_CLAIMS | {
        "x-ms-isolation-tee": {
            "x-ms-attestation-type": "sgx",
            "x-ms-compliance-status": "azure-compliant-cvm",
        }
    }
    verdict = evaluate(parse(CVM_POLICY), MAA, claims)
    assert not verdict.allowed
    assert verdict.describe() == (
        'claim \'x-ms-isolation-tee.x-ms-attestation-type\' expected equals "sevsnpvm", found "sgx"'
    )


def test_missing_claim_fails_and_says_so() -> None:
    verdict = evaluate(parse(CVM_POLICY), MAA, {"iss": MAA, "x-ms-isolation-tee": {}})
    assert verdict.failure is not None
    assert not verdict.failure.present
    assert verdict.describe().endswith("found no such claim")


def test_issuer_matches_with_or_without_trailing_slash() -> None:
    policy = parse(CVM_POLICY)
    assert evaluate(policy, MAA + "/", CVM_CLAIMS).allowed
    verdict = evaluate(policy, "https://evil.example", CVM_CLAIMS)
    assert verdict.untrusted_issuer
    assert "not an authority" in verdict.describe()


@pytest.mark.parametrize(
    "authority",
    [
        "sharedweu.weu.attest.azure.net",
        "sharedweu.weu.attest.azure.net/",
        "  SharedWEU.weu.attest.azure.net  ",
    ],
)
def test_authority_without_a_scheme_means_https(authority: str) -> None:
    """Policies are often written ``"authority": "sharedeus2.eus2.attest.azure.net"``."""
    doc = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": authority,
                "allOf": [
                    {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"}
                ],
            }
        ],
    }
    policy = parse(doc)
    assert policy.authorities[0].authority == "https://" + authority.strip()
    assert evaluate(policy, MAA, CVM_CLAIMS).allowed
    assert evaluate(policy, MAA + "/", CVM_CLAIMS).allowed
    assert policy.authorities_for(MAA) == policy.authorities
    # The issuer itself is taken as it is: a token whose iss has no scheme matches nothing.
    assert evaluate(policy, "sharedweu.weu.attest.azure.net", CVM_CLAIMS).untrusted_issuer
    assert evaluate(policy, "http://sharedweu.weu.attest.azure.net", CVM_CLAIMS).untrusted_issuer


def test_alternative_condition_value_form() -> None:
    policy = parse(
        _single(
            {
                "claim": "x-ms-isolation-tee.x-ms-attestation-type",
                "condition": "equals",
                "value": "sevsnpvm",
            }
        )
    )
    assert policy.authorities[0].rule.items[0] == Condition(
        "x-ms-isolation-tee.x-ms-attestation-type", "equals", "sevsnpvm"
    )
    assert evaluate(policy, MAA, CVM_CLAIMS).allowed


def test_keywords_match_case_insensitively_as_the_documented_ebnf_spells_them() -> None:
    doc = {
        "version": "1.0.0",
        "anyof": [{"authority": MAA, "allof": [{"claim": "secureboot", "Equals": True}]}],
    }
    assert evaluate(parse(doc), MAA, CVM_CLAIMS).allowed


@pytest.mark.parametrize(
    ("condition", "allowed"),
    [
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "greaterOrEquals": 7}, True),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "greater": 7}, False),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "less": 8}, True),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "lessOrEquals": 6}, False),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False}, True),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "notEquals": False}, False),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": 0}, False),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "equals": "7"}, False),
        ({"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-guestsvn", "greater": "1"}, False),
        ({"claim": "secureboot", "exists": True}, True),
        ({"claim": "x-ms-isolation-tee.nonexistent", "exists": False}, True),
        ({"claim": "x-ms-isolation-tee.nonexistent", "notEquals": "x"}, False),
        ({"claim": "x-ms-isolation-tee", "equals": "sevsnpvm"}, False),
    ],
)
def test_operators(condition: dict[str, Any], allowed: bool) -> None:
    assert evaluate(parse(_single(condition)), MAA, CVM_CLAIMS).allowed is allowed


def test_nested_groups() -> None:
    doc = _single(
        {
            "anyOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "tdxvm"},
                {
                    "allOf": [
                        {"claim": "secureboot", "equals": True},
                        {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                    ]
                },
            ]
        }
    )
    assert evaluate(parse(doc), MAA, CVM_CLAIMS).allowed
    verdict = evaluate(parse(doc), MAA, CVM_CLAIMS | {"secureboot": False})
    assert verdict.failure is not None
    assert verdict.failure.claim == "x-ms-isolation-tee.x-ms-attestation-type"  # first branch


def test_a_second_authority_is_tried() -> None:
    doc = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": "https://other.attest.azure.net",
                "allOf": [{"claim": "secureboot", "equals": False}],
            },
            {"authority": MAA, "anyOf": [{"claim": "secureboot", "equals": True}]},
        ],
    }
    assert evaluate(parse(doc), MAA, CVM_CLAIMS).allowed
    assert not evaluate(parse(doc), "https://other.attest.azure.net", CVM_CLAIMS).allowed


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"{not json", "policy is not JSON"),
        ([], "expected a JSON object"),
        ({"anyOf": []}, "policy.version"),
        ({"version": "2.0.0", "anyOf": [{"authority": MAA, "allOf": []}]}, "policy.version"),
        ({"version": "1.0.0", "anyOf": []}, "non-empty array of authorities"),
        ({"version": "1.0.0", "allOf": [{"authority": MAA, "allOf": []}]}, "exactly 'version' and"),
        (
            {"version": "1.0.0", "anyOf": [{"allOf": [{"claim": "a", "equals": 1}]}]},
            "missing 'authority'",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "http://maa", "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "", "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL or a host",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": 7, "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL or a host",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "maa host", "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL or a host",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "/just/a/path", "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL or a host",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": "maa?x=1", "allOf": [{"claim": "a", "equals": 1}]}],
            },
            "https:// issuer URL or a host",
        ),
        (
            {
                "version": "1.0.0",
                "anyOf": [
                    {
                        "authority": MAA,
                        "allOf": [{"claim": "a", "equals": 1}],
                        "anyOf": [{"claim": "a", "equals": 1}],
                    }
                ],
            },
            "exactly one of anyOf or allOf",
        ),
        ({"version": "1.0.0", "anyOf": [{"authority": MAA}]}, "exactly one of anyOf or allOf"),
        (_single({"claim": "a", "equals": {"nested": 1}}), "not dict"),
        (_single({"claim": "a", "equals": [1]}), "not list"),
        (_single({"claim": "a", "equals": None}), "not NoneType"),
        (_single({"claim": "a", "contains": "x"}), "unknown key(s) ['contains']"),
        (_single({"claim": "a", "equals": 1, "notEquals": 2}), "exactly one operator"),
        (_single({"claim": "a"}), "exactly one operator"),
        (_single({"equals": 1}), "needs 'claim'"),
        (_single({"claim": "a..b", "equals": 1}), "dotted claim name"),
        (_single({"claim": "a", "condition": "matches", "value": "x"}), "unknown operator"),
        (_single({"claim": "a", "condition": "equals"}), "exactly those two keys"),
        (_single({"claim": "a", "exists": "yes"}), "exists: expected true or false"),
        (_single({"anyOf": []}), "non-empty array of conditions"),
        (_single({"anyOf": [{"claim": "a", "equals": 1}], "claim": "b"}), "stands alone"),
        (
            {
                "version": "1.0.0",
                "anyOf": [{"authority": MAA, "allOf": [{"claim": "a", "equals": 1}], "AllOf": []}],
            },
            "appears twice",
        ),
    ],
)
def test_malformed_policies_are_refused_with_the_place(doc: Any, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse(doc if isinstance(doc, bytes) else json.dumps(doc))
    assert message in str(info.value)


def test_lookup_navigates_objects_only() -> None:
    claims = {"a": {"b": {"c": 1}}, "l": [{"x": 1}]}
    assert lookup(claims, "a.b.c") == 1
    assert lookup(claims, "a.b") == {"c": 1}
    missing = lookup(claims, "nope")
    assert lookup(claims, "a.b.c.d") is missing
    assert lookup(claims, "l.0.x") is missing  # arrays are not indexed


# --- properties ----------------------------------------------------------------------------

scalars = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.booleans())
claim_names = st.sampled_from(["a", "b", "t.x", "t.y"])


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    if depth >= 2 or draw(st.booleans()):
        return {"claim": draw(claim_names), "equals": draw(scalars)}
    kind = draw(st.sampled_from(["anyOf", "allOf"]))
    return {kind: draw(st.lists(trees(depth + 1), min_size=1, max_size=3))}


def _model(node: dict[str, Any], claims: dict[str, Any]) -> bool:
    """An independent reading of the semantics: exact-type equality, any/all over groups."""
    if "claim" in node:
        value: Any = claims
        for part in node["claim"].split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        want = node["equals"]
        return type(value) is type(want) and value == want
    items = node["anyOf"] if "anyOf" in node else node["allOf"]
    results = [_model(n, claims) for n in items]
    return any(results) if "anyOf" in node else all(results)


@settings(max_examples=200, deadline=None)
@given(tree=trees(), a=scalars, b=scalars, x=scalars)
def test_evaluation_agrees_with_any_and_all(tree: dict[str, Any], a: Any, b: Any, x: Any) -> None:
    claims = {"a": a, "b": b, "t": {"x": x}}
    doc = {"version": "1.0.0", "anyOf": [{"authority": MAA, "allOf": [tree]}]}
    verdict = evaluate(parse(json.dumps(doc)), MAA, claims)
    assert verdict.allowed is _model(tree, claims)
    if not verdict.allowed:
        assert verdict.failure is not None and verdict.failure.claim in {"a", "b", "t.x", "t.y"}


@settings(max_examples=200, deadline=None)
@given(tree=trees())
def test_parse_keeps_the_structure(tree: dict[str, Any]) -> None:
    doc = {"version": "1.0.0", "anyOf": [{"authority": MAA, "anyOf": [tree]}]}
    rule = parse(json.dumps(doc)).authorities[0].rule

    def shape(node: Condition | Group) -> Any:
        if isinstance(node, Condition):
            return {"claim": node.claim, node.operator: node.value}
        return {node.kind: [shape(i) for i in node.items]}

    assert shape(rule.items[0]) == tree


@settings(max_examples=300, deadline=None)
@given(
    junk=st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(
                st.sampled_from(
                    [
                        "version",
                        "anyOf",
                        "allOf",
                        "authority",
                        "claim",
                        "equals",
                        "condition",
                        "value",
                        "x",
                    ]
                ),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=12,
    )
)
def test_arbitrary_json_either_parses_or_raises_policy_error(junk: Any) -> None:
    try:
        parse(json.dumps(junk))
    except PolicyError:
        pass
