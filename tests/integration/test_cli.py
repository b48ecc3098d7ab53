"""`fetchpool fetch` and `fetchpool stats` for people at a terminal (a real pty) and for scripts
(a pipe), against a real service and real servers (issue 13, §4 and §6)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

import pytest
from fetchpool.v1 import fetch_pb2 as pb
from support import AppServer, Nginx, free_port
from support.app import SAMPLE_TEXTS
from support.cli import run_cli
from support.fetchpool_service import FetchpoolService


def _cli(*args: str, tty: bool = False, timeout: float = 60) -> tuple[int, str, str]:
    """Run `fetchpool ARGS`; stdout to a pseudo-terminal when ``tty``, else a pipe: (status, stdout, stderr)."""
    done = run_cli(*args, stdout="tty" if tty else "pipe", timeout=timeout)
    return done.status, done.out, done.err


def _text_url(app_server: AppServer, lang: str, encoding: str) -> str:
    return f"{app_server.http_url}/text?lang={lang}&enc={encoding}&declare=none"


def test_a_terminal_shows_status_headers_and_the_text_in_its_own_encoding(
    service: FetchpoolService, app_server: AppServer
) -> None:
    status, out, _ = _cli("fetch", "--target", service.target, _text_url(app_server, "ja", "shift_jis"), tty=True)
    assert status == 0
    head, _, body = out.partition("\n\n")
    assert head.splitlines()[0] == "HTTP/1.1 200 OK" and "content-type: text/html" in head.lower()
    assert SAMPLE_TEXTS["ja"] in body  # not mojibake
    status, out, _ = _cli("fetch", "--target", service.target, "-v", f"{app_server.http_url}/redirect/2", tty=True)
    assert status == 0 and "* 1 attempt(s); pool wait" in out and "total" in out and out.rstrip().endswith("done")
    flaky = f"{app_server.http_url}/flaky?key=cli-{uuid.uuid4()}&fail=1"
    status, out, _ = _cli("fetch", "--target", service.target, "-v", flaky, tty=True)
    assert status == 0 and "* 2 attempt(s); pool wait" in out and "* sent again after: status 503\n" in out


@pytest.mark.parametrize(("lang", "encoding"), [("fr", "cp1252"), ("ja", "shift_jis"), ("zh", "gbk")])
def test_body_text_decodes_as_the_page_is_encoded(
    service: FetchpoolService, app_server: AppServer, lang: str, encoding: str
) -> None:
    status, out, _ = _cli("fetch", "--target", service.target, "--body", "text", _text_url(app_server, lang, encoding))
    [result] = map(json.loads, out.splitlines())
    assert status == 0 and SAMPLE_TEXTS[lang] in result["text"] and result["encoding"]
    assert base64.b64decode(result["body"]) == result["text"].encode(encoding)  # body as the API has it: base64


def test_body_text_of_a_body_that_is_not_text_is_null_not_mojibake(
    service: FetchpoolService, nginx: Nginx, site_root: Path
) -> None:
    data = bytes(range(256)) * 4
    (site_root / "cli-binary.bin").write_bytes(data)
    status, out, _ = _cli("fetch", "--target", service.target, "--body", "text", "--json",
                          f"{nginx.http_url}/cli-binary.bin", tty=True)
    result = json.loads(out)
    assert status == 0 and result["encoding"] == "" and result["text"] is None
    assert base64.b64decode(result["body"]) == data


def test_body_base64_at_a_terminal_shows_the_body_in_base64_lines_after_the_headers(
    service: FetchpoolService, nginx: Nginx, site_root: Path, app_server: AppServer
) -> None:
    data = bytes(range(256)) * 4
    (site_root / "cli-base64.bin").write_bytes(data)
    page = _text_url(app_server, "ja", "shift_jis")
    for url, expected in [(f"{nginx.http_url}/cli-base64.bin", data), (page, SAMPLE_TEXTS["ja"].encode("shift_jis"))]:
        status, out, _ = _cli("fetch", "--target", service.target, "--body", "base64", url, tty=True)
        head, _, body = out.partition("\n\n")
        assert status == 0 and head.startswith("HTTP/1.1 200 OK\n") and "[binary body" not in out, out
        lines = body.splitlines()
        assert lines and all(len(line) <= 76 for line in lines), body  # as base64(1) writes them
        decoded = base64.b64decode("".join(lines), validate=True)
        assert (expected in decoded) if url == page else (decoded == expected)  # the page: the text in its HTML


def test_piped_output_is_json_lines_with_every_field_and_numbers_as_numbers(
    service: FetchpoolService, nginx: Nginx, site_root: Path
) -> None:
    urls = [f"{nginx.https_url}/small.html", f"{nginx.https_url}/large.html", "http://127.0.0.1:1/"]
    status, out, err = _cli("fetch", "--target", service.target, *urls)
    results = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and "1 of 3 failed with CONNECT" in err
    fields = {f.name for f in pb.FetchResult.DESCRIPTOR.fields}
    for result in results:
        assert set(result) == fields
        assert all(isinstance(result[k], int) for k in ("index", "status_code", "body_size", "attempts", "part"))
        assert isinstance(result["timings"]["total_seconds"], float)
    by_url = {r["url"]: r for r in results}
    assert by_url[urls[1]]["body_size"] == (site_root / "large.html").stat().st_size
    assert by_url[urls[2]]["error"]["kind"] == "CONNECT" and by_url[urls[0]]["error"] is None
    # --json at a terminal too.
    status, out, _ = _cli("fetch", "--target", service.target, "--json", urls[0], tty=True)
    assert status == 0 and json.loads(out)["status_code"] == 200


def test_output_file_gets_the_exact_body(service: FetchpoolService, nginx: Nginx, site_root: Path,
                                         tmp_path: Path) -> None:
    data = os.urandom(6 * 1024 * 1024)  # over one default gRPC message
    (site_root / "cli-6MiB.bin").write_bytes(data)
    target = tmp_path / "page.bin"
    status, out, err = _cli("fetch", "--target", service.target, "-o", str(target), f"{nginx.https_url}/cli-6MiB.bin",
                            tty=True)
    assert status == 0 and hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert "HTTP/2 200 OK" in out and "saved 6291456 bytes" in err
    status, out, err = _cli("fetch", "--target", service.target, f"{nginx.https_url}/cli-6MiB.bin", tty=True)
    assert "[binary body: 6291456 bytes of application/octet-stream; save it with -o FILE]" in out


def test_saved_is_said_after_the_verbose_lines_and_headers_on_one_terminal(
    service: FetchpoolService, nginx: Nginx, site_root: Path, tmp_path: Path
) -> None:
    (site_root / "cli-saved.bin").write_bytes(b"x" * 1000)
    target = tmp_path / "saved.bin"
    done = run_cli("fetch", "--target", service.target, "-v", "-o", str(target), f"{nginx.http_url}/cli-saved.bin",
                   stdout="tty", stderr="tty")  # stdout and stderr: one terminal, as a person sees them
    assert done.status == 0 and target.read_bytes() == b"x" * 1000, done.out
    saved = done.out.index(f"fetchpool fetch: saved 1000 bytes to {target}\n")
    assert 0 < done.out.index("* peer ") < done.out.index("HTTP/1.1 200 OK\n") < saved, done.out
    assert done.out.endswith(f"saved 1000 bytes to {target}\n"), done.out


def test_fail_turns_http_errors_into_curl_s_exit_status(service: FetchpoolService, app_server: AppServer) -> None:
    missing = f"{app_server.http_url}/status/404"
    assert _cli("fetch", "--target", service.target, missing)[0] == 0
    assert _cli("fetch", "--target", service.target, "--fail", missing)[0] == 22
    assert _cli("fetch", "--target", service.target, "--fail", f"{app_server.http_url}/echo")[0] == 0
    # A failed fetch outranks an HTTP error status: 1, as the README says.
    assert _cli("fetch", "--target", service.target, "--fail", missing, "http://127.0.0.1:1/")[0] == 1


def test_fail_shows_no_body_and_says_so_on_stderr_as_curl_f(service: FetchpoolService, app_server: AppServer,
                                                              tmp_path: Path) -> None:
    missing, ok = f"{app_server.http_url}/status/404", f"{app_server.http_url}/echo"
    status, out, err = _cli("fetch", "--target", service.target, "--fail", missing, tty=True)
    assert (status, out, err) == (22, "", "fetchpool fetch: The requested URL returned error: 404\n")
    status, out, err = _cli("fetch", "--target", service.target, "--fail", "--body", "text", missing, ok)
    results = {r["url"]: r for r in map(json.loads, out.splitlines())}  # still one line per URL
    assert status == 22 and err == f"fetchpool fetch: The requested URL returned error: 404 ({missing})\n"
    assert results[missing]["status_code"] == 404 and results[missing]["body"] is None
    assert results[ok]["status_code"] == 200 and results[ok]["body"]
    status, out, err = _cli("fetch", "--target", service.target, "--fail", "-o", str(tmp_path / "page"), missing)
    assert status == 22 and not (tmp_path / "page").exists() and "saved" not in err


def test_errors_name_the_next_step(start_service: ..., app_server: AppServer) -> None:
    guarded = start_service("--ssrf-guard", "true")
    local = f"{app_server.http_url}/echo"
    status, out, _ = _cli("fetch", "--target", guarded.target, local, tty=True)
    assert status == 1 and "FORBIDDEN_TARGET" in out and "--allow-targets" in out
    status, _, err = _cli("fetch", "--target", guarded.target, local)
    assert status == 1 and "--allow-targets" in err
    nobody = f"127.0.0.1:{free_port()}"
    for command in ("fetch", "stats"):
        status, _, err = _cli(command, "--target", nobody, *([local] if command == "fetch" else []))
        assert status == 2 and "Is it running?" in err and "fetchpool serve" in err and "--target" in err, err


def test_stats_is_a_table_at_a_terminal_and_json_with_every_field_otherwise(service: FetchpoolService) -> None:
    status, out, _ = _cli("stats", "--target", service.target, tty=True)
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert status == 0 and rows["pool"].strip() == "direct" and rows["limits.max_connections"].strip().isdigit()
    assert {"connections_open", "pool_timeouts_total", "retries_total"} <= set(rows)
    status, out, _ = _cli("stats", "--target", service.target)
    [pool] = json.loads(out)["pools"]
    assert set(pool) == {f.name for f in pb.PoolStats.DESCRIPTOR.fields}
    assert isinstance(pool["connections_created_total"], int) and isinstance(pool["limits"]["pool_timeout"], float)
    assert pool["ejected_until"] is None and pool["pool_timeouts_total"] == 0


def test_call_errors_say_what_answered_at_the_target(nginx: Nginx) -> None:
    """A listener that accepts and never answers, and an HTTP/1 server, are no "Is it running?":
    something runs there, but not fetchpool. stats takes a --deadline too."""
    url = f"{nginx.http_url}/small.html"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        for command, extra in (("stats", []), ("fetch", [url])):
            status, _, err = _cli(command, "--target", target, "--deadline", "1", *extra)
            assert status == 2 and err == (f"fetchpool {command}: something at {target} accepted the connection but "
                                           "did not answer as gRPC within 1 s: is that fetchpool's port? Give the "
                                           "service's address with --target HOST:PORT\n"), err
    web = nginx.http_url.removeprefix("http://")
    for command in ("stats", "fetch"):
        status, _, err = _cli(command, "--target", web, *([url] if command == "fetch" else []))
        assert status == 2 and err.startswith(f"fetchpool {command}: something answered at {web}, but not gRPC ("), err
        assert "is that fetchpool's port?" in err and "Is it running?" not in err, err


def test_a_refused_token_file_is_named(start_service: ..., nginx: Nginx, tmp_path: Path) -> None:
    service = start_service("--auth-token", "s3cret")
    url = f"{nginx.http_url}/small.html"
    wrong = tmp_path / "token"
    wrong.write_text("wrong\n")
    for command in ("stats", "fetch"):
        extra = [url] if command == "fetch" else []
        status, _, err = _cli(command, "--target", service.target, "--token-file", str(wrong), *extra)
        assert status == 2 and "UNAUTHENTICATED (BAD_TOKEN)" in err, err
        assert err.endswith(f"; the token in {wrong} was refused: it must be one of the service's tokens "
                            "(its --auth-token-file)\n") and "pass the service's token" not in err, err
        status, _, err = _cli(command, "--target", service.target, *extra)
        assert status == 2 and err.endswith("; pass the service's token with --token-file FILE\n"), err
    wrong.write_text("s3cret\n")
    assert _cli("stats", "--target", service.target, "--token-file", str(wrong), "--deadline", "30")[0] == 0


def test_a_concurrency_out_of_range_is_named_for_what_it_is() -> None:
    done = run_cli("fetch", "--concurrency", "99999999999999999999", "http://example.com/")
    assert done.status == 2 and "--concurrency: at most 2147483647" in done.err, done.err
    done = run_cli("fetch", "--concurrency", "-1", "http://example.com/")
    assert done.status == 2 and "--concurrency: must be 0 (server default) or positive, got -1" in done.err, done.err
