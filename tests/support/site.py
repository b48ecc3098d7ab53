"""The static content nginx serves: a generated mini site and Debian's Python documentation."""

from __future__ import annotations

from pathlib import Path

from .process import INSTALL_HINT

# Debian's python3.11-doc: the Python 3.11 manual as a real static site, ~530 HTML pages from
# 9 KB to 2.5 MB (median ~54 KB, ~50 MB in all), with CSS/JS/images beside them.
DOC_ROOT = Path("/usr/share/doc/python3.11/html")
DOC_PACKAGE = "python3.11-doc"

# Generated pages and their exact sizes in bytes.
SITE_PAGES = {"small.html": 2 * 1024, "large.html": 100 * 1024}


def _page(title: str, size: int) -> bytes:
    head = f"<!DOCTYPE html>\n<html><head><title>{title}</title></head><body>\n".encode()
    tail = b"</body></html>\n"
    paragraphs = []
    used = len(head) + len(tail)
    for i in range(size):  # bounded: each paragraph adds at least one byte
        line = f"<p>{title} paragraph {i}: fetchpool test content.</p>\n".encode()
        if used + len(line) > size:
            break
        paragraphs.append(line)
        used += len(line)
    filler = b"<!--" + b"x" * (size - used - 8) + b"-->\n" if size - used >= 8 else b" " * (size - used)
    return head + b"".join(paragraphs) + filler + tail


def write_site(root: Path) -> dict[str, int]:
    """Write the generated pages (SITE_PAGES, exact sizes) and an index.html under ``root``.

    Returns {relative path: size in bytes} of every file written.
    """
    root.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for name, size in SITE_PAGES.items():
        (root / name).write_bytes(_page(name, size))
        sizes[name] = size
    links = "".join(f'<a href="{name}">{name}</a>\n' for name in [*SITE_PAGES, "doc/index.html"])
    index = f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n".encode()
    (root / "index.html").write_bytes(index)
    sizes["index.html"] = len(index)
    return sizes


def doc_pages(root: Path = DOC_ROOT) -> list[str]:
    """The HTML pages under ``root`` as sorted POSIX paths relative to it ("library/os.html").

    Raises FileNotFoundError (telling to run the install script) when the doc site is missing.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing (Debian package {DOC_PACKAGE}): {INSTALL_HINT}")
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*.html"))
