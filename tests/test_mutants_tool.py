"""tools/mutants.py stays runnable: every mutation's target text is still in its file, once, and every test it maps
exists. (Running the mutations is `make mutants`, not part of this suite: it takes tens of minutes.)"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("captune_mutants_tool", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_target_is_found_once_and_every_mapped_test_exists():
    """A refactor that moves a targeted line, or renames a mapped test, fails here with the mutation's name, instead
    of only when someone next runs `make mutants`."""
    tool = load_tool()
    names = [m.name for m in tool.MUTATIONS]
    assert len(names) == len(set(names))
    for mutation in tool.MUTATIONS:
        for relative, old, new in mutation.edits():
            assert old != new, mutation.name
            assert (ROOT / relative).read_text(encoding="utf-8").count(old) == 1, \
                f"{mutation.name}: its target is no longer exactly once in {relative}: update tools/mutants.py"
        assert mutation.tests, mutation.name
        for test in mutation.tests:
            path, _, node = test.partition("::")
            assert (ROOT / path).is_file(), f"{mutation.name}: {path} is gone"
            if node:
                function = node.split("[")[0]
                assert re.search(rf"^def {re.escape(function)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), \
                    f"{mutation.name}: {test} is gone"
