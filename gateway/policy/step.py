"""The policy step of the pipeline: from an exchange to a ``Decision``, and the one way a call
is refused.

Everything web-shaped about the policy is here (the app's store, policy and settings, the
exchange's headers); ``decide`` only sees values. Every step that refuses a call (this one,
compaction's overflow, the counted limits of ``accounting.begin_turn``) does it through
``reject``, so a refusal is noted with the session once, in one shape.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NoReturn

from gateway.appkeys import POLICY, STORE, TOKENS
from gateway.errors import ContextOverflow, PolicyRejection
from gateway.exchange import Exchange
from gateway.loops import Detection
from gateway.policy import decide
from gateway.policy.decide import Decision, PolicyStop
from gateway.policy.verdicts import Verdict, loop_verdict


async def decide_policy(ex: Exchange, *, noted: Sequence[Detection] = ()) -> None:
    """The policy's verdict before anything is counted: size, model, input size, loops.

    A stop decided on a kept copy of the session (``Store.current``: Redis) is checked against
    the session as it is first: another replica's grant may have lifted it since. ``noted``:
    detections already kept with the session for this call (decided once on a copy the store
    found behind, and now again)."""
    assert ex.identity is not None
    try:
        ex.decision = _decide(ex)
    except PolicyStop as stop:
        if not await _overtaken(ex):
            await reject(ex, stop.verdict)
    else:
        decision = ex.decision
        if not decision.detections:
            return
        stops = loop_verdict(decision, ex.identity.session_id, ex.record) is not None
        if not stops or not await _overtaken(ex):
            await detected(ex, decision, noted=noted)
            return
    try:  # once more, on the session as it is now
        ex.decision = _decide(ex)
    except PolicyStop as stop:
        await reject(ex, stop.verdict)
    if ex.decision.detections:
        await detected(ex, ex.decision, noted=noted)


def _decide(ex: Exchange) -> Decision:
    assert ex.identity is not None and ex.facts is not None and ex.dialect is not None
    app, facts = ex.app, ex.facts
    policy = app[POLICY].policy
    principal = ex.principal
    scopes = principal.scopes if principal is not None else frozenset()
    who = decide.caller(policy, ex.identity, facts.model, ex.request.headers, scopes)
    ex.team = who.team
    call = decide.Call(
        who,
        ex.dialect,
        facts,
        ex.record,
        time.time(),
        len(ex.raw),
        ex.body_hash,
        ex.helper_call,
    )
    return decide.decide(policy, call, app[TOKENS])


async def _overtaken(ex: Exchange) -> bool:
    """Whether the session read for the call has changed since (a kept copy another replica
    overtook); if so ``ex.record`` is now the session as it is. One read, on a stop only."""
    assert ex.identity is not None
    if ex.record is None:
        return False
    fresh = await ex.app[STORE].get(ex.identity.session_id)
    if fresh is not None and fresh.rev == ex.record.rev:
        return False
    ex.record = fresh  # None: the session is gone (expired): decided as a new one
    return True


async def detected(ex: Exchange, decision: Decision, *, noted: Sequence[Detection] = ()) -> None:
    """Loops were found: each is kept with the session (but those ``noted`` for this call
    already), and the stop they call for (pausing the session first, if the policy says so) is
    made, unless the policy only flags them."""
    assert ex.identity is not None
    store, identity = ex.app[STORE], ex.identity
    kept = {(d.detector, d.tool) for d in noted}
    for detection in decision.detections:
        if (detection.detector, detection.tool) in kept:
            continue
        at = time.time()
        event = {"key": f"{detection.detector}:{detection.tool}", "at": at, **detection.evidence()}
        await store.note(identity, at, "detections", event)
    verdict = loop_verdict(decision, identity.session_id, ex.record)
    if verdict is None:
        return
    if decision.effective.settings.loops.action == "pause":
        reason = f"paused by the loop rule: {decision.detections[0].describe()}"
        await store.set_status(identity.session_id, "paused", reason)
    await reject(ex, verdict)


async def warn(ex: Exchange, warnings: list[str]) -> None:
    """Past ``warn_at`` of a limit: the answer's headers say so (``decision.warnings``), and the
    session keeps it. Called only when there is something to say (no coroutine otherwise)."""
    assert ex.identity is not None and ex.decision is not None
    ex.decision.warnings = warnings
    at = time.time()
    kinds = ",".join(w.split(" ", 1)[0] for w in warnings)
    await ex.app[STORE].note(
        ex.identity, at, "warnings", {"key": kinds, "at": at, "warnings": warnings}
    )


async def reject(ex: Exchange, verdict: Verdict) -> NoReturn:
    """The one place a call is refused: noted with its session (a rejected call, not a turn)
    and answered as the verdict says, an overflow as the provider's own error."""
    assert ex.identity is not None
    at = time.time()
    event = {"key": verdict.limit, "at": at, "limit": verdict.limit, "rule": verdict.rule}
    await ex.app[STORE].note(ex.identity, at, "rejections", event, rejected=True)
    if verdict.overflow:
        raise ContextOverflow(verdict.message, rule=verdict.rule)
    raise PolicyRejection(
        verdict.message, limit=verdict.limit, rule=verdict.rule, retry_after=verdict.retry_after
    )
