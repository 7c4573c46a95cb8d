"""Property-based check of the whole API against its own OpenAPI document (schemathesis).

Every operation in /api/v1/openapi.json gets generated requests (valid and odd ones) with an
admin token; every answer must be a non-5xx, with a declared status code, content type and a
body that matches the declared schema. Bounded (derandomized, few examples per operation) so CI
stays quick and reproducible.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import pytest
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from hypothesis.internal.conjecture import utils as conjecture_utils

from messaging import broker

with warnings.catch_warnings():  # schemathesis 3 still subclasses jsonschema's deprecated RefResolver
    warnings.simplefilter("ignore", DeprecationWarning)
    import schemathesis

    # not_a_server_error imports schemathesis.specs.graphql.schemas on its first call. Imported
    # here, at collection, so that import (and pytest's rewrite of it, an ast.parse) does not run
    # while other threads of the test process run: CPython 3.11.7 can fail such a parse with
    # "SystemError: AST constructor recursion depth mismatch" (seen once in this suite).
    import schemathesis.specs.graphql.schemas
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # ninja writes OpenAPI 3.1; schemathesis 3 checks it with its 3.0 machinery (works for these schemas).
    schema = schemathesis.from_wsgi("/api/v1/openapi.json", get_wsgi_application(), force_schema_version="30")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _many_more(self: Any) -> bool:
    """hypothesis-jsonschema 0.23 (which schemathesis 3 uses for object bodies) drives
    `many` with `while elements.more():`; Hypothesis 6.170 made `many` a context manager
    you iterate. This is the old call on top of the new one: enter, step, exit when done."""
    iterator = getattr(self, "_pegasus_iterator", None)
    if iterator is None:
        self.__enter__()
        iterator = self._pegasus_iterator = iter(self)
    try:
        next(iterator)
    except StopIteration:
        self.__exit__(None, None, None)
        return False
    return True


if not hasattr(conjecture_utils.many, "more"):
    conjecture_utils.many.more = _many_more  # type: ignore[attr-defined]


@schema.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Send about half the generated names to the existing destination "0", so that requests
    get past the 404 into the operation itself (the other half stay random: unknown names)."""
    if not path_parameters:
        return path_parameters
    return {
        key: "0" if key in {"name", "topic"} and zlib.crc32(str(value).encode()) % 2 else value
        for key, value in path_parameters.items()
    }


CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture
def admin_headers(alice: Any, token_for: Any) -> dict[str, str]:
    # Destinations with the names generators like best ("0"), so some requests get past the 404.
    queue, _ = broker.create_queue(name="0")
    broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="x"), broker.OutgoingMessage(body="y")])
    topic, _ = broker.create_topic(name="0")
    broker.create_subscription(topic=topic, name="0")
    return {"Authorization": f"Bearer {token_for(alice)}"}


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_schema(case: Any, admin_headers: dict[str, str]) -> None:
    case.call_and_validate(headers=admin_headers, checks=CHECKS)
