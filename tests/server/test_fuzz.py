"""The OpenAPI schema FastAPI generates, fuzzed with schemathesis: valid and invalid requests alike never get a 5xx.
Generated max_tokens are capped at 2 so that a few hundred cases stay cheap on the interpreted model."""
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

from tests.server.conftest import MODEL

pytestmark = pytest.mark.filterwarnings("ignore")


def cheap(case) -> None:
    """Names the served model (a random name only ever meets the 404) and caps the tokens a valid request asks for (a
    missing max_tokens would default to 16 or the whole context)."""
    if isinstance(case.body, dict) and case.operation.method.upper() == "POST":
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        max_tokens = case.body.get("max_tokens")
        if max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 2):
            case.body["max_tokens"] = 2


@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 60), (GenerationMode.NEGATIVE, 160)])
def test_no_request_gets_a_5xx(server, mode, examples):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        cheap(case)
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    statuses: dict[int, int] = {}
    fuzz()
    assert mode is GenerationMode.NEGATIVE or statuses.get(200), "no generated request reached the engine"
