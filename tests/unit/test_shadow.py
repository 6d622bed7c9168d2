"""shadow.py: in shadow a policy rule's refusal is noted once and the call goes on; anything else refuses."""

import pytest

from agentkeys.calls import Denial
from agentkeys.providers.base import DenyKind
from agentkeys.shadow import Rule, Rulings


def refuse(rule: Rule | None):
    raise Denial(DenyKind.FORBIDDEN, f"agentkeys: broke {rule}", rule=rule)


def test_in_shadow_each_rule_broken_is_noted_once_and_the_steps_go_on():
    rulings = Rulings(shadow=True)
    for rule in (Rule.MODEL, Rule.BUDGET, Rule.MODEL):
        assert rulings.check(refuse, rule) is None
    assert [denial.rule for denial in rulings.broken] == [Rule.MODEL, Rule.BUDGET]
    assert rulings.check(lambda: "kind") == "kind"


def test_enforcing_the_first_rule_broken_refuses():
    with pytest.raises(Denial, match="broke Rule.MODEL"):
        Rulings(shadow=False).check(refuse, Rule.MODEL)


def test_a_refusal_that_is_no_policy_rule_refuses_in_shadow_too():
    rulings = Rulings(shadow=True)
    with pytest.raises(Denial, match="broke None"):
        rulings.check(refuse, None)
    assert rulings.broken == []
