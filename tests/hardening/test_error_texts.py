"""What a person reads about a failed fetch: messages that quote a peer's bytes readably and
briefly, and a hint for every kind that says what to do - the right one for each cause of
TOO_LARGE. Through the real CLI against the hostile servers, once per transport."""

from __future__ import annotations

import json
import re

from hostile import HostileServers
from support import Nginx
from support.cli import run_cli

HEADER_HINT = re.compile(r"--max-header-bytes or --max-header-count|no setting raises that")


def test_each_failure_reads_clearly_and_says_what_to_do(start_service: ..., hostile: HostileServers,
                                                        transport: str) -> None:
    service = start_service()
    expected = {  # URL: kind
        hostile.http("/garbage-status"): "PROTOCOL",
        hostile.http("/garbage-status-long"): "PROTOCOL",
        hostile.http("/headers-many?n=1001"): "TOO_LARGE",
        hostile.http("/headers-big?n=200000"): "TOO_LARGE",
        hostile.http("/redirect-self?k=texts"): "TOO_MANY_REDIRECTS",
        "http://[::1/": "INVALID_URL",
        hostile.http("/redirect-bad-location?k=texts"): "INVALID_URL",
        hostile.http("/reset-mid-body?k=texts"): "NETWORK",
    }
    urls = list(expected)
    done = run_cli("fetch", "--target", service.target, *urls, timeout=120)
    results = {r["url"]: r for r in map(json.loads, done.out.splitlines())}
    assert done.status == 1 and set(results) == set(urls)
    for url, kind in expected.items():
        error = results[url]["error"]
        assert error["kind"] == kind, (url, error)
        message = error["message"]
        assert "bytearray(" not in message and "b'" not in message and len(message) < 300, message
    if transport == "httpcore":  # h11 quotes the line it could not parse; libcurl says what it is not
        assert results[urls[0]]["error"]["message"] == ('protocol error: illegal status line: '
                                                        '"\\x00\\x01\\x02 HELLO THERE"')
        assert results[urls[1]]["error"]["message"].endswith(' ... (4009 bytes)')
    assert results["http://[::1/"]["error"]["message"] == "invalid URL: the IPv6 address '[::1' is not closed with ']'"
    for url in urls[2:4]:
        assert "header" in results[url]["error"]["message"] or "libcurl" in results[url]["error"]["message"]
    assert results[urls[6]]["error"]["message"] == "redirect to 'http://[::1': not a URL"
    summary = {line.split(" failed with ")[1].split(":")[0]: line for line in done.err.splitlines()}
    assert set(summary) == {"PROTOCOL", "TOO_LARGE", "TOO_MANY_REDIRECTS", "INVALID_URL", "NETWORK"}, done.err
    assert all(": " in line.split(" failed with ")[1] for line in summary.values()), done.err  # a hint each
    assert "-v says why each send was repeated" in summary["NETWORK"]
    too_large = [line for line in done.err.splitlines() if "TOO_LARGE" in line]
    assert too_large and all(HEADER_HINT.search(line) and "max_body_bytes" not in line for line in too_large)
    assert "--max-redirects" in summary["TOO_MANY_REDIRECTS"] and "scheme and port" in summary["PROTOCOL"]


def test_an_invalid_request_gets_a_hint_at_a_terminal_too(start_service: ..., hostile: HostileServers) -> None:
    service = start_service()
    done = run_cli("fetch", "--target", service.target, "--method", "NOT A METHOD", hostile.http("/ok"), stdout="tty")
    assert done.status == 1 and done.out.startswith("INVALID_ARGUMENT: invalid method 'NOT A METHOD'\n  hint: ")
    assert "--method" in done.out, done.out


def test_a_body_too_large_shows_its_status_and_how_to_raise_the_limit(start_service: ...,
                                                                      hostile: HostileServers) -> None:
    """The CLI asks for no limit of its own: only the service's --max-body-bytes can be raised."""
    service = start_service("--max-body-bytes", "1000")
    done = run_cli("fetch", "--target", service.target, hostile.http("/zeros?n=5000"), stdout="tty")
    head, _, error = done.out.partition("\n\n")
    assert done.status == 1 and head.splitlines()[0] == "HTTP/1.1 200 OK", done.out
    assert "content-length: 5000" in head.lower(), done.out
    assert error == ("TOO_LARGE: body of 5000 bytes exceeds the limit of 1000 bytes\n  hint: the body is larger "
                     "than the service accepts: restart the service with a larger --max-body-bytes "
                     "(FETCHPOOL_MAX_BODY_BYTES)\n"), done.out
    done = run_cli("fetch", "--target", service.target, hostile.http("/zeros?n=5000"))
    [result] = map(json.loads, done.out.splitlines())
    assert result["status_code"] == 200 and result["error"]["kind"] == "TOO_LARGE" and result["body"] == ""


