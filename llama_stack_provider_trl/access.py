"""Who owns a job and who may see or act on it, decided by Llama Stack's own access-control code.

With the stack's authentication on, every job records its owner (the authenticated principal and its
attributes). Each request is checked with `llama_stack.core.access_control.is_action_allowed`, the
function Llama Stack's routing tables use for models, datasets and the rest, against the run config's
`server.auth.access_policy` (which Llama Stack hands to providers whose `get_provider_impl` takes a
`policy`) followed by one rule of our own: the owner may do anything with their job. So the default is
owner-only, and rules in run.yaml can give more (an `admin` role every job) or take away (a `forbid`).
Without authentication there is no user, `is_action_allowed` allows everything, and nothing changes.

Job ids are the client's choice, so two users may pick the same one. An authenticated user's job is
kept under the key `<id>@<owner tag>` (its record key and its directory under output_dir), so ids are
unique per owner: a 409 only ever names the caller's own job, and neither it nor the paths a job shows
reveal whether someone else used the id. Without authentication the key is the id itself, as it always
was (output_dir/<job_uuid>). A job is shown to its owner by the id they chose, to anyone else allowed to
see it (an admin) by its key, which is unique.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from llama_stack_api.common.errors import ConflictError
from pydantic import BaseModel

RESOURCE_TYPE = "post_training_job"  # access_policy rules name jobs as post_training_job::<job_uuid>
SCOPE = "@"  # never in a job_uuid (JOB_UUID_PATTERN), so a key splits back into id and owner tag
Action = Literal["create", "read", "update", "delete"]


class Owner(BaseModel):
    """The authenticated user who created a job, as Llama Stack's auth provider described them."""

    principal: str
    attributes: dict[str, list[str]] | None = None


@dataclass
class JobResource:
    """What `is_action_allowed` checks: Llama Stack's ProtectedResource shape (type, identifier, owner)."""

    identifier: str
    owner: Owner | None
    type: str = RESOURCE_TYPE


def public_id(key: str) -> str:
    """The job_uuid its owner chose, from the job's internal key."""
    return key.partition(SCOPE)[0]


def owner_tag(principal: str) -> str:
    # a hash, not the principal itself: principals may hold any character (emails, "system:sa:ns:name")
    return hashlib.sha256(principal.encode()).hexdigest()[:16]


def principal_of(owner: Owner | None) -> str | None:
    return owner.principal if owner is not None else None


def own_key(job_uuid: str, principal: str | None) -> str:
    """Where an owner's job with this id is kept; without authentication, under the id itself."""
    return job_uuid if principal is None else f"{job_uuid}{SCOPE}{owner_tag(principal)}"


def choose_key(job_uuid: str, principal: str | None, taken: Collection[str]) -> str:
    """The key for a new job, given every key in use: a 409 if the caller already has a job with this id.
    Without authentication every job is the caller's, those created with it on included."""
    key = own_key(job_uuid, principal)
    if key in taken or (principal is None and any(public_id(k) == job_uuid for k in taken)):
        raise ConflictError(f"job_uuid '{job_uuid}' already exists; choose another one")
    return key


class JobAccess:
    """The access decision for one provider: the stack's policy, then the owner's own rule."""

    def __init__(self, policy: list[Any] | None = None) -> None:
        from llama_stack.core.access_control.datatypes import AccessRule, Action, Scope

        owner_rule = AccessRule(permit=Scope(actions=list(Action)), when="user is owner",
                                description="the owner of a post-training job may do anything with it")
        self.policy = [*(policy or []), owner_rule]

    @staticmethod
    def caller() -> Owner | None:
        """The authenticated user of the current request; None without authentication.

        Only a User object set by Llama Stack's auth middleware counts: the request's provider-data
        header is parsed into the same context, so a client could put a plain dict there."""
        from llama_stack.core.datatypes import User
        from llama_stack.core.request_headers import get_authenticated_user

        user = get_authenticated_user()
        if not isinstance(user, User):
            return None
        return Owner(principal=user.principal, attributes=user.attributes)

    def allowed(self, action: Action, job_uuid: str, owner: Owner | None, user: Owner | None) -> bool:
        from llama_stack.core.access_control.access_control import is_action_allowed

        return is_action_allowed(self.policy, action, JobResource(public_id(job_uuid), owner), user)

    def check(self, action: Action, job_uuid: str, owner: Owner | None, user: Owner | None) -> None:
        """AccessDeniedError (403) unless the policy allows it; Llama Stack checks `create` the same way
        when registering its own resources."""
        from llama_stack.core.access_control.access_control import AccessDeniedError

        if not self.allowed(action, job_uuid, owner, user):
            raise AccessDeniedError(action, JobResource(public_id(job_uuid), owner), user)

    @staticmethod
    def candidate_keys(job_uuid: str, user: Owner | None) -> list[str]:
        """Where the job the caller means by this id can be: their own first, then the id taken as a key
        (another owner's job as an admin is shown it, or one created while authentication was off)."""
        if user is None:
            return [job_uuid]
        return [own_key(job_uuid, user.principal), job_uuid]

    @staticmethod
    def owns(owner: Owner | None, user: Owner | None) -> bool:
        return user is None or (owner is not None and owner.principal == user.principal)

    def shown_id(self, key: str, owner: Owner | None, user: Owner | None) -> str:
        """The id a job is shown by: the one its owner chose, or to anyone else its unique key."""
        return public_id(key) if self.owns(owner, user) else key
