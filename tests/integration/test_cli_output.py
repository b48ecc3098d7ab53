"""Where `fetchpool fetch` writes, and what happens when it cannot: -o FILE, a pipe whose reader
goes away, a full disk; the progress bar on a terminal's stderr. Real service, real nginx, real
pipes and pseudo-terminals (tests/support/cli.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import Nginx, free_port
from support.cli import run_cli, run_shell
from support.fetchpool_service import FetchpoolService


def test_an_output_path_that_cannot_be_written_is_refused_before_fetching(
    service: FetchpoolService, nginx: Nginx, tmp_path: Path
) -> None:
    url = f"{nginx.http_url}/small.html"
    nobody = f"127.0.0.1:{free_port()}"  # no service: a fetch would end in "cannot reach the service"
    for path, why in [(tmp_path / "missing" / "x", f"the directory {tmp_path / 'missing'} does not exist"),
                      (tmp_path, f"{tmp_path} is a directory")]:
        done = run_cli("fetch", "--target", nobody, "-o", str(path), url)
        assert done.status == 2 and done.err == f"fetchpool fetch: cannot write -o {path}: {why}\n", done.err
    # The check opens the file for writing, as the write will: os.access says yes to root for any
    # file. A sysfs file without a store refuses the open, a /proc file a write (root) or the open.
    for path in ("/sys/kernel/notes", "/proc/version"):
        done = run_cli("fetch", "--target", nobody, "-o", path, url)
        assert done.status == 2 and done.err.startswith(f"fetchpool fetch: cannot write -o {path}: "), done.err
        assert "cannot reach" not in done.err and done.err.rstrip().split(": ")[-1] in (
            "Permission denied", "Input/output error"), done.err
    # The check leaves no file behind, and an existing one as it was, when the fetch then fails.
    kept = tmp_path / "kept.html"
    kept.write_text("before")
    for path in (tmp_path / "new.html", kept):
        done = run_cli("fetch", "--target", nobody, "-o", str(path), url)
        assert done.status == 2 and "cannot reach the service" in done.err, done.err
    assert not (tmp_path / "new.html").exists() and kept.read_text() == "before"
    # A write that fails only when it happens (a full device) is said as clearly.
    done = run_cli("fetch", "--target", service.target, "-o", "/dev/full", url)
    assert done.status == 2 and done.err == "fetchpool fetch: cannot write -o /dev/full: No space left on device\n"
    done = run_cli("fetch", "--target", service.target, "-o", str(tmp_path / "page.html"), url)
    assert done.status == 0 and (tmp_path / "page.html").read_bytes() == (nginx.root / "small.html").read_bytes()


def test_urls_from_standard_input_with_file_dash(service: FetchpoolService, nginx: Nginx) -> None:
    urls = [f"{nginx.http_url}/small.html?stdin={i}" for i in range(2)]
    lines = "\\n".join(["# a comment", *urls, ""])
    done = run_shell(f"printf '{lines}' | $FETCHPOOL fetch --target {service.target} --file - --body omit")
    results = [json.loads(line) for line in done.out.splitlines()]
    assert done.status == 0 and sorted(r["url"] for r in results) == urls, done.err
    assert all(r["status_code"] == 200 for r in results)


def test_a_reader_that_goes_away_ends_the_command_quietly_with_sigpipe_s_status(
    service: FetchpoolService, nginx: Nginx, tmp_path: Path
) -> None:
    # Each JSON line carries 100 KiB of body in base64: far more than a pipe holds.
    (tmp_path / "urls.txt").write_text("".join(f"{nginx.http_url}/large.html?{i}\n" for i in range(20)))
    done = run_shell(f"$FETCHPOOL fetch --target {service.target} --file {tmp_path}/urls.txt | head -c 100 "
                     f"> {tmp_path}/head.out")
    assert done.status == 141 and done.err == "", done.err  # 128 + SIGPIPE, as `curl ... | head`
    assert (tmp_path / "head.out").read_text().startswith('{"id": ')
    done = run_shell(f"$FETCHPOOL fetch --target {service.target} --file {tmp_path}/urls.txt > /dev/full")
    assert done.status == 2 and done.err == "fetchpool fetch: cannot write to stdout: No space left on device\n"
    done = run_shell(f"$FETCHPOOL stats --target {service.target} > /dev/full")
    assert done.status == 2 and done.err == "fetchpool stats: cannot write to stdout: No space left on device\n"


def test_a_malformed_target_is_said_to_be_malformed_not_down(nginx: Nginx) -> None:
    for command in ("fetch", "stats"):
        for target, why in [("127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is out of range (1-65535)"),
                            ("nonsense::", "'nonsense::' is not HOST:PORT"),
                            ("dns:///[::1:50051", "the IPv6 address in '[::1:50051' is not closed")]:
            done = run_cli(command, "--target", target, *([f"{nginx.http_url}/"] if command == "fetch" else []))
            assert done.status == 2 and f"argument --target: malformed target: {why}" in done.err, done.err
            assert "Is it running?" not in done.err
        # Well formed, but a name that never resolves (RFC 2606 .invalid): not "Is it running?" either.
        done = run_cli(command, "--target", "fetchpool.invalid:50051",
                       *([f"{nginx.http_url}/"] if command == "fetch" else []))
        assert done.status == 2 and done.err.startswith(f"fetchpool {command}: the host of --target "
                                                        "fetchpool.invalid:50051 does not resolve"), done.err


@pytest.mark.parametrize("columns", [0, 100])  # 0: a pty whose size was never set
def test_results_to_a_file_show_a_progress_bar_on_a_terminal_s_stderr(
    service: FetchpoolService, nginx: Nginx, tmp_path: Path, columns: int
) -> None:
    """The README's `fetchpool fetch --file urls.txt ... > results.jsonl`."""
    (tmp_path / "urls.txt").write_text("".join(f"{nginx.http_url}/small.html?{i}\n" for i in range(3)))
    results = tmp_path / "results.jsonl"
    done = run_cli("fetch", "--target", service.target, "--file", str(tmp_path / "urls.txt"), stdout=results,
                   stderr="tty", columns=columns)
    assert done.status == 0 and len(results.read_text().splitlines()) == 3
    final = done.err.split("\r")[-1]
    assert re.fullmatch(r"100%\|█+\| 3/3 \[[0-9:]+<00:00, +[0-9.]+url/s\]\n", final), done.err
    assert (columns or 80) - 1 <= len(final.rstrip("\n")) <= (columns or 80)  # the terminal's width, else 80
    # Piped, stderr gets no bar: only what a script reads.
    done = run_cli("fetch", "--target", service.target, "--file", str(tmp_path / "urls.txt"), stdout=results)
    assert done.status == 0 and done.err == ""


def test_the_client_commands_import_no_http_library(service: FetchpoolService, nginx: Nginx) -> None:
    """fetch and stats talk gRPC only: httpx, httpcore, h2 (and httpx's CLI extras, rich and click)
    cost ~0.5 s of start-up when the exception tree pulled them in (fetchpool.errors)."""
    heavy = ("httpx", "httpcore", "h2", "idna", "rich", "click")
    for args in (["fetch", "--target", service.target, f"{nginx.http_url}/small.html", "http://[::1/"],
                 ["stats", "--target", service.target], ["fetch", "--target", "nonsense::", "http://x/"]):
        done = run_cli(*args, python_options=("-X", "importtime"))
        imported = {line.split("|")[-1].strip() for line in done.err.splitlines() if line.startswith("import time:")}
        assert imported and done.status in (0, 1, 2), done.err[-2000:]
        assert sorted(imported & set(heavy)) == [], args
