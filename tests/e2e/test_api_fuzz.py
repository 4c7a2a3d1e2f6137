"""Requests generated from the live server's own /openapi.json (schemathesis): a bounded number per route, from a
fixed seed, against a real server on the tiny backbone. None may answer 5xx, and each answer must match what the
schema declares for it. The hand-written hostile suite (test_bad_input.py) keeps what a generator cannot know:
archives, NRRD headers, adapters, paths."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

EXAMPLES_PER_ROUTE = 6


def fuzz(operation, failures: list[str]) -> None:
    """``EXAMPLES_PER_ROUTE`` generated calls of ``operation``; what fails a check goes into ``failures``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case) -> None:
        response = case.call(timeout=120)
        try:
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance])
        except FailureGroup as e:  # every failing route is reported, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {response.status_code} {e}"[:600])

    call()


def test_generated_requests_never_get_a_server_error_and_answers_match_the_schema(start_server):
    import schemathesis

    # A generated train request may start a run (run_sync=true waits for it): one epoch each.
    server = start_server(("models", "hf_sam"), ("auto_scoring", "false"), ("max_epochs", "1"))
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        fuzz(operation, failures)
    requests.delete(server.url + "/train/", timeout=60)  # a generated request may have started a run
    assert len(operations) > 40, len(operations)
    assert not failures, "\n".join(failures)
