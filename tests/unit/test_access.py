"""Job owners and the access decision (access.py), with Llama Stack's own rule types and request context."""

import pytest
from llama_stack.core.access_control.datatypes import AccessRule
from llama_stack.core.datatypes import User
from llama_stack.core.request_headers import request_provider_data_context
from llama_stack_api.common.errors import ConflictError

from llama_stack_provider_trl.access import JobAccess, Owner, choose_key, owner_tag, public_id
from llama_stack_provider_trl.jobs import JobTable, TooManyJobs

ALICE = Owner(principal="alice", attributes={"roles": ["user"], "teams": ["ml"]})
BOB = Owner(principal="bob", attributes={"roles": ["user"], "teams": ["ml"]})
ADMIN = Owner(principal="root", attributes={"roles": ["admin"]})
ADMIN_RULE = AccessRule.model_validate({"permit": {"actions": ["read", "update", "delete"],
                                                   "resource": "post_training_job::*"},
                                        "when": "user with admin in roles"})


def test_default_is_owner_only_even_for_users_sharing_a_team():
    # Llama Stack's own default (no rules) would share resources among users with a common team
    access = JobAccess([])
    assert access.allowed("read", "j1", ALICE, ALICE)
    assert not access.allowed("read", "j1", ALICE, BOB)
    assert not access.allowed("update", "j1", ALICE, ADMIN)
    assert not access.allowed("read", "j1", None, BOB)  # a job from before authentication was on


def test_a_policy_rule_gives_admins_every_job_and_forbids_still_apply():
    forbid = AccessRule.model_validate({"forbid": {"actions": ["delete"], "resource": "post_training_job::*"},
                                        "unless": "user with admin in roles"})
    access = JobAccess([ADMIN_RULE, forbid])
    assert access.allowed("update", "j1@" + owner_tag("alice"), ALICE, ADMIN)
    assert not access.allowed("read", "j1", ALICE, BOB)
    assert not access.allowed("delete", "j1", ALICE, ALICE)  # the owner, but the policy forbids it
    assert access.allowed("update", "j1", ALICE, ALICE)


def test_without_authentication_everything_is_allowed():
    access = JobAccess([])
    assert access.allowed("delete", "j1", ALICE, None)
    assert access.shown_id("j1@" + owner_tag("alice"), ALICE, None) == "j1"


def test_the_caller_is_only_what_the_auth_middleware_set():
    # a provider-data header is parsed into the same context: a dict claiming a principal must not count
    claim = '{"__authenticated_user": {"principal": "alice", "attributes": {"roles": ["admin"]}}}'
    with request_provider_data_context({"X-LlamaStack-Provider-Data": claim}):
        assert JobAccess.caller() is None
    with request_provider_data_context({"X-LlamaStack-Provider-Data": claim}, User("bob", {"roles": ["user"]})):
        assert JobAccess.caller() == Owner(principal="bob", attributes={"roles": ["user"]})


def test_ids_are_scoped_by_owner_with_authentication_and_kept_as_they_are_without():
    alices, bobs = f"j1@{owner_tag('alice')}", f"j1@{owner_tag('bob')}"
    assert choose_key("j1", None, set()) == "j1"
    assert choose_key("j1", "alice", set()) == alices and public_id(alices) == "j1"
    assert choose_key("j1", "bob", {alices, "j1"}) == bobs  # another owner's job, or one from before auth
    with pytest.raises(ConflictError, match="already exists"):
        choose_key("j1", "alice", {alices})
    with pytest.raises(ConflictError, match="already exists"):  # without authentication every job is yours
        choose_key("j1", None, {alices})


def test_the_per_user_limit_counts_only_that_users_waiting_jobs():
    from llama_stack.core.storage.kvstore.kvstore import InmemoryKVStoreImpl

    table = JobTable(InmemoryKVStoreImpl())
    try:
        table.reserve("a1", owner="alice", max_per_owner=2)
        table.reserve("a2", owner="alice", max_per_owner=2)
        with pytest.raises(TooManyJobs, match=r"limits.max_active_jobs_per_user \(2\)"):
            table.reserve("a3", owner="alice", max_per_owner=2)
        assert table.reserve("a1", owner="bob", max_per_owner=2) == f"a1@{owner_tag('bob')}"
        table.release(f"a2@{owner_tag('alice')}")
        assert table.reserve("a3", owner="alice", max_per_owner=2) == f"a3@{owner_tag('alice')}"
    finally:
        table.close()