def test_tls_hints_follow_the_cause(start_service: ..., hostile: HostileServers, nginx: Nginx) -> None:
    """An https:// URL to a plain-HTTP port is said to be one (OpenSSL reads nginx's "HTTP/1.1 400"
    as a TLS record of a wrong version); --ca-bundle is named for certificates only."""
    service = start_service()
    plain = nginx.http_url.replace("http://", "https://") + "/small.html"
    certificates = [hostile.tls(kind) for kind in ("self_signed", "expired", "wrong_host", "untrusted")]
    done = run_cli("fetch", "--target", service.target, plain, *certificates, timeout=120)
    results = {r["url"]: r["error"] for r in map(json.loads, done.out.splitlines())}
    assert done.status == 1 and {e["kind"] for e in results.values()} == {"TLS"}, results
    not_tls, certificate = "the target does not speak TLS on that port (is it http://?)", "--ca-bundle"
    summary = [line for line in done.err.splitlines() if " failed with TLS" in line]
    assert sorted(summary) == [f"fetchpool fetch: 1 of 5 failed with TLS: {not_tls}",
                               "fetchpool fetch: 4 of 5 failed with TLS: the target's certificate is not trusted by "
                               "the service (its --ca-bundle)"], (done.err, results)
    done = run_cli("fetch", "--target", service.target, plain, stdout="tty")
    assert done.status == 1 and f"  hint: {not_tls}\n" in done.out and certificate not in done.out, done.out


def test_a_forbidden_address_is_named_with_a_rule_that_covers_it(start_service: ...) -> None:
    """An IP literal is named once; the example rule covers the very address refused; the link-local
    range of cloud metadata gets no invitation. The guard refuses before connecting: no traffic."""
    service = start_service("--deny-targets", "8.8.8.8/32", strict=True)
    urls = {"http://10.0.0.1/": "10.0.0.1", "http://[fd00::1]/": "fd00::1", "http://8.8.8.8/": "8.8.8.8",
            "http://169.254.169.254/": "169.254.169.254", "http://[fe80::1]/": "fe80::1",
            "http://[::ffff:a9fe:a9fe]/": "::ffff:a9fe:a9fe", "http://[64:ff9b::a00:1]/": "64:ff9b::a00:1",
            "http://[64:ff9b::a9fe:a9fe]/": "64:ff9b::a9fe:a9fe"}
    done = run_cli("fetch", "--target", service.target, *urls, timeout=120)
    results = {r["url"]: r["error"] for r in map(json.loads, done.out.splitlines())}
    assert done.status == 1 and set(results) == set(urls)
    for url, address in urls.items():
        assert results[url] == {"kind": "FORBIDDEN_TARGET", "message": f"{address} is not an allowed address"}
    for url, rule in [("http://10.0.0.1/", "add 10.0.0.1/32 to the service's --allow-targets"),
                      ("http://[fd00::1]/", "add fd00::1/128 to the service's --allow-targets"),
                      ("http://[64:ff9b::a00:1]/", "add 10.0.0.1/32 to the service's --allow-targets")]:
        done = run_cli("fetch", "--target", service.target, url, stdout="tty")
        assert done.status == 1 and rule in done.out and "resolves to" not in done.out, done.out
    for url, network in [("http://169.254.169.254/", "169.254.0.0/16"), ("http://[fe80::1]/", "fe80::/10"),
                         ("http://[::ffff:a9fe:a9fe]/", "169.254.0.0/16"),
                         ("http://[64:ff9b::a9fe:a9fe]/", "169.254.0.0/16")]:
        done = run_cli("fetch", "--target", service.target, url, stdout="tty")
        assert done.status == 1 and f"is in {network}, the link-local range, where clouds serve instance metadata" \
            in done.out, done.out
        assert "--allow-targets" not in done.out and "ALLOW_TARGETS" not in done.out, done.out
    # A public address is refused by a deny rule only: allowing it would not help.
    done = run_cli("fetch", "--target", service.target, "http://8.8.8.8/", stdout="tty")
    assert done.status == 1 and "  hint: 8.8.8.8 is refused by the service's --deny-targets\n" in done.out, done.out


def test_verbose_shows_the_redirects_of_a_loop(start_service: ..., hostile: HostileServers) -> None:
    """-v, which the hint names, lists the redirects followed and the one that closed the loop; the
    view shows that answer's status line, then the error."""
    service = start_service()
    a, b = hostile.http("/redirect-a?k=verbose"), hostile.http("/redirect-b?k=verbose")
    done = run_cli("fetch", "--target", service.target, "-v", a, stdout="tty")
    assert done.status == 1, done.out
    assert f"* redirect 302 from {a}\n" in done.out  # followed
    assert f"* redirect 302 from {b} to /redirect-a?k=verbose, not followed\n" in done.out
    assert "\nHTTP/1.1 302 Found\n" in done.out and "\n\nTOO_MANY_REDIRECTS: redirect loop back to " in done.out
    assert "-v lists the redirects followed" in done.out
