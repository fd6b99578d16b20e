"""torch and torchvision must be builds for each other; a mismatch ends in one line naming both and the fix.

timm imports torchvision, and a torchvision built for another torch fails while registering its operators
(``RuntimeError: operator torchvision::nms does not exist``, a traceback of some 27 lines, or an
``ImportError`` / ``AttributeError`` deep inside torchvision). ``backbones`` imports timm first of the
project's modules, so every entry point passes through ``exit_on_vision_mismatch`` when that import fails.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series built for ``torch_version``: torch 2.N pairs with torchvision 0.(N+15)
    (2.1 -> 0.16, 2.14 -> 0.29); None for a version outside that rule."""
    m = re.match(r"^2\.(\d+)", torch_version)
    return f"0.{int(m.group(1)) + 15}" if m else None


def mismatch_message(torch_version: str, vision_version: str | None, error: BaseException) -> str | None:
    """One line naming both versions and the install command when they are not a pair, else None."""
    wanted = matching_torchvision(torch_version)
    if wanted is None or (vision_version is not None and vision_version.split("+")[0].startswith(wanted + ".")):
        return None  # a pair (or a torch this rule does not know): the error is something else
    build = torch_version.split("+", 1)[1] if "+" in torch_version else None
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    have = f"torchvision {vision_version}" if vision_version else "torchvision is not installed and"
    reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__
    return (f"{have} does not match torch {torch_version} (importing it failed: {reason}); install the "
            f"torchvision built for this torch: pip install 'torchvision=={wanted}.*'{index}")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def exit_on_vision_mismatch(error: BaseException) -> None:
    """Exit with one line on stderr (status 2) when ``error``, raised importing timm or torchvision, comes from
    a torchvision that is not built for the installed torch; return (the caller re-raises) otherwise."""
    torch_version = _version("torch")
    if torch_version is None:
        return
    message = mismatch_message(torch_version, _version("torchvision"), error)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
