"""The README's code runs as written, so it cannot drift from the code.

* every ```python block is executed; a ``print(x)  # value`` line checks that ``str(x)``
  is ``value`` (the comment is what the README promises the reader will see);
* every ```yaml block is a net that builds (a block without ``layers`` is a section, built
  as part of the first block's net);
* the error block is what pacnet prints for the first YAML block with the typo it shows;
* every ``pacnet ...`` line of a ```bash block parses with the CLI's own parser, and
  every ``--flag`` of the command table exists for its verb.
"""

import os
import re
import shlex

import pytest
import yaml

import pacnet
from pacnet.cli.main import make_parser

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def blocks(lang):
    """The fenced code blocks of the README written ```<lang> (in order)."""
    found, current, fence = [], None, None
    with open(README, encoding="utf-8") as f:
        for line in f:
            if current is None and line.startswith("```"):
                fence, current = line[3:].strip(), []
            elif current is not None and line.startswith("```"):
                if fence == lang:
                    found.append("".join(current))
                current = None
            elif current is not None:
                current.append(line)
    return found


_PRINT = re.compile(r"^print\((.*)\)\s+# (.*)$")


def checked(code):
    """``code`` with each ``print(x)  # value`` line turned into a check of str(x)."""
    out = []
    for line in code.splitlines():
        m = _PRINT.match(line)
        if m:
            expr, want = m.groups()
            want = want.split(" (")[0] if want.startswith(("True", "False")) else want
            out.append(f"assert str({expr}) == {want!r}, (str({expr}), {want!r})")
        else:
            out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_run_and_print_what_they_say(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the blocks write their files
    code = blocks("python")[index]
    assert all(_PRINT.match(line) for line in code.splitlines() if line.startswith("print("))
    exec(compile(checked(code), f"README.md python block {index}", "exec"), {})


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_yaml_blocks_build(index):
    tree = yaml.safe_load(blocks("yaml")[index])
    if "layers" not in tree:
        tree = {**yaml.safe_load(blocks("yaml")[0]), **tree}
    net = pacnet.build(tree, device="meta")
    assert net.ir.nodes


def test_error_block_is_what_pacnet_prints(tmp_path):
    shown = [b for b in blocks("") if "hint:" in b][0].strip()
    key = re.search(r"unknown key '(\w+)'", shown).group(1)
    path = tmp_path / "net.yaml"
    path.write_text(blocks("yaml")[0].replace("kernel_size: 3,", f"{key}: 3,", 1))
    with pytest.raises(pacnet.PacnetError) as err:
        pacnet.build(str(path))
    assert str(err.value).replace(str(tmp_path) + os.sep, "") == shown


def test_bash_lines_parse_with_the_cli():
    parser = make_parser()
    lines = [line.split("  #")[0].strip() for b in blocks("bash") for line in b.splitlines()]
    commands = [line for line in lines if line.startswith("pacnet ")]
    assert len(commands) >= 8
    for line in commands:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.run, line


def test_command_table_flags_exist():
    with open(README, encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `pacnet ")]
    parser = make_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert len(rows) >= 7
    for row in rows:
        command = row.split("`")[1]
        verb = command.split()[1]
        known = {opt for action in verbs[verb]._actions for opt in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", command):
            assert flag in known, f"README: pacnet {verb} has no {flag}"
