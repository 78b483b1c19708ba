"""Loading scripts/train.py, scripts/generate.py and scripts/run_lm.py as modules (their
``main(argv)`` returns what they report), for the language-model tests and their workers."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
TINY_LM = os.path.join(REPO, "yaml_configs", "lm_tiny.yaml")


def load_script(name):
    """The module of scripts/<name>.py (imported once)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    module_name = f"lm_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name,
                                                      os.path.join(SCRIPTS, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def train(*argv):
    return load_script("train").main([TINY_LM, *argv])


def generate(*argv):
    return load_script("generate").main([TINY_LM, *argv])
