"""What nginx answers itself is an RFC 9457 problem shaped like the API's; what the API answers passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.children import free_ports
from cloud.front import DEFAULT_MAX_BODY
from cloud.settings import Settings
from tests.front.nginx import Front, assert_problem, exchange, get, needs_nginx, running_front

pytestmark = needs_nginx

HEAD = b"Host: front\r\n"
POST = b"POST /api/v1/cohorts HTTP/1.1\r\n" + HEAD
CHUNK = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"  # 64 KiB


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"G@T /healthz HTTP/1.1\r\n" + HEAD + b"\r\n", 400, id="invalid method"),
        pytest.param(b"GET /a b HTTP/1.1\r\n" + HEAD + b"\r\n", 400, id="space in the target"),
        pytest.param(b"\x16\x03\x01\x02\x00 not http\r\n\r\n", 400, id="not HTTP"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + HEAD + b"No colon\r\n\r\n", 400, id="header without colon"
        ),
        pytest.param(
            POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, id="two Content-Lengths"
        ),
        pytest.param(b"GET /healthz HTTP/2.0\r\n" + HEAD + b"\r\n", 505, id="HTTP/2.0 request line"),
        pytest.param(POST + b"Transfer-Encoding: gzip\r\n\r\n", 501, id="unknown transfer coding"),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n", 414, id="request line 9 KB"),
        pytest.param(
            b"GET / HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, id="header 9 KB"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\n"
            + HEAD
            + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 7000) for i in range(5))
            + b"\r\n",
            431,
            id="headers 35 KB",
        ),
        pytest.param(
            POST + b"Content-Length: %d\r\n\r\n" % (DEFAULT_MAX_BODY + 1), 413, id="Content-Length 1 MiB + 1"
        ),
        pytest.param(
            POST + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK * 17 + b"0\r\n\r\n",
            413,
            id="chunked 1 MiB + 64 KiB",
        ),
        pytest.param(
            b"GET /.front/problem HTTP/1.1\r\n" + HEAD + b"\r\n", 404, id="the front's own location"
        ),
    ],
)
def test_a_request_the_front_refuses_gets_a_problem_with_the_right_status(
    front: Front, raw: bytes, status: int
) -> None:
    # Execute
    answer = exchange(front.plain_port, raw)

    # Assert
    assert_problem(answer, status)


def test_the_front_refuses_bodies_from_the_apis_own_limit_on(front: Front) -> None:
    # Prepare: a body of exactly the limit, and one byte more
    assert front.limits.max_body_bytes == Settings.model_fields["api_max_body_bytes"].default == 1 << 20
    limit = front.limits.max_body_bytes
    at_limit = POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % limit + b"a" * limit

    # Execute
    passed = exchange(front.plain_port, at_limit)
    refused = exchange(front.plain_port, POST + b"Content-Length: %d\r\n\r\n" % (limit + 1))

    # Assert: the first reached the API (which wants credentials first), the second never left the front
    assert passed.status == 401 and "WWW-Authenticate" in passed.headers
    problem = assert_problem(refused, 413)
    assert problem["detail"] == f"the request body is larger than {limit} bytes"  # the API's own words


def test_plain_http_sent_to_the_tls_port_gets_a_problem(front: Front) -> None:
    answer = exchange(front.tls_port, b"GET /healthz HTTP/1.1\r\n" + HEAD + b"\r\n")

    assert_problem(answer, 400)


def test_the_apis_own_answers_pass_through_untouched(front: Front) -> None:
    # Execute
    health = get(front.plain_port, "/healthz")
    unauthorized = get(front.plain_port, "/api/v1/devices")

    # Assert: the API's 401 keeps its challenge and its own detail (nginx intercepts no upstream error)
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert "WWW-Authenticate" in unauthorized.headers
    problem = assert_problem(unauthorized, 401)
    assert "API key" in str(problem["detail"])
    assert unauthorized.headers["Server"] == "nginx"  # no version (server_tokens off)


def test_an_api_that_is_down_is_a_502_problem_with_retry_after(
    tmp_path: Path, lab_certs: Path, open_files: int
) -> None:
    # Prepare: a front whose upstream port nobody listens on
    (closed_port,) = free_ports(1)
    with running_front(tmp_path / "front", upstream_port=closed_port, certs=lab_certs) as down:
        # Execute
        answer = get(down.plain_port, "/healthz")

    # Assert
    assert_problem(answer, 502)
    assert answer.headers["Retry-After"] == "5"
