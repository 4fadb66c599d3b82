"""The install layout: every package folder is listed in setup.cfg under its installed name."""

import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPING = {"pacnet": "pacnet", "layers": "pacnet.layers", "kernels": "pacnet.kernels",
           "cli": "pacnet.cli", "nets": "pacnet.nets"}


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return {p.strip() for p in cfg["options"]["packages"].split("\n") if p.strip()}


def test_every_package_folder_is_declared():
    found = set()
    for top, installed in MAPPING.items():
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in folder:
                rel = os.path.relpath(folder, os.path.join(ROOT, top))
                found.add(installed if rel == "." else installed + "." + rel.replace(os.sep, "."))
    assert found == _declared()


def test_package_dir_maps_customer_folders():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    mapping = dict(line.split("=") for line in cfg["options"]["package_dir"].strip().split("\n"))
    assert {k.strip(): v.strip() for k, v in mapping.items()} == {v: k for k, v in MAPPING.items()}
