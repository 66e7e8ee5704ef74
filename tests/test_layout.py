"""The layout rules of docs/architecture.md, checked on the source tree: the runtime never imports tooling,
no runtime or bench file grows past 600 lines, and export/ holds no model maths of its own."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"anyid_rt": "anyid_rt", "kernels": "anyid_rt.kernels", "export": "anyid_rt.export",
           "trainer": "anyid_rt.trainer"}
TOOLING = ("anyid_rt.bench", "tests", "helpers", "conftest")


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    top = RUNTIME.get(rel.parts[0], "anyid_rt.bench" if rel.parts[0] == "bench" else rel.parts[0])
    return ".".join([top, *rel.parts[1:-1]])


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Absolute names of every module an import statement in `path` names (relative imports resolved the way
    setup.py's package mapping resolves them)."""
    package = _package_of(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def test_resolution_of_relative_imports():
    # kernels/ is anyid_rt.kernels: `from ..models import x` there means anyid_rt.models
    names = dict(_imported_modules(ROOT / "anyid_rt" / "models" / "dit.py"))
    assert any(n.startswith("anyid_rt.kernels") for n in names.values())


@pytest.mark.parametrize("folder", sorted(RUNTIME))
def test_runtime_never_imports_tooling(folder):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _files(folder)
           for line, name in _imported_modules(p)
           if any(name == t or name.startswith(t + ".") for t in TOOLING)]
    assert not bad, "\n".join(bad)


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _files(*RUNTIME, "bench")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_export_has_no_model_maths():
    """The ONNX graph traces WanDiT.forward_tokens: no attention, norm or modulation arithmetic in export/."""
    maths = ("scaled_dot_product_attention", "softmax", "layer_norm", "rms_norm", "attention_ref",
             "layernorm_modulate", "gated_residual", ".modulation", "torch.cos", "torch.sin", "_linear_fp32")
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _files("export")
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if any(m in line for m in maths) and not line.lstrip().startswith("#")]
    assert not bad, "\n".join(bad)
