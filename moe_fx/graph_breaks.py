"""Why an experts block cannot be one graph, said in the user's terms: which module, which line,
what on it breaks the graph, and what to write instead (for ``explain()``).

dynamo reports a break as an error text; a break inside a loop may even skip the frame without
a reason. ``explain()`` captures once more with ``fullgraph=True`` and hands the error here.
"""

from __future__ import annotations

import linecache
import os
import re
from dataclasses import dataclass

import torch

# Reads of device values on the host: a Python loop or branch over their result is data-dependent.
_HOST_READS = (".cpu()", ".numpy()", ".tolist()", ".item()")

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

_STATIC_LOOP = ("loop over range(E) on the device instead: `tok, slot = torch.where(ids == e)` and "
                "`out.index_add_(0, tok, expert_e(x[tok]) * weights[tok, slot, None])` for every e "
                "(README \"Supported MoE forms\": expert_loop)")


@dataclass(frozen=True)
class BreakSite:
    """The user's line where dynamo stopped."""

    filename: str
    lineno: int
    code: str

    @property
    def where(self) -> str:
        return f"{self.filename.rsplit('/', 1)[-1]}:{self.lineno}"


def break_site(error_text: str) -> BreakSite | None:
    """The innermost user frame of a dynamo error: the last frame outside torch of its ``from user code:`` block
    (the outer ones are the callers: a model's forward, transformers' wrappers), else its
    ``Caused by:`` line."""
    lines = error_text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "from user code:":
            continue
        site = None
        for j in range(i + 1, len(lines) - 1):
            found = re.match(r'\s*File "([^"]+)", line (\d+)', lines[j])
            if found and not found[1].startswith(_TORCH_DIR):  # dynamo's polyfills, nn.Module's call
                site = BreakSite(found[1], int(found[2]), lines[j + 1].strip())
            elif not lines[j].strip() and site is not None:
                break  # the end of the block
        if site is not None:
            return site
    for line in lines:
        # "Caused by: if tok.numel() == 0:  # .../model.py:107 in forward (_dynamo/...)"
        found = re.search(r"Caused by:\s*(.*?)\s*#\s*(\S+?):(\d+) in ", line)
        if found:
            return BreakSite(found[2], int(found[3]), found[1])
    return None


def _owners(model, site: BreakSite) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of the modules whose class defines a method holding the line (``forward``,
    or a helper such as a model's ``_update_causal_mask``)."""
    if not isinstance(model, torch.nn.Module):
        return []
    holders: dict[type, bool] = {}
    owners = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls not in holders:
            holders[cls] = any(_holds_line(getattr(f, "__code__", None), site) for f in vars(cls).values())
        if holders[cls]:
            owners.append((path or "<root module>", module))
    return owners


def _holds_line(code, site: BreakSite) -> bool:
    if code is None or not code.co_filename.endswith(site.filename.lstrip(".")):
        return False
    last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
    return code.co_firstlineno <= site.lineno <= last


def owner_modules(model, site: BreakSite) -> str:
    """The module paths whose class has a method holding the line, e.g. ``layers.0.mlp (and 3 more)``."""
    paths = [f"{path} ({type(module).__name__})" for path, module in _owners(model, site)]
    if not paths:
        return site.where
    return paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")


def outside_experts(model, site: BreakSite) -> bool:
    """Whether the line is known to lie outside MoE experts code: every module whose class has a
    method holding it is not named like experts and has neither stacked expert weights (a parameter
    of 3 or more dims) nor a child named like experts, itself or one level down (a model's mask
    code, an attention layer). A line in no module's method (a free function) is not known to be
    outside."""
    owners = _owners(model, site)
    return bool(owners) and not any(_holds_experts(path, module) for path, module in owners)


def _holds_experts(path: str, module: torch.nn.Module) -> bool:
    def own(m):
        return any(p.dim() >= 3 for p in m.parameters(recurse=False))

    children = list(module.named_children())
    return ("expert" in path.rsplit(".", 1)[-1].lower() or own(module)
            or any("expert" in name.lower() for name, _ in children) or any(own(child) for _, child in children))


def explain_break(site: BreakSite, error_text: str) -> str | None:
    """What on the line breaks the graph and the fix, or None when the break is not data-dependent."""
    lowered = error_text.lower()
    if "data-dependent" not in lowered and "data dependent" not in lowered:
        return None
    code = site.code
    host = _host_source(site)
    if code.startswith(("if ", "elif ", "while ")) or code == "continue" or "branching" in lowered:
        return (f"expert loop contains a data-dependent Python branch ({code}) at {site.where}: dynamo cannot "
                "capture it in one graph; remove the branch so every expert runs unconditionally (an expert with "
                "no rows costs nothing)")
    if host is not None:
        return (f"`{code}` ({site.where}) runs a Python loop over values read on the host (`{host[1]}`, line "
                f"{host[0]}): it cannot be one graph; {_STATIC_LOOP}")
    return (f"`{code}` ({site.where}) depends on tensor values dynamo cannot trace into one graph; "
            f"compute it on the device: {_STATIC_LOOP}")


def _host_source(site: BreakSite) -> tuple[int, str] | None:
    """(line, code) of the host read feeding the loop on ``site``: ``name = ....cpu()`` above it."""
    names = re.findall(r"\bin\s+(?:enumerate\(|zip\()?\s*([A-Za-z_]\w*)", site.code)
    if not names:
        return None
    for lineno in range(site.lineno - 1, max(site.lineno - 40, 0), -1):
        line = linecache.getline(site.filename, lineno).strip()
        if re.match(rf"{re.escape(names[0])}\s*(:[^=]*)?=[^=]", line) and any(r in line for r in _HOST_READS):
            return lineno, line
    return None
