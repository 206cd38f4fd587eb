"""The layering contract (docs/architecture.md) holds on the repository, and the check catches what it must."""

from __future__ import annotations

from pathlib import Path

from tests import layering


def test_repository_keeps_the_layering_contract():
    imports = layering.all_imports()
    bad = layering.forbidden(imports)
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)
    files, packages = layering.graphs(imports)
    assert layering.cycles(files) == [], "file-level import cycles"
    assert layering.cycles(packages) == [], "package-level import cycles"


def _tree(root: Path, files: dict[str, str]) -> None:
    for pkg in layering.PACKAGES:
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_check_reports_wrong_imports_lazy_ones_too_but_not_type_checking(tmp_path):
    _tree(tmp_path, {
        "server/engine/__init__.py": "",
        "server/engine/engine.py": (
            "from typing import TYPE_CHECKING\n"
            "import grpc\n"
            "if TYPE_CHECKING:\n    from trainer.model import TwoTower\n"
            "def f():\n    from trainer import model\n"),
        "server/servicer.py": "import server.engine.engine\n",
        "trainer/model.py": "from livetower import cli\n",
        "trainer/loop.py": "from trainer.studies import offline\n",
        "trainer/studies/__init__.py": "",
        "trainer/studies/offline.py": "import trainer.model\n",
        "livetower/cli.py": "import server.servicer, trainer.loop\n",
    })
    bad = layering.forbidden(layering.all_imports(tmp_path))
    text = "\n".join(bad)
    assert "server.engine.engine:2 imports grpc: server.engine must not import grpc" in text
    assert "server.engine.engine:6 imports trainer.model (lazy): server may import only" in text
    assert "trainer.model:1 imports livetower.cli: trainer may import only" in text
    assert "trainer.loop:1 imports trainer.studies.offline: the sidecar does not depend on the offline studies" in text
    assert ":4 " not in text  # the TYPE_CHECKING import is allowed
    assert len(bad) == 4, text  # servicer -> engine, studies -> sidecar and the CLI's imports are allowed


def test_check_finds_file_cycles(tmp_path):
    _tree(tmp_path, {"contracts/a.py": "from contracts import b\n", "contracts/b.py": "def f():\n    import contracts.a\n"})
    files, _ = layering.graphs(layering.all_imports(tmp_path))
    assert layering.cycles(files) == [["contracts.a", "contracts.b"]]
