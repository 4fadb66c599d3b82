"""The README's data: and solver: reference is the one generated from the schemas."""

import os

from pacnet.cli.main import main
from pacnet.engine.reference import BEGIN, END, markdown

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_reference_matches_the_schemas(capsys):
    text = open(README, encoding="utf-8").read()
    start, end = text.index(BEGIN), text.index(END) + len(END) + 1
    assert text[start:end] == markdown(), ("the README's reference is out of date: replace it with the "
                                           "output of 'pacnet datasets --markdown'")
    assert main(["datasets", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


def test_every_data_set_and_field_is_documented():
    from pacnet.engine.data import DATASET_INFO, DATASETS
    from pacnet.engine.solver import IGNORED_FIELDS, SOLVER_SCHEMA

    undocumented = [n for n in DATASETS if set(DATASET_INFO.get(n, {})) != {"task", "gives", "layout"}]
    assert not undocumented, f"add task, gives and layout to DATASET_INFO for {undocumented}"
    text = markdown()
    for name, fields in DATASETS.items():
        assert f"`dataset: {name}`" in text
        assert all(f"| `{field}`" in text for field in fields), name
    assert all(f"| `{f}`" in text for f in SOLVER_SCHEMA["properties"] if f not in IGNORED_FIELDS)


def test_datasets_verb(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("synthetic_depth", "voc", "nyu", "sintel"))
    assert main(["datasets", "voc"]) == 0
    out = capsys.readouterr().out
    assert "JPEGImages" in out and "sbd_root" in out and "crop_size" in out
    assert main(["datasets", "vco"]) == 2
    assert "did you mean 'voc'?" in capsys.readouterr().err
    assert main(["datasets", "--solver"]) == 0
    assert "lr_policy" in capsys.readouterr().out
