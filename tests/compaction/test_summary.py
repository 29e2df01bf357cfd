"""The summary call's headers: the call's own, with one credential as the call sent."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway.compaction.summary import carried_headers


def test_the_summary_call_sends_only_the_credential_that_went_upstream() -> None:
    headers = CIMultiDict(
        {
            "Authorization": "Bearer sk-same",
            "x-api-key": "sk-same",
            "anthropic-version": "2023-06-01",
            "Cookie": "not carried",
        }
    )
    carried = carried_headers(headers, drop="authorization")
    assert carried["x-api-key"] == "sk-same"
    assert "Authorization" not in carried
    assert carried["anthropic-version"] == "2023-06-01"
    assert "Cookie" not in carried
    assert carried_headers(headers)["Authorization"] == "Bearer sk-same"
