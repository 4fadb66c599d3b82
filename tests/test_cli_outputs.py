"""Every output path of the CLI: missing folders, folders, '-' for stdout, pictures through
Graphviz, closed pipes, file permissions; and help texts a user can read."""

from __future__ import annotations

import io
import os
import stat

import pytest

from pacnet.cli.main import main

NET = """\
name: tiny
inputs: {data: [1, 3, 8, 8]}
layers:
  - {name: conv1, type: Convolution, bottom: data, top: conv1, num_output: 2, kernel_size: 3, pad: 1}
  - {name: relu1, type: ReLU, bottom: conv1, top: conv1}
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(NET)
    return str(path)


def test_dot_output_paths(net, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "dir" / "g.dot"
    assert main(["build", net, "--dot", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {missing}: folder {missing.parent} does not exist" in err
    assert "mkdir -p" in err and "Traceback" not in err
    assert main(["build", net, "--dot", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path}: it is a folder" in capsys.readouterr().err
    assert main(["build", net, "--dot", "-"]) == 0  # DOT text on stdout, instead of the table
    out = capsys.readouterr().out
    assert out.startswith('digraph "tiny" {') and "total" not in out and not os.path.exists("-")
    assert main(["build", net, "--dot", "-", "--json"]) == 2
    assert "would both print to stdout" in capsys.readouterr().err
    assert main(["build", net, "--dot", str(tmp_path / "g.bmpx")]) == 2
    assert "cannot tell the format from the extension '.bmpx'" in capsys.readouterr().err
    previous = os.umask(0o022)
    try:
        assert main(["build", net, "--dot", str(tmp_path / "g.gv")]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "g.gv").st_mode) == 0o644
    assert (tmp_path / "g.gv").read_text().startswith("digraph")


def test_pictures_are_rendered_by_graphviz(net, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    png = tmp_path / "g.png"
    assert main(["build", net, "--dot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "rendering a .png picture needs Graphviz's 'dot' program, which is not on PATH" in err
    assert "install Graphviz" in err and not png.exists()
    bin_dir = tmp_path / "bin"  # a stand-in for Graphviz: records its format, echoes a picture
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text('#!/bin/sh\ncase "$1" in -Tsvg) cat > /dev/null; printf "<svg>ok</svg>";; '
                    '*) echo "Error: bad format $1" >&2; exit 1;; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert main(["build", net, "--dot", str(tmp_path / "g.svg")]) == 0
    assert (tmp_path / "g.svg").read_text() == "<svg>ok</svg>"
    assert main(["build", net, "--dot", str(png)]) == 2
    assert "Graphviz could not render the graph: Error: bad format -Tpng" in capsys.readouterr().err
    assert not png.exists()


class _ClosedPipe(io.TextIOBase):
    """stdout whose reader went away (``| head``)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [["build", "{net}", "--json"], ["build", "{net}"], ["layers", "--schema"],
                                  ["layers"], ["build", "{net}", "--dot", "-"]])
def test_a_closed_pipe_ends_quietly(net, argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main([a.format(net=net) for a in argv]) == 141  # 128 + SIGPIPE, as a Unix tool
    assert capsys.readouterr().err == ""


def test_help_texts_have_no_developer_markup(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "a Caffe-style graph compiler for PyTorch" in text and "``" not in text
    assert "entry point" not in text and "argparse" not in text
    for verb in ("build", "layers", "datasets", "convert", "hotswap", "train", "test", "time"):
        assert main([verb, "--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":class:" not in text, verb


def test_convert_and_hotswap_write_to_stdout_with_dash(tmp_path, capsys):
    src = tmp_path / "t.prototxt"
    src.write_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4\n'
                   'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert main(["convert", str(src), "-o", "-"]) == 0
    assert "- name: r" in capsys.readouterr().out and not os.path.exists("-")
    assert main(["convert", str(src), "-o", str(tmp_path / "no" / "t.yaml")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_layers_help_keeps_brackets_and_whole_sentences(capsys):
    assert main(["layers", "Convolution"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "one per axis ([h, w] or [d, h, w])" in out
    assert main(["layers"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "scale the rest by 1 / (1 - dropout_ratio)." in out  # Dropout's summary runs over two lines
    assert "``" not in out


def test_hotswap_and_predictions_outputs(tmp_path, capsys):
    net = tmp_path / "plain.yaml"
    net.write_text("inputs: {data: [1, 3, 8, 8]}\nlayers:\n"
                   "  - {name: conv1, type: Convolution, bottom: data, top: conv1, num_output: 4, kernel_size: 3,"
                   " pad: 1}\n"
                   "  - {name: conv2, type: Convolution, bottom: conv1, top: conv2, num_output: 4, kernel_size: 3,"
                   " pad: 1}\n")
    argv = ["hotswap", str(net), "--layers", "conv2", "--guide", "conv1"]
    assert main(argv + ["-o", "-"]) == 0
    assert "PacConv" in capsys.readouterr().out and not os.path.exists("-")
    assert main(argv + ["-o", str(tmp_path / "none" / "x.yaml")]) == 2
    assert "folder" in capsys.readouterr().err
    from pacnet.engine import trainer

    seg = {"name": "s", "inputs": {"data": [1, 3, 8, 8], "label": [1, 1, 8, 8]},
           "data": {"dataset": "synthetic_seg", "size": 1, "height": 8, "width": 8, "num_classes": 2},
           "layers": [{"name": "score", "type": "Convolution", "bottom": "data", "top": "score",
                       "num_output": 2, "kernel_size": 1}]}
    taken = tmp_path / "taken"
    taken.write_text("a file")
    from pacnet.errors import OutputError

    with pytest.raises(OutputError, match="it is a file, not a folder"):
        trainer.test(seg, None, out_dir=str(taken))
