"""The examples as modules, for tests that call their functions (examples/ is no package)."""

import contextlib
import importlib.util
import io
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """examples/{name}.py imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv):
    """(what module.main(argv) returned, what it printed); its progress bars on stderr are dropped."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        result = module.main(argv)
    return result, printed.getvalue()
