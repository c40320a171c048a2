"""The hostile-input suite: schemathesis generates requests from the live server's OpenAPI document, valid
and invalid, and checks every answer: no server error, the status codes, content types, headers and bodies
the schema declares, invalid data refused and valid data accepted.

Bounded for the suite's time (RETINA_SCHEMATHESIS_EXAMPLES per operation and generation mode, default 25);
raise it for a deeper run, e.g. `RETINA_SCHEMATHESIS_EXAMPLES=500 pytest tests/test_schemathesis.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import positive_data_acceptance
from service_server import Served, serve

from service.settings import ServiceSettings

EXAMPLES = int(os.environ.get("RETINA_SCHEMATHESIS_EXAMPLES", "25"))
API_KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def live(paths: tuple[Path, Path, Path]) -> Iterator[Served]:
    bundle, index, _ = paths
    settings = ServiceSettings(bundle=bundle, index=index, device="cpu", api_key=API_KEY, max_upload_mb=2.0,
                               index_check_s=0)
    with serve(settings) as server:
        yield server


def _operations(live: Served) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json", headers={"X-API-Key": API_KEY})
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, live: Served) -> None:
    # Valid-by-schema data the model itself cannot read (a text with no word its tokenizer knows, a file
    # that is not a photograph) is answered 422/415 by design: the schema cannot express "readable".
    excluded = [positive_data_acceptance] if operation.path in MODEL_READS else []

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=live.url, headers={"X-API-Key": API_KEY}, excluded_checks=excluded,
                               timeout=60)

    run()


MODEL_READS = ("/search/text", "/search/image", "/grade", "/explain")


# The plugin's `schema.parametrize()` does not run under pytest 9; hypothesis drives each operation here.
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_the_api_holds_against_generated_requests(live: Served, mode: schemathesis.GenerationMode) -> None:
    operations = _operations(live)
    assert {op.path for op in operations} >= {"/search/text", "/search/image", "/grade", "/archive/{record_id}/image"}
    failures = []
    for operation in operations:
        try:
            _fuzz(operation, mode, live)
        except Unsatisfiable:
            # Only an operation without any input (GET /healthz) has no invalid request to make.
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.path
        except Exception as error:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {error}")
    assert not failures, "\n\n".join(failures)
