"""A script of benchmarks/ imported as a module (they are scripts, not a package)."""
import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
